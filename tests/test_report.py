"""`dkp-pipeline report` on the tiny experiment: the page parses, holds every section, every number of metrics.json
and eval's four-row comparison; missing and stale stages show as such; `run` prints the page's path; the sweep
page; and a real browser (headless Chromium) renders the page (skipped where none is installed)."""
import base64
import json
import math
import shutil
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import TINY_YAML

# The four-row comparison: the tiny experiment with the gamma = 0 baseline.
YAML = (TINY_YAML.replace("eval: {{baseline: false}}", "eval: {{baseline: true}}")
        .replace("distill:\n  model:", "distill:\n  gamma: 0.4\n  model:"))  # not the preset's 1.0: it shows in the diff
SECTIONS = ("stages", "evaluation", "curves", "pictures", "depth", "provenance")
VOID = {"meta", "img", "br", "hr", "input", "link"}


@pytest.fixture(scope="module")
def tiny(tiny_store):
    """The tiny experiment (with the baseline) built end to end once for this file."""
    t = tiny_store(yaml=YAML)
    plan = t["plan"]
    return {**t, "metrics": json.loads((plan.store.path("eval", plan.stages["eval"].key) / "metrics.json").read_text())}


class Page(HTMLParser):
    """Parses a page strictly enough to catch broken markup: every non-void tag closed, in order."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack, self.ids, self.imgs, self.hrefs, self.tables = [], set(), [], [], {}
        self._table, self._row, self._cell = None, None, None
        self.text = []
        self.feed(text)
        self.close()
        assert self.stack == [], f"unclosed tags: {self.stack}"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a)
        if tag == "a":
            self.hrefs.append(a.get("href", ""))
        if tag == "table":
            self._table = a.get("id", f"t{len(self.tables)}")
            self.tables[self._table] = []
        if tag == "tr":
            self._row = []
        if tag in ("td", "th"):
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]} ({self.getpos()})"
        self.stack.pop()
        if tag in ("td", "th") and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr" and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, table_id):
        return self.tables[table_id][1:]  # without the header


def _report(tiny, *overrides, out=None):
    from pipeline.config import load_config
    from pipeline.report.experiment import write_experiment_report

    cfg = load_config(tiny["yaml"], list(overrides))
    path = write_experiment_report(cfg, tiny["store"], str(out) if out else None, source=tiny["yaml"],
                                   overrides=tuple(overrides))
    return path, Page(path.read_text())


def _leaves(d, prefix=""):
    if isinstance(d, dict):
        return [kv for k, v in d.items() for kv in _leaves(v, f"{prefix}{k}.")]
    return [(prefix[:-1], d)]


def test_page_parses_and_holds_every_section_and_every_number_of_metrics_json(tiny):
    path, page = _report(tiny)
    assert path == Path(tiny["store"]) / "reports" / "tiny.html"
    for s in SECTIONS:
        assert s in page.ids, f"section {s} missing"
    # every number (every leaf) of metrics.json, exactly as JSON writes it
    m = tiny["metrics"]
    shown = {r[0]: r[1] for r in page.rows("metrics-json")}
    expected = {k: json.dumps(v) for k, v in _leaves(m)}
    assert shown == expected
    assert sum(isinstance(v, float) for _, v in _leaves(m)) > 20  # the leaves are really there to check
    # eval's four rows, with the numbers eval printed
    rows = page.rows("comparison")
    assert [r[0].split(":")[0] for r in rows] == ["floor", "baseline", "student", "teacher"]
    for r, role in zip(rows, ("floor", "baseline", "student", "teacher")):
        assert r[1] == f"{m[role]['value']:.2f}"
        assert r[2] == ("1.000" if role == "floor" else f"{m[role]['ratio_to_floor']:.3f}")
        if role != "floor":
            assert r[4] == ("yes" if m[role]["beats_floor"] else "no")
            assert r[5] == f"{m[role]['figure_heatmap_mass']['ratio']:.2f}"
    assert rows[2][3] == f"{m['student']['ratio_to_baseline']:.3f}"
    assert m["student"]["unit"] in "".join(page.text)


def test_stage_table_pictures_and_provenance(tiny):
    path, page = _report(tiny)
    plan = tiny["plan"]
    stages = page.rows("stage-table")
    assert [r[0] for r in stages] == ["manifest", "depth", "teach", "distill", "baseline (distill)", "eval"]
    for r, (name, sp) in zip(stages, plan.stages.items()):
        assert r[1] == "fresh" and r[3] == sp.key[:16]
        rec = json.loads((plan.store.path(sp.stage, sp.key) / "artifact.json").read_text())
        t = rec["timings"]
        assert r[5] == f"{t['seconds_this_run']:.1f}" and r[6] == f"{t['cpu_seconds_this_run']:.1f}"
    assert float(stages[2][6]) > 0  # training costs CPU time
    assert stages[2][7] == "cpu"  # the device teach trained on
    # pictures: embedded PNGs only (the loss plot, 3 raw detections, 3 eval pictures, the depth preview)
    assert len(page.imgs) == 8
    for img in page.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = path.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text
    # links to the artifacts resolve from the page's folder
    local = [h for h in page.hrefs if not h.startswith("#")]
    assert local and all((path.parent / h).exists() for h in local)
    # provenance: the config against the preset it starts from, the command line, the git SHA
    assert page.tables["config-diff"][0] == ["field", "preset synthetic", "this experiment"]
    diff = {r[0]: (r[1], r[2]) for r in page.rows("config-diff")}
    assert diff["data.synth_frames"] == ("4000", "48") and diff["data.synth_clip_length"] == ("1", "32")
    assert diff["distill.gamma"] == ("1.0", "0.4") and "eval.baseline" not in diff  # baseline: as the preset
    rec = json.loads((plan.store.path("teach", plan.stages["teach"].key) / "artifact.json").read_text())
    assert rec["git_sha"] is None or rec["git_sha"] in text


def test_missing_and_stale_stages_show_as_such(tiny):
    _, page = _report(tiny, "distill.gamma=0.3")
    states = {r[0]: (r[1], r[2]) for r in page.rows("stage-table")}
    assert states["teach"][0] == "fresh" and states["baseline (distill)"][0] == "fresh"
    # built before under the same experiment name with gamma 0.4: stale, and why
    assert states["distill"][0] == "stale" and "distill.gamma changed (0.4 -> 0.3)" in states["distill"][1]
    assert states["eval"][0] == "stale"
    assert "comparison" not in page.ids
    text = "".join(page.text)
    assert "eval: stale" in text and "student (RGB): stale" in text
    _, other = _report(tiny, "distill.gamma=0.3", "name=never-built")
    assert {r[0]: r[1] for r in other.rows("stage-table")}["eval"] == "missing"


def test_an_interrupted_stage_shows_what_it_has_so_far(tiny, tmp_path):
    """distill killed after its last eval picture: in progress, its curve and its newest picture on the page."""
    store = tmp_path / "store"
    # (a finished artifact missing a file is damaged since issue 24: only what is not an output is left out)
    shutil.copytree(tiny["store"], store, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    sp = tiny["plan"].stages["distill"]
    art = store / "distill" / sp.key[:16]
    (art / "COMPLETE").unlink()
    (art / "keypoints.png").unlink()
    _, page = _report(dict(tiny, store=str(store)))
    states = {r[0]: r for r in page.rows("stage-table")}
    assert states["distill"][1] == "in progress" and states["distill"][5] == "—"
    assert states["teach"][1] == "fresh"
    text = "".join(page.text)
    assert "distill (gamma 0.4): keypoints on the RGB of up to 16 test frames, step_000006" in text
    assert "student (RGB): in progress" in text  # the curves and pictures say so


def test_report_before_the_synthetic_data_exists(tiny_experiment):
    from pipeline.config import load_config
    from pipeline.report.experiment import write_experiment_report

    cfg = load_config(tiny_experiment["yaml"])
    path = write_experiment_report(cfg, tiny_experiment["store"], source=tiny_experiment["yaml"])
    page = Page(path.read_text())
    assert set(SECTIONS) <= page.ids and {r[1] for r in page.rows("stage-table")} == {"missing"}
    assert "not generated yet" in "".join(page.text)


def test_cli_run_prints_the_report_path_and_report_writes_the_page(tiny, tmp_path):
    from pipeline.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["run", tiny["yaml"], "--store", tiny["store"]])
    assert res.exit_code == 0, res.output
    line = [l for l in res.output.splitlines() if l.startswith("report: ")]
    assert line and Path(line[-1][len("report: "):]).is_file()
    out = tmp_path / "sub" / "r.html"
    res = runner.invoke(main, ["report", tiny["yaml"], "--store", tiny["store"], "-o", str(out)])
    assert res.exit_code == 0 and f"report: {out}" in res.output and "experiment tiny" in out.read_text()
    res = runner.invoke(main, ["report", str(tmp_path / "nope.yaml"), "--store", tiny["store"]])
    assert res.exit_code == 2 and "nope.yaml: file not found" in res.output and "Traceback" not in res.output


def test_sweep_page_table_plots_and_run_links(tiny, tmp_path):
    """Seed 0 is the module's run (same keys under the sweep's name), seed 1 is trained here; gamma 0.3 is not run."""
    from pipeline.cli import main
    from pipeline.sweep import mean_sd_text

    res = CliRunner().invoke(main, ["sweep", tiny["yaml"], "--store", tiny["store"], "--vary", "distill.gamma=0.4",
                                    "--seeds", "0,1", "--report", str(tmp_path / "first.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "first.html").is_file()
    res = CliRunner().invoke(main, ["report", tiny["yaml"], "--store", tiny["store"], "--sweep",
                                    "distill.gamma=0.4,0.3", "--seeds", "0,1", "-o", str(tmp_path / "sweep.html")])
    assert res.exit_code == 0, res.output
    path = tmp_path / "sweep.html"
    page = Page(path.read_text())
    rows = page.rows("sweep-table")
    assert [r[0] for r in rows] == ["0.4", "0.3"] and rows[0][1] == "2 / 2" and rows[1][1] == "0 / 2"
    head = page.tables["sweep-table"][0]
    store = Path(tiny["store"])
    last = json.loads((store / "experiments" / "tiny-sweep-0.4-s1.json").read_text())
    values = [tiny["metrics"]["student"]["value"],
              json.loads((store / "eval" / last["eval"][:16] / "metrics.json").read_text())["student"]["value"]]
    assert values[0] != values[1]
    sd = statistics.stdev(values)
    assert rows[0][head.index("student")] == mean_sd_text(statistics.mean(values), sd) and not math.isnan(sd)
    assert rows[1][head.index("student")] == "—"
    # the study plot (every model against gamma, the floor drawn), then one plot per metric with a value (floor,
    # baseline, student, teacher; 3 masses on the figure)
    assert len(page.imgs) == 8 and all(i["src"].startswith("data:image/png;base64,") for i in page.imgs)
    assert page.imgs[0]["alt"] == "study: distill.gamma"
    # every run's page is linked and written, the missing ones too
    pages = {h for h in page.hrefs if h.endswith(".html")}
    assert len(pages) == 4 and all((path.parent / h).is_file() for h in pages)
    run_page = Page((path.parent / "sweep.runs" / "tiny-sweep-0.3-s1.html").read_text())
    assert {r[0]: r[1] for r in run_page.rows("stage-table")}["distill"] == "missing"


def _browser():
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_headless_chromium_renders_the_page(tiny, tmp_path):
    """A real browser renders the page to a PNG of the window's size that is not blank."""
    import cv2
    import numpy as np

    browser = _browser()
    if browser is None:
        pytest.skip("no chromium here (.ci/run installs the Debian package where apt-get is available)")
    path, _ = _report(tiny, out=tmp_path / "page.html")
    shot = tmp_path / "page.png"
    p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                        "--window-size=1280,2000", path.resolve().as_uri()],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and shot.is_file(), p.stderr[-2000:]
    img = cv2.imread(str(shot))
    assert img.shape == (2000, 1280, 3)
    ink = (img < 200).any(axis=2)  # text, table rules, pictures
    assert 0.02 < ink.mean() < 0.9, ink.mean()
    assert ink[:300].mean() > 0.005  # the title and the stage table are drawn at the top
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200  # the pictures, not only text
