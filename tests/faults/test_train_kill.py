"""kill -9 the trainer at seeded random points, resume, and compare with an uninterrupted run.

The trainer runs in a subprocess (tests/faults/train_toy.py: conv+BatchNorm+dropout on 8x8 images,
seeded flip/noise augmentation, masks from the step generator) that SIGKILLs itself at an exact
point: inside a step (after the forward pass), in the middle of writing a checkpoint (temp file
torn to half its size, before the rename), or right after a checkpoint was renamed into place
(before old ones are pruned). After every kill: every checkpoint on disk loads, and metrics.jsonl
is a prefix of the reference's. At the end: parameters, buffers and optimiser state bitwise equal
to the uninterrupted run, metrics.jsonl byte-identical, no temporary files, at most 2 checkpoints.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.store.checkpoint import list_checkpoints, load_safe

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parents[2]
TOY = Path(__file__).with_name("train_toy.py")
CKPT_EVERY = 5


def _toy(run_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(TOY), str(run_dir), "--ckpt-every", str(CKPT_EVERY), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _kill_plan(seed: int, n_kills: int, steps: int) -> list[str]:
    """``n_kills`` distinct kill points drawn uniformly from every possible one, in run order.

    In a run, ``save:S`` and ``saved:S`` happen when step S-1 ends and ``step:S`` during step S,
    so sorting by (S, save < saved < step) is the order a resumed run meets them: each kill point
    lies after the previous one and is therefore reached again after resuming.
    """
    order = {"save": 0, "saved": 1, "step": 2}
    events = [("step", s) for s in range(1, steps)]
    events += [(kind, s) for s in range(CKPT_EVERY, steps, CKPT_EVERY) for kind in ("save", "saved")]
    chosen = random.Random(seed).sample(events, n_kills)
    return [f"{kind}:{s}" for kind, s in sorted(chosen, key=lambda e: (e[1], order[e[0]]))]


def _state(run_dir: Path) -> tuple[dict, dict]:
    final = torch.load(run_dir / "model.pt", weights_only=True)
    last = load_safe(list_checkpoints(run_dir / "checkpoints")[-1][1])
    return final["state_dict"], last["optimizer"]["state"]


def _assert_equal_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], dict):
            _assert_equal_tensors(a[k], b[k], f"{what}.{k}")
        else:
            assert torch.equal(a[k], b[k]), f"{what}.{k} differs"


def _kill_and_resume(tmp_path: Path, *, seed: int, n_kills: int, steps: int) -> None:
    ref = tmp_path / "reference"
    done = _toy(ref, "--steps", str(steps))
    assert done.returncode == 0, done.stderr
    ref_metrics = (ref / "metrics.jsonl").read_text()

    run = tmp_path / "killed"
    plan = _kill_plan(seed, n_kills, steps)
    assert {spec.split(":")[0] for spec in plan} == {"step", "save", "saved"}, plan  # every kind is hit
    for spec in plan:
        proc = _toy(run, "--steps", str(steps), "--kill", spec)
        assert proc.returncode == -signal.SIGKILL, f"{spec}: exit {proc.returncode}\n{proc.stderr}"
        for _, path in list_checkpoints(run / "checkpoints"):
            load_safe(path)  # every complete-looking checkpoint is complete
        assert ref_metrics.startswith((run / "metrics.jsonl").read_text()), spec
    final = _toy(run, "--steps", str(steps))
    assert final.returncode == 0, final.stderr

    (ref_weights, ref_opt), (weights, opt) = _state(ref), _state(run)
    _assert_equal_tensors(weights, ref_weights, f"model after kills {plan}")
    _assert_equal_tensors(opt, ref_opt, f"optimizer after kills {plan}")
    assert (run / "metrics.jsonl").read_text() == ref_metrics
    assert not [p for p in run.rglob("*") if ".tmp." in p.name]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [steps - CKPT_EVERY, steps]


def test_kill9_at_5_seeded_points_then_resume_is_bitwise_identical(tmp_path):
    _kill_and_resume(tmp_path, seed=3, n_kills=5, steps=30)


@pytest.mark.slow
def test_kill9_at_20_seeded_points_then_resume_is_bitwise_identical(tmp_path):
    _kill_and_resume(tmp_path, seed=7, n_kills=20, steps=100)


def test_sigterm_to_the_process_group_checkpoints_and_exits(tmp_path):
    """As Slurm does on preemption: every process, DataLoader workers included, gets SIGTERM."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(TOY), str(tmp_path), "--steps", "400", "--workers", "2",
                             "--sleep", "0.02", "--ckpt-every", "1000"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "training stopped by SIGTERM" in err and "Re-run the same command" in err
    (step, path), = list_checkpoints(tmp_path / "checkpoints")
    assert 6 <= step < 400 and f"checkpoint {path} saved" in err
    assert load_safe(path)["step"] == step
    assert not [p for p in tmp_path.rglob("*") if ".tmp." in p.name]


@pytest.mark.slow
def test_ddp_two_ranks_kill9_then_resume_is_bitwise_identical(tmp_path):
    """Both ranks die at the same step (as when a node goes); the relaunch resumes exactly."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not available")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def launch(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(TOY), str(run_dir),
                               "--steps", "20", "--ckpt-every", str(CKPT_EVERY), *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    ref = launch(tmp_path / "reference")
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert launch(tmp_path / "killed", "--kill", "step:12").returncode != 0
    resumed = launch(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (ref_weights, ref_opt), (weights, opt) = _state(tmp_path / "reference"), _state(tmp_path / "killed")
    _assert_equal_tensors(weights, ref_weights, "model")
    _assert_equal_tensors(opt, ref_opt, "optimizer")
    assert (tmp_path / "killed" / "metrics.jsonl").read_text() == (tmp_path / "reference" / "metrics.jsonl").read_text()
