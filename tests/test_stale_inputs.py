"""Annotations and splits in the artifact keys (issue 13, item 1): edit after a finished run, then `status`
and `run`. Every stage's key covers exactly what it reads (pipeline/data/reads.py): depth the frames, teach and
distill the train split (and the test split they picture), eval the regress/test splits, their
annotations and frames. Nothing stale is reported fresh, nothing is rebuilt that did not change, and
`status` names what changed.
"""
import csv
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_YAML, run_cli


@pytest.fixture(scope="module")
def built_once(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("built")
    y = tmp / "tiny.yaml"
    y.write_text(TINY_YAML.format(root=tmp / "data"))
    r = run_cli(["run", str(y), "--store", str(tmp / "store")], cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp


@pytest.fixture
def exp(built_once, tmp_path):
    """A private copy of the finished experiment (data + store)."""
    shutil.copytree(built_once, tmp_path / "exp")
    e = tmp_path / "exp"
    (e / "tiny.yaml").write_text(TINY_YAML.format(root=e / "data"))
    return e


def cli(e: Path, *args: str):
    return run_cli([args[0], str(e / "tiny.yaml"), "--store", str(e / "store"), *args[1:]], cwd=e)


def status(e: Path) -> dict:
    r = cli(e, "status", "--json")
    assert r.returncode == 0, r.stderr
    return {s["stage"]: s for s in json.loads(r.stdout)}


def read_csv(e: Path) -> list[list[str]]:
    with open(e / "data" / "keypoints.csv", newline="") as f:
        return list(csv.reader(f))


def write_csv(e: Path, rows: list[list[str]]) -> None:
    with open(e / "data" / "keypoints.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)


def first_row(rows, split: str) -> int:
    return next(i for i, r in enumerate(rows) if i and r[1] == split)


def states(st: dict) -> dict:
    return {k: v["state"] for k, v in st.items()}


def metrics(st: dict) -> dict:
    return json.loads((Path(st["eval"]["path"]) / "metrics.json").read_text())


@pytest.mark.parametrize("edit", ["coordinate", "visibility"])
def test_annotation_edit_reruns_eval_only(exp, edit):
    before = status(exp)
    old_metrics = metrics(before)
    rows = read_csv(exp)
    i = first_row(rows, "test")
    if edit == "coordinate":
        rows[i][2] = f"{float(rows[i][2]) + 5.0:.3f}"  # x0 of a test frame moves 5 px
    else:
        rows[i][2] = rows[i][3] = ""  # joint 0 of a test frame becomes missing
    write_csv(exp, rows)

    st = status(exp)
    assert states(st) == {"manifest": "stale", "depth": "fresh", "teach": "fresh", "distill": "fresh",
                          "eval": "stale"}, st
    assert "annotations changed: 1 frame (coordinates or visibility)" in st["eval"]["why"], st["eval"]["why"]
    assert "annotations changed: 1 frame (coordinates or visibility)" in st["manifest"]["why"]

    r = cli(exp, "run")
    assert r.returncode == 0, r.stdout + r.stderr
    out = " ".join(r.stdout.split())
    for reused in ("depth", "teach", "distill"):
        assert f"{reused} fresh" in out and before[reused]["key"][:16] in out
    assert "→ eval stale" in out
    after = status(exp)
    assert set(states(after).values()) == {"fresh"}
    assert after["eval"]["key"] != before["eval"]["key"]
    assert metrics(after)["student"]["value"] != old_metrics["student"]["value"]
    assert "nothing to do" in cli(exp, "run").stdout


def test_frame_moved_from_train_to_test_retrains(exp):
    before = status(exp)
    rows = read_csv(exp)
    i = first_row(rows, "train")
    rows[i][1] = "test"
    write_csv(exp, rows)

    st = status(exp)
    assert states(st) == {"manifest": "stale", "depth": "fresh", "teach": "stale", "distill": "stale",
                          "eval": "stale"}, st
    moved = "splits changed: 1 frame moved (train -> test: 1)"
    for stage in ("manifest", "teach", "distill", "eval"):
        assert moved in st[stage]["why"], (stage, st[stage]["why"])
    assert "upstream teach changed" in " ".join(st["distill"]["why"])

    r = cli(exp, "run")
    assert r.returncode == 0, r.stdout + r.stderr
    out = " ".join(r.stdout.split())
    assert "depth fresh" in out and "→ teach stale" in out and "→ distill stale" in out
    after = status(exp)
    assert after["depth"]["key"] == before["depth"]["key"]  # annotations and splits never rebuild depth
    assert after["teach"]["key"] != before["teach"]["key"]
    result = json.loads((Path(after["teach"]["path"]) / "artifact.json").read_text())["result"]
    assert result["n_train_frames"] == json.loads(
        (Path(before["teach"]["path"]) / "artifact.json").read_text())["result"]["n_train_frames"] - 1


def test_unlabelled_copy_is_not_scored_with_the_labelled_runs_metrics(exp):
    """The same frames without keypoints.csv under another root, same store: eval is not fresh (it used to
    report the labelled run's metrics.json), and `run` refuses before training, naming the file."""
    shutil.copytree(exp / "data", exp / "unlabelled")
    (exp / "unlabelled" / "keypoints.csv").unlink()
    (exp / "tiny.yaml").write_text(TINY_YAML.format(root=exp / "unlabelled"))
    teach_dirs = sorted((exp / "store" / "teach").iterdir())

    st = status(exp)
    assert st["depth"]["state"] == "fresh"  # the same frames: the depth cache is reused
    assert st["eval"]["state"] != "fresh" and st["teach"]["state"] != "fresh"
    r = cli(exp, "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert f"there is no {exp / 'unlabelled' / 'keypoints.csv'}" in err and "--until distill" in err, err
    assert sorted((exp / "store" / "teach").iterdir()) == teach_dirs  # nothing was trained first


def test_editing_annotations_back_finds_the_old_artifacts(exp):
    """Keys are content: undoing an edit makes the old artifacts fresh again (nothing rebuilt)."""
    original = (exp / "data" / "keypoints.csv").read_bytes()
    before = status(exp)
    rows = read_csv(exp)
    i = first_row(rows, "train")
    rows[i][1] = "test"
    write_csv(exp, rows)
    assert status(exp)["teach"]["state"] == "stale"
    (exp / "data" / "keypoints.csv").write_bytes(original)
    st = status(exp)
    assert set(states(st).values()) == {"fresh"} and st["eval"]["key"] == before["eval"]["key"]


def test_midas_depth_key_unchanged_by_issue_13(tmp_path):
    """The MiDaS depth key is still the formula of before annotations entered the keys (copied here from that
    code), so existing caches and exports are reused rather than recomputed for hours."""
    from pipeline.store.artifacts import Store, artifact_key
    from pipeline.config import load_config, semantic_dict
    from pipeline.graph import build_plan
    from pipeline.data.synth import write_synthetic

    write_synthetic(tmp_path / "data", n=8, seed=0, image_size=32, progress=False)
    (tmp_path / "tiny.yaml").write_text(TINY_YAML.format(root=tmp_path / "data"))
    cfg = load_config(str(tmp_path / "tiny.yaml"), ["depth.provider=midas"])
    plan = build_plan(cfg, Store(tmp_path / "store"), progress=False)
    m = plan.manifest
    old_manifest_key = artifact_key("manifest", {"dataset": cfg.data.manifest,
                                                 "description_sha256": m.description_sha256}, {}, m.fingerprint,
                                    schema=1)
    from pipeline.stages.depth.identity import resolve_auto

    # preprocess and tf32 came later and are unkeyed at their CPU values ("cpu", off); precision "auto" is resolved
    # before keying (fp32 on a CPU): the key is the formula of before all three existed. degrade is read by the
    # teacher, never by the depth stage, so it is never in the depth key
    old_sem = {k: v for k, v in semantic_dict(resolve_auto(cfg.depth)).items()
               if k not in ("preprocess", "tf32", "degrade")}
    old_depth_key = artifact_key("depth", dict(old_sem, weights_sha256=None),
                                 {"manifest": old_manifest_key}, m.fingerprint, schema=1)
    assert plan.stages["depth"].key == old_depth_key
    assert plan.stages["manifest"].key != old_manifest_key  # the manifest's own key now covers annotations too
