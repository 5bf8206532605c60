"""TensorBoard event files (optional `tensorboard` extra), read back with tensorboard's own reader: what teach and
distill log, under which run name, that a killed writer leaves them readable and that a resumed run replaces what
the killed one logged after its checkpoint."""
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from pipeline.tblog import TensorBoardLog, run_dir  # noqa: E402
from tests.conftest import REPO, TINY_YAML  # noqa: E402


def _read(log_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def _steps(ea, tag):
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def test_scalars_and_pictures_read_back(tmp_path):
    log = TensorBoardLog(tmp_path / "run")
    log.start(0)
    log.scalars(2, {"loss": 0.5, "recon_loss": 0.4, "kd_loss": 0.25, "lr": 1e-3})
    log.scalars(4, {"loss": 0.25, "recon_loss": 0.2, "kd_loss": 0.125, "lr": 5e-4})
    picture = np.zeros((20, 30, 3), np.uint8)
    picture[:, :10] = 255
    log.image("keypoints", 4, picture)
    log.close()
    ea = _read(tmp_path / "run")
    assert _steps(ea, "loss/total") == [(2, 0.5), (4, 0.25)]
    assert _steps(ea, "loss/kd_loss") == [(2, 0.25), (4, 0.125)]
    assert [s for s, _ in _steps(ea, "train/lr")] == [2, 4]
    assert np.allclose([v for _, v in _steps(ea, "train/lr")], [1e-3, 5e-4])
    speed = _steps(ea, "train/steps_per_s")
    assert [s for s, _ in speed] == [2, 4] and all(v > 0 for _, v in speed)
    (img,) = ea.Images("keypoints")
    assert (img.step, img.width, img.height) == (4, 30, 20)


KILLED = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from pipeline.tblog import TensorBoardLog
log = TensorBoardLog({dir!r})
log.start(0)
for step in range(1, 6):
    log.scalars(step, {{"loss": 1.0 / step}})
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no flush at exit
"""


def test_a_killed_run_leaves_readable_events(tmp_path):
    p = subprocess.run([sys.executable, "-c", KILLED.format(repo=str(REPO), dir=str(tmp_path / "run"))],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert _steps(_read(tmp_path / "run"), "loss/total") == [(s, pytest.approx(1.0 / s)) for s in range(1, 6)]


def test_a_resumed_run_replaces_what_the_killed_one_logged_after_its_checkpoint(tmp_path):
    killed = TensorBoardLog(tmp_path / "run")
    killed.start(0)
    for step in (2, 4, 6, 8):  # checkpoint at 4; 6 and 8 were logged, then the process died
        killed.scalars(step, {"loss": float(step)})
    killed.close()
    resumed = TensorBoardLog(tmp_path / "run")
    resumed.start(4)
    for step in (6, 8):
        resumed.scalars(step, {"loss": -float(step)})
    resumed.close()
    assert _steps(_read(tmp_path / "run"), "loss/total") == [(2, 2.0), (4, 4.0), (6, -6.0), (8, -8.0)]


def test_run_dir_keeps_the_directory_an_interrupted_run_started(tmp_path):
    assert run_dir(tmp_path, "my exp-teach") == tmp_path / "tensorboard" / "my_exp-teach"
    (tmp_path / "tensorboard" / "first-teach").mkdir(parents=True)
    assert run_dir(tmp_path, "second-teach") == tmp_path / "tensorboard" / "first-teach"


def test_teach_and_distill_write_named_runs_with_the_metrics_lines(tmp_path, monkeypatch):
    from rich.console import Console

    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    monkeypatch.setenv("DKP_CACHE_DIR", str(tmp_path / "dkp-cache"))
    y = tmp_path / "tiny.yaml"
    y.write_text(TINY_YAML.format(root=tmp_path / "data"))
    plan = run_pipeline(load_config(str(y)), str(tmp_path / "store"), until="distill",
                        console=Console(file=io.StringIO()))
    for entry in ("teach", "distill"):
        sp = plan.stages[entry]
        art = plan.store.path(sp.stage, sp.key)
        runs = list((art / "tensorboard").iterdir())
        assert [r.name for r in runs] == [f"tiny-{entry}"]  # `tensorboard --logdir STORE` names it so
        ea = _read(runs[0])
        lines = [json.loads(l) for l in (art / "metrics.jsonl").read_text().splitlines()]
        assert _steps(ea, "loss/total") == [(r["step"], pytest.approx(r["loss"])) for r in lines]
        assert _steps(ea, "loss/recon_loss") == [(r["step"], pytest.approx(r["recon_loss"])) for r in lines]
        assert [v for _, v in _steps(ea, "train/lr")] == [pytest.approx(1e-3)] * len(lines)  # constant schedule
        assert [i.step for i in ea.Images("keypoints")] == [3, 6]  # eval_every 3 and the last step
    assert "loss/kd_loss" in _read(next((plan.store.path("distill", plan.stages["distill"].key) / "tensorboard")
                                        .iterdir())).Tags()["scalars"]
