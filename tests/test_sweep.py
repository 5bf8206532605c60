"""`dkp-pipeline sweep`: grid parsing, run naming, the summary arithmetic, and a real sweep of the tiny
experiment (shared stages built once, numbers equal each run's metrics.json, a second sweep reuses all)."""
import json
import math

import pytest

from pipeline.errors import DkpError
from pipeline.sweep import Axis, markdown_table, parse_axis, parse_seeds, plan_runs, run_sweep, summarise
from tests.conftest import quiet_console, run_cli


def test_parse_axis_and_seeds():
    ax = parse_axis("teach.recon_loss+distill.recon_loss=l1ssim, l1,mse")
    assert ax == Axis(("teach.recon_loss", "distill.recon_loss"), ("l1ssim", "l1", "mse"))
    assert ax.label == "teach.recon_loss+distill.recon_loss"
    assert parse_axis("distill.gamma=0.4").values == ("0.4",)
    for bad, words in (("teach.lr", "expected KEY=V1,V2"), ("teach.lr=", "one or more"), ("teach.lr=1,,2", "one or more"),
                       ("teach.lr=1,1", "repeated"), ("teach..lr=1", "dotted"), ("teach.lr+=1", "dotted")):
        with pytest.raises(DkpError, match=words):
            parse_axis(bad)
    assert parse_seeds("0,1, 2") == (0, 1, 2)
    assert parse_seeds(None) is None and parse_seeds(" ") is None
    for bad in ("0,a", "1,1"):
        with pytest.raises(DkpError, match="--seeds"):
            parse_seeds(bad)


def test_plan_runs_grid_order_names_and_conflicts():
    axes = [parse_axis("teach.recon_loss+distill.recon_loss=l1ssim,l1"), parse_axis("distill.gamma=0,0.4")]
    runs = plan_runs("synthetic", axes, (3, 5))
    assert [r.name for r in runs][:3] == ["synthetic-sweep-l1ssim-0-s3", "synthetic-sweep-l1ssim-0-s5",
                                          "synthetic-sweep-l1ssim-0.4-s3"]
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert runs[-1].point == ("l1", "0.4") and runs[-1].seed == 5
    assert runs[-1].overrides == ("teach.recon_loss=l1", "distill.recon_loss=l1", "distill.gamma=0.4",
                                  "teach.seed=5", "distill.seed=5", "name=synthetic-sweep-l1-0.4-s5")
    no_seed = plan_runs("x", [parse_axis("distill.gamma=0")], None)
    assert [r.overrides for r in no_seed] == [("distill.gamma=0", "name=x-sweep-0")]
    assert plan_runs("x", [], (1,))[0].overrides == ("teach.seed=1", "distill.seed=1", "name=x-sweep-s1")
    with pytest.raises(DkpError, match="distill.gamma is already set"):
        plan_runs("x", [parse_axis("distill.gamma=0"), parse_axis("distill.gamma+teach.lr=1")], None)
    with pytest.raises(DkpError, match="teach.seed is already set by --seeds"):
        plan_runs("x", [parse_axis("teach.seed=1,2")], (0,))


def test_summary_mean_and_sample_sd_by_hand():
    rows = [{"point": ["a"], "seed": s, "student_value": v, "teacher_value": 1.0, "student_mass_ratio": None,
             "teacher_mass_ratio": 2.0} for s, v in ((0, 1.0), (1, 2.0), (2, 6.0))]
    rows.append({"point": ["b"], "seed": 0, "student_value": 4.0, "teacher_value": float("nan"),
                 "student_mass_ratio": 1.5, "teacher_mass_ratio": 1.0})
    a, b = summarise(rows)
    assert a["n"] == 3 and a["seeds"] == [0, 1, 2]
    assert a["student_value"] == pytest.approx(3.0)
    assert a["student_value_sd"] == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    assert a["teacher_value_sd"] == pytest.approx(0.0) and a["student_mass_ratio"] is None
    assert b["student_value"] == 4.0 and b["student_value_sd"] is None and b["teacher_value"] is None
    table = markdown_table([Axis(("k",), ("a", "b"))], [a, b], "l2", "%", lower_better=True)
    lines = table.splitlines()
    assert lines[0].startswith("| k | runs | student l2 (%, lower is better) |")
    assert lines[2] == "| a | 3 | 3.00 ± 2.65 | 1.00 ± 0.00 | — | 2.00 ± 0.00 | 1.00, 2.00, 6.00 | 1.00, 1.00, 1.00 |"
    assert lines[3].startswith("| b | 1 | 4.00 | — | 1.50 | 1.00 |")


@pytest.fixture(scope="module")
def swept(tiny_store):
    t = tiny_store(build=False)  # the sweep builds it
    d = t["dir"]
    axes = [parse_axis("distill.gamma=0,0.4")]
    console = quiet_console(width=200)
    result = run_sweep(t["yaml"], ("eval.flip_pairs=none",), axes, (0, 1), t["store"], console,
                       output=str(d / "out" / "table.md"))
    return {"dir": d, "yaml": t["yaml"], "axes": axes, "result": result, "log": console.file.getvalue()}


def test_sweep_runs_every_point_and_shares_stages(swept):
    from pipeline.store.artifacts import Store

    d, result = swept["dir"], swept["result"]
    runs = result["runs"]
    assert [(r["point"], r["seed"]) for r in runs] == [(["0"], 0), (["0"], 1), (["0.4"], 0), (["0.4"], 1)]
    store = Store.from_option(str(d / "store"))
    for r in runs:  # every number is the one in that run's metrics.json
        m = json.loads((store.path("eval", r["eval_key"]) / "metrics.json").read_text())
        assert r["student_value"] == m["student"]["value"] and r["teacher_value"] == m["teacher"]["value"]
        assert m["gamma"] == float(r["point"][0])
        assert r["teacher_mass_ratio"] == m["teacher"]["figure_heatmap_mass"]["ratio"]
        assert r["floor_value"] == m["floor"]["value"] and r["student_ratio_to_floor"] == m["student"]["ratio_to_floor"]
        assert r["baseline_value"] is None  # eval.baseline is off in the tiny config
    assert "floor (mean pose)" in result["table"] and "student × floor" in result["table"]
    assert "baseline" not in result["table"]  # no run has one: no empty columns
    # gamma is the student's setting: a seed's teacher is trained once and shared by both gammas
    by = {(r["point"][0], r["seed"]): r for r in runs}
    assert by[("0", 0)]["teacher_value"] == by[("0.4", 0)]["teacher_value"]
    assert by[("0", 0)]["teacher_value"] != by[("0", 1)]["teacher_value"]  # the seed reaches the teacher
    assert by[("0", 0)]["student_value"] != by[("0.4", 0)]["student_value"]
    assert len(list((d / "store" / "teach").iterdir())) == 2 and len(list((d / "store" / "distill").iterdir())) == 4
    # the summary and the files written
    s0 = next(s for s in result["summary"] if s["point"] == ["0"])
    assert s0["n"] == 2 and s0["student_value"] == pytest.approx((by[("0", 0)]["student_value"]
                                                                  + by[("0", 1)]["student_value"]) / 2)
    assert (d / "out" / "table.md").read_text() == result["table"]
    saved = json.loads((d / "out" / "table.json").read_text())
    assert saved["runs"] == runs and saved["seeds"] == [0, 1]
    assert "sweep run 4/4: tiny-sweep-0.4-s1" in swept["log"]


def test_second_sweep_builds_nothing(swept):
    console = quiet_console(width=200)
    again = run_sweep(swept["yaml"], ("eval.flip_pairs=none",), swept["axes"], (0, 1), str(swept["dir"] / "store"),
                      console)
    log = console.file.getvalue()
    assert log.count("nothing to do: every stage is fresh") == 4 and "built" not in log
    assert again["runs"] == swept["result"]["runs"]


def test_failed_run_names_itself_and_the_sweep_continues(swept, monkeypatch):
    import pipeline.runner

    calls = []
    real = pipeline.runner.run_pipeline

    def flaky(cfg, *a, **kw):
        calls.append(cfg.name)
        if len(calls) == 2:
            raise DkpError("disk full")
        return real(cfg, *a, **kw)

    monkeypatch.setattr(pipeline.runner, "run_pipeline", flaky)
    with pytest.raises(DkpError, match=r"sweep run 2/4 \(tiny-sweep-0-s1\) failed: disk full\n1 runs are finished"):
        run_sweep(swept["yaml"], ("eval.flip_pairs=none",), swept["axes"], (0, 1), str(swept["dir"] / "store"),
                  quiet_console(width=200))


def test_cli_dry_run_and_bad_input(swept):
    d = swept["dir"]
    r = run_cli(["sweep", swept["yaml"], "--store", str(d / "store"), "--set", "eval.flip_pairs=none",
                 "--vary", "distill.gamma=0,0.4,1.0", "--seeds", "0", "--dry-run"], cwd=d)
    assert r.returncode == 0, r.stderr
    assert "tiny-sweep-0-s0: --set distill.gamma=0 --set teach.seed=0 --set distill.seed=0  " \
           "[depth fresh, teach fresh, distill fresh, eval fresh]" in r.stdout
    assert "tiny-sweep-1.0-s0" in r.stdout and "[depth fresh, teach fresh, distill missing, eval missing]" in r.stdout
    # a bad value is refused before anything runs, naming the run and the field
    r = run_cli(["sweep", swept["yaml"], "--store", str(d / "store2"), "--vary", "teach.recon_loss=l1,vgg"], cwd=d)
    assert r.returncode == 2 and "sweep run tiny-sweep-vgg" in r.stderr and "recon_loss" in r.stderr
    assert not (d / "store2").exists()
    r = run_cli(["sweep", swept["yaml"], "--vary", "teach.lr"], cwd=d)
    assert r.returncode == 2 and "expected KEY=V1,V2" in r.stderr
    r = run_cli(["sweep", swept["yaml"]], cwd=d)
    assert r.returncode == 2 and "--vary" in r.stderr


# ---------------------------------------------------------------- re-runs, threads, the study plot (issue 27)
def test_plan_runs_reruns_of_the_first_seed():
    runs = plan_runs("x", [parse_axis("distill.gamma=0.1,1")], (7, 8), reruns=2)
    assert [r.name for r in runs] == ["x-sweep-0.1-s7", "x-sweep-0.1-s8", "x-sweep-0.1-s7-r1", "x-sweep-0.1-s7-r2",
                                      "x-sweep-1-s7", "x-sweep-1-s8", "x-sweep-1-s7-r1", "x-sweep-1-s7-r2"]
    assert runs[3].rerun == 2 and runs[3].seed == 7
    assert runs[3].overrides == ("distill.gamma=0.1", "teach.seed=7", "distill.seed=7", "teach.rerun=2",
                                 "distill.rerun=2", "name=x-sweep-0.1-s7-r2")
    assert [r.overrides for r in plan_runs("x", [], None, reruns=1)] == [
        ("name=x-sweep",), ("teach.rerun=1", "distill.rerun=1", "name=x-sweep-r1")]
    with pytest.raises(DkpError, match="teach.rerun is set by --reruns"):
        plan_runs("x", [parse_axis("teach.rerun=1,2")], None, reruns=1)
    with pytest.raises(DkpError, match="--reruns"):
        plan_runs("x", [], None, reruns=-1)


def test_summary_separates_seeds_from_reruns_by_hand():
    def row(seed, rerun, v):
        return {"point": ["a"], "seed": seed, "rerun": rerun, "student_value": v, "student_ratio_to_floor": v / 10,
                "threads": "1/1/1 det"}

    rows = [row(7, 0, 5.0), row(8, 0, 7.0), row(9, 0, 9.0), row(7, 1, 5.5), row(7, 2, 4.5)]
    (s,) = summarise(rows)
    assert s["n"] == 3 and s["seeds"] == [7, 8, 9]  # the re-runs are not more seeds
    assert s["student_value"] == pytest.approx(7.0) and s["student_value_sd"] == pytest.approx(2.0)
    rr = s["reruns"]
    assert rr["seed"] == 7 and rr["n"] == 3 and rr["reruns"] == [0, 1, 2]
    assert rr["student_value"] == pytest.approx(5.0) and rr["student_value_sd"] == pytest.approx(0.5)
    assert (rr["student_ratio_to_floor_min"], rr["student_ratio_to_floor_max"]) == pytest.approx((0.45, 0.55))
    assert s["threads"] == ["1/1/1 det"]
    table = markdown_table([Axis(("k",), ("a",))], [s], "l2", "%", lower_better=True)
    assert "| threads (T/S/B) |" in table.splitlines()[0]
    assert "Re-runs of one seed" in table
    assert "| a | 7 | 3 | 0.500 ± 0.050 (0.450–0.550) |" in table and "0.500, 0.550, 0.450" in table


def test_study_plot_draws_models_floor_and_marks():
    from pipeline.report.plots import study_plot

    png = study_plot("gamma", "%", ["0.01", "0.1", "1", "10"],
                     [("student", "#d62728", [[9.0, 9.5], [9.2], [None], [12.0, 11.0]]),
                      ("teacher", "#1f77b4", [[6.0], [6.0], [6.0], [6.0]])],
                     [15.5, 15.5, 15.5, 15.5], "distill.gamma", marks=("0.1", "0.4"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert study_plot("x", "%", ["a"], [("student", "#000", [[None]])], [None], "x") is None
    assert study_plot("family", "%", ["figures", "puppets"], [("student", "#000", [[9.0], [10.0]])], [15.5, 14.9],
                      "data.synth_family")[:4] == b"\x89PNG"


def test_study_axis_is_log_with_gamma_zero_a_decade_below():
    """gamma 0, 0.01 ... 10: a log axis, 0 drawn at 0.001 (its tick says 0); linear when the values do not span."""
    from pipeline.report.plots import _study_axis, study_plot

    assert _study_axis([0.0, 0.01, 0.1, 0.4, 1.0, 10.0], True) == ([0.001, 0.01, 0.1, 0.4, 1.0, 10.0], True)
    assert _study_axis([0.01, 1.0, 10.0], True) == ([0.01, 1.0, 10.0], True)
    assert _study_axis([0.0, 0.5, 1.5, 4.0], True) == ([0.0, 0.5, 1.5, 4.0], False)  # 8x: linear
    assert _study_axis([-1.0, 0.01, 10.0], True) == ([-1.0, 0.01, 10.0], False)
    assert _study_axis([0.0, 1.0, 2.0], False) == ([0.0, 1.0, 2.0], False)  # categories
    png = study_plot("gamma", "%", ["0", "0.01", "0.1", "10"], [("student", "#000", [[15.0], [11.0], [11.0], [11.0]])],
                     [15.5] * 4, "distill.gamma", marks=("0.1", "0.4"))
    assert png[:4] == b"\x89PNG"


def test_sweep_reruns_train_again_and_the_page_shows_study_threads_and_spread(swept):
    """One re-run of seed 0 at gamma 0.4: a new student and teacher key, deterministic (the tiny config inherits the
    preset's deterministic training), so the spread is exactly zero; the page carries the study plot, the threads
    and the re-run table."""
    from pipeline.report.sweep import write_sweep_report

    d = swept["dir"]
    axes = [parse_axis("distill.gamma=0.4")]
    result = run_sweep(swept["yaml"], ("eval.flip_pairs=none",), axes, (0,), str(d / "store"),
                       quiet_console(width=200), reruns=1)
    first, again = result["runs"]
    assert again["rerun"] == 1 and again["eval_key"] != first["eval_key"]
    assert again["student_value"] == first["student_value"] and again["teacher_value"] == first["teacher_value"]
    assert first["threads"] == "1/1/- det"  # teacher, student; no baseline in the tiny config
    rr = result["summary"][0]["reruns"]
    assert rr["n"] == 2 and rr["student_ratio_to_floor_sd"] == 0.0
    assert "Re-runs of one seed" in result["table"]
    page = write_sweep_report(swept["yaml"], ("eval.flip_pairs=none",), axes, (0,), str(d / "store"),
                              str(d / "out" / "reruns.html"), reruns=1).read_text()
    assert "The study: each model against distill.gamma" in page and 'id="rerun-table"' in page
    assert "threads (T/S/B)" in page and "1/1/- det" in page and "seed 0 re-run 1" in page


def test_paired_axis_gives_each_key_its_own_part():
    ax = parse_axis("teach.model.width+distill.model.width=16:8,8:16")
    assert ax.paired and ax.assignments("16:8") == (("teach.model.width", "16"), ("distill.model.width", "8"))
    runs = plan_runs("x", [ax], (1,))
    assert runs[0].overrides == ("teach.model.width=16", "distill.model.width=8", "teach.seed=1", "distill.seed=1",
                                 "name=x-sweep-16_8-s1")
    # one value without the parts: the same value for every key, as before
    same = parse_axis("teach.recon_loss+distill.recon_loss=l1ssim,l1")
    assert not same.paired and same.assignments("l1") == (("teach.recon_loss", "l1"), ("distill.recon_loss", "l1"))
    mixed = parse_axis("data.synth_family+data.root=figures,puppets")
    assert mixed.assignments("puppets") == (("data.synth_family", "puppets"), ("data.root", "puppets"))
