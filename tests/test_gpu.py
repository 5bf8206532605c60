"""The trainer's CUDA paths: NCCL DDP, CUDA RNG state across a resume, pinned non-blocking copies, no host sync
between sync points under fp16 + GradScaler + fused AdamW.

Marked ``gpu``: skipped where torch sees no CUDA (CI, the development VMs; tests/conftest.py), run by the device
script when a GPU machine is lent. Written without a GPU, so **never run yet**: a failure on the first GPU run may be
the test's as well as the code's. Everything CPU can check of the same paths runs in tests/test_train.py,
tests/test_host_syncs.py and tests/test_process_groups.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.gpu
TOY_PATH = REPO / "tests" / "faults" / "train_toy.py"
_spec = importlib.util.spec_from_file_location("train_toy", TOY_PATH)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def _run(run_dir: Path, *, step_fn=toy.toy_step, **settings):
    from pipeline.training import train

    torch.manual_seed(0)
    model = toy.ToyNet(norm="batch", dropout=0.1)
    s = toy.toy_settings(**({"steps": 12, "device": "cuda"} | settings))
    res = train(run_dir=run_dir, model=model, dataset=toy.ToyDataset(n=24, seed=s.seed), step_fn=step_fn,
                settings=s, config={"toy": True}, config_hash="gpu")
    return model, res


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL DDP needs two GPUs (ranks cannot share one)")
def test_nccl_ddp_two_ranks_match_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = ["--plain", "--norm", "group", "--steps", "8", "--log-every", "1", "--ckpt-every", "4", "--device", "cuda"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(TOY_PATH), str(tmp_path / "two"), *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "process group backend cpu:gloo,cuda:nccl" in two.stderr
    one = subprocess.run([sys.executable, str(TOY_PATH), str(tmp_path / "one"), *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    losses = {n: [json.loads(line)["loss"] for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
              for n in ("one", "two")}
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=1e-4)


def test_cuda_rng_state_is_checkpointed_and_a_resume_matches(tmp_path):
    """Dropout draws from the CUDA generator: its state is in the checkpoint and reseeded per step, so a crashed
    and resumed run ends where an uninterrupted one does (up to CUDA's non-deterministic kernels)."""
    from pipeline.store.checkpoint import load_safe

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    ref, _ = _run(tmp_path / "ref")

    def crashing(model, batch, ctx):
        if ctx.step == 8:
            raise RuntimeError("crash")
        return toy.toy_step(model, batch, ctx)

    with pytest.raises(RuntimeError, match="crash"):
        _run(tmp_path / "run", step_fn=crashing)
    ckpt = load_safe(tmp_path / "run" / "checkpoints" / "step-00000005.pt")
    assert len(ckpt["rng"]["cuda"]) == torch.cuda.device_count()
    model, res = _run(tmp_path / "run")
    assert res.resumed_from == 5 and res.device == "cuda:0"
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_arrive_pinned_and_are_copied_without_blocking(tmp_path, monkeypatch, workers):
    from pipeline.training import loop

    seen = []
    real = loop.to_device

    def spy(batch, device):
        seen.append(all(t.is_pinned() for t in batch.values()))
        out = real(batch, device)
        assert all(t.device.type == "cuda" for t in out.values())
        return out

    monkeypatch.setattr(loop, "to_device", spy)
    _run(tmp_path, steps=3, num_workers=workers)
    assert seen == [True] * 3


def test_fp16_fused_adamw_steps_do_not_sync(tmp_path):
    """torch's sync debug mode (GPU only) sees no sync in the steps between two sync points: losses on the device,
    fp16 GradScaler with fused AdamW (the overflow check stays on the device), pinned non-blocking batches."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        marks: dict[int, int] = {}

        def step_fn(model, batch, ctx):
            marks[ctx.step] = len(caught)  # warnings from here to the next step's start belong to this step
            return toy.toy_step(model, batch, ctx)

        torch.cuda.set_sync_debug_mode("warn")
        try:
            _run(tmp_path, step_fn=step_fn, steps=8, amp="fp16", log_every=4, checkpoint_every=4)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    per_step = {s: marks.get(s + 1, len(caught)) - marks[s] for s in range(8)}
    syncing = {s: n for s, n in per_step.items() if n and s not in (3, 7)}  # steps 3 and 7 end at a sync point
    assert not syncing, (syncing, [str(w.message)[:200] for w in caught][:10])
