"""`status` and `run` over the stage graph: fresh / stale-and-why / missing, and a second run does nothing."""
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli


def _status(exp, *extra):
    r = run_cli(["status", exp["yaml"], "--store", exp["store"], "--json", *extra], cwd=exp["cwd"])
    assert r.returncode == 0, r.stderr
    return {s["stage"]: s for s in json.loads(r.stdout)}


@pytest.fixture(scope="module")
def built_once(tmp_path_factory):
    from tests.conftest import TINY_YAML

    tmp = tmp_path_factory.mktemp("built")
    y = tmp / "tiny.yaml"
    y.write_text(TINY_YAML.format(root=tmp / "data"))
    exp = {"yaml": str(y), "store": str(tmp / "store"), "cwd": tmp, "root": tmp / "data"}
    r = run_cli(["run", exp["yaml"], "--store", exp["store"]], cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    return exp


@pytest.fixture
def built(built_once, tmp_path):
    """A private copy of the built experiment (data + store), for tests that change files."""
    import shutil

    from tests.conftest import TINY_YAML

    shutil.copytree(built_once["cwd"], tmp_path / "exp")
    exp = {"yaml": str(tmp_path / "exp" / "tiny.yaml"), "store": str(tmp_path / "exp" / "store"),
           "cwd": tmp_path / "exp", "root": tmp_path / "exp" / "data"}
    Path(exp["yaml"]).write_text(TINY_YAML.format(root=exp["root"]))
    return exp


def test_run_builds_everything_then_second_run_does_nothing(built):
    st = _status(built)
    assert [s["state"] for s in st.values()] == ["fresh"] * 5
    for stage, s in st.items():
        p = Path(s["path"])
        assert (p / "COMPLETE").exists() and json.loads((p / "artifact.json").read_text())["key"] == s["key"]
    # experiments/ (what was built last) and reports/ (the page `run` rewrites at its end) are not artifacts
    mtimes = {f: f.stat().st_mtime_ns for f in Path(built["store"]).rglob("*") if f.is_file()
              and not {"experiments", "reports"} & set(f.parts)}
    r = run_cli(["run", built["yaml"], "--store", built["store"]], cwd=built["cwd"])
    assert r.returncode == 0
    assert "nothing to do: every stage is fresh" in r.stdout
    after = {f: f.stat().st_mtime_ns for f in Path(built["store"]).rglob("*") if f.is_file()
             and not {"experiments", "reports"} & set(f.parts)}
    assert after == mtimes  # not one artifact file was touched


def test_status_missing_before_anything_is_built(tiny_experiment):
    # status needs the data; generate it without building any stage
    r = run_cli(["synth", str(tiny_experiment["root"]), "--n", "48", "--size", "32"], cwd=tiny_experiment["cwd"])
    assert r.returncode == 0, r.stderr
    st = _status(tiny_experiment)
    assert {s["state"] for s in st.values()} == {"missing"}


def test_config_change_is_stale_with_reason_and_only_downstream_reruns(built):
    st = _status(built, "--set", "teach.lr=0.002")
    assert st["manifest"]["state"] == "fresh" and st["depth"]["state"] == "fresh"
    assert st["teach"]["state"] == "stale"
    assert any("config field teach.lr changed" in w for w in st["teach"]["why"])
    assert st["distill"]["state"] == "stale"
    assert any("upstream teach changed" in w for w in st["distill"]["why"])
    # excluded fields do not make anything stale
    st = _status(built, "--set", "teach.num_workers=1", "--set", "teach.log_every=1")
    assert {s["state"] for s in st.values()} == {"fresh"}


def test_frames_changed_are_counted(built):
    root = Path(built["root"])
    img = sorted((root / "images").glob("*.png"))[0]
    import cv2

    a = cv2.imread(str(img))
    a[0, 0] = 255 - a[0, 0]
    cv2.imwrite(str(img), a)
    st = _status(built)
    assert st["manifest"]["state"] == "stale"
    assert any("frames changed: 1 modified" in w for w in st["manifest"]["why"]), st["manifest"]["why"]
    assert st["depth"]["state"] == "stale"
    assert any("upstream dataset manifest changed" in w for w in st["depth"]["why"])


def test_interrupted_stage_shows_in_progress(built):
    st = _status(built, "--set", "teach.steps=8")
    assert st["teach"]["state"] == "stale"
    # fake an interrupted artifact: directory without COMPLETE
    p = Path(st["teach"]["path"])
    p.mkdir(parents=True)
    (p / "artifact.json").write_text(json.dumps({"key": st["teach"]["key"], "config": {"steps": 8}}))
    st = _status(built, "--set", "teach.steps=8")
    assert st["teach"]["state"] == "in_progress"


def test_dry_run_prints_resolved_config_and_plan_without_building(built):
    r = run_cli(["run", built["yaml"], "--store", built["store"], "--dry-run", "--set", "distill.gamma=0.25"],
                cwd=built["cwd"])
    assert r.returncode == 0, r.stderr
    assert "gamma: 0.25" in r.stdout and "would build: distill, eval" in r.stdout
    st = _status(built, "--set", "distill.gamma=0.25")
    assert st["distill"]["state"] == "stale"  # nothing was built


def test_single_stage_command_needs_fresh_upstream(tiny_experiment):
    r = run_cli(["teach", tiny_experiment["yaml"], "--store", tiny_experiment["store"]], cwd=tiny_experiment["cwd"])
    assert r.returncode == 2
    assert "needs depth" in r.stderr and "--until depth" in r.stderr
