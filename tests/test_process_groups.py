"""Process groups under torchrun: the depth stage's long-timeout gloo barrier group is never the training group,
CUDA training always reduces over NCCL, training collectives use ordinary timeouts.

The NCCL side cannot run without GPUs, so the choice is tested with torch.distributed mocked (a CUDA training
gets a group with NCCL whatever group exists before it; DDP, SyncBatchNorm, the metrics all-reduce and the
barriers all receive that group); the gloo side runs for real: 2 CPU ranks under torchrun (free port).
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO


class _FakeDist:
    """What runtime.setup_distributed / training_group call on torch.distributed, recorded."""

    def __init__(self, initialised: bool, backend: str) -> None:
        self.initialised, self.backend = initialised, backend
        self.calls: list[tuple] = []
        self.group = type("Group", (), {})  # stands for dist.group

    def is_available(self):
        return True

    def is_initialized(self):
        return self.initialised

    def init_process_group(self, backend=None, timeout=None, **kw):
        self.calls.append(("init_process_group", backend, timeout))
        self.initialised, self.backend = True, backend

    def new_group(self, backend=None, timeout=None, **kw):
        self.calls.append(("new_group", backend, timeout))
        return f"group({backend})"

    def get_backend(self, group=None):
        return self.backend if group in (None, "WORLD") else group[len("group("):-1]

    def get_rank(self):
        return 0

    def get_world_size(self):
        return 2


@pytest.fixture
def fake_cuda_rank(monkeypatch):
    """Rank 0 of 2 under torchrun on a (pretended) CUDA device; returns a factory of the faked torch.distributed."""
    from pipeline.training import runtime

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(runtime, "resolve_device", lambda setting, local_rank=0: torch.device("cuda", local_rank))
    monkeypatch.setattr(runtime.torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(runtime, "destroy_at_exit", lambda: None)
    monkeypatch.setattr(runtime, "_NCCL_GROUP", None)

    def make(initialised: bool, backend: str = "gloo") -> _FakeDist:
        fake = _FakeDist(initialised, backend)
        fake.group.WORLD = "WORLD"
        monkeypatch.setattr(runtime, "dist", fake)
        return fake

    return make


def test_cuda_training_joins_a_gloo_plus_nccl_group_with_an_ordinary_timeout(fake_cuda_rank):
    from pipeline.training import runtime

    fake = fake_cuda_rank(initialised=False)
    env, device = runtime.setup_distributed("auto")
    assert device == torch.device("cuda", 0) and env.world_size == 2 and env.initialised_here
    assert fake.calls == [("init_process_group", "cpu:gloo,cuda:nccl", runtime.TRAIN_TIMEOUT)]
    assert env.group == "WORLD" and runtime.TRAIN_TIMEOUT <= datetime.timedelta(minutes=30)
    runtime.check_training_group(env.group, device)  # NCCL in it: fine


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo,cuda:gloo"])
def test_cuda_training_never_reduces_over_a_gloo_only_group(fake_cuda_rank, backend):
    """A default group without NCCL (made by other code, or by the depth stage before this fix) is not reused:
    training makes an NCCL group of its own, once per process."""
    from pipeline.errors import DkpError
    from pipeline.training import runtime

    fake = fake_cuda_rank(initialised=True, backend=backend)
    env, device = runtime.setup_distributed("auto")
    assert not env.initialised_here and env.group == "group(nccl)"
    assert fake.calls == [("new_group", "nccl", runtime.TRAIN_TIMEOUT)]
    assert runtime.setup_distributed("auto")[0].group == "group(nccl)" and len(fake.calls) == 1  # made once
    with pytest.raises(DkpError, match=f"backend '{backend}'.*needs NCCL"):
        runtime.check_training_group("WORLD", device)


def test_cpu_training_keeps_gloo(fake_cuda_rank, monkeypatch):
    from pipeline.training import runtime

    fake = fake_cuda_rank(initialised=False)
    monkeypatch.setattr(runtime, "resolve_device", lambda setting, local_rank=0: torch.device("cpu"))
    env, device = runtime.setup_distributed("cpu")
    assert fake.calls == [("init_process_group", "gloo", runtime.TRAIN_TIMEOUT)] and env.group == "WORLD"
    runtime.check_training_group(env.group, device)


def test_every_training_collective_gets_the_training_group(tmp_path, monkeypatch):
    """Wiring: with a 2-rank Dist whose group is a sentinel, DDP, the sync point's all-reduce, the resume check
    and the final barrier all receive that group (torch.distributed faked: the collectives are identities)."""
    import importlib.util

    from pipeline.training import loop as loop_mod
    from pipeline.training import runtime
    from pipeline.training.runtime import Dist

    spec = importlib.util.spec_from_file_location("train_toy", REPO / "tests" / "faults" / "train_toy.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    sentinel = object()
    seen: list[tuple[str, object]] = []
    monkeypatch.setattr(loop_mod, "setup_distributed", lambda device: (Dist(0, 2, 0, False, sentinel),
                                                                       torch.device("cpu")))
    monkeypatch.setattr(runtime.dist, "all_reduce", lambda t, op=None, group=None: seen.append(("all_reduce", group)))
    monkeypatch.setattr(runtime.dist, "barrier", lambda group=None, **kw: seen.append(("barrier", group)))
    monkeypatch.setattr(runtime.dist, "get_backend", lambda group=None: "gloo")

    class FakeDDP(torch.nn.Module):
        def __init__(self, module, device_ids=None, process_group=None):
            super().__init__()
            seen.append(("ddp", process_group))
            self.module = module

        def forward(self, *a, **kw):
            return self.module(*a, **kw)

    monkeypatch.setattr(loop_mod.nn.parallel, "DistributedDataParallel", FakeDDP)
    torch.manual_seed(0)
    loop_mod.train(run_dir=tmp_path, model=toy.ToyNet(norm="group"), dataset=toy.ToyDataset(n=8),
                   step_fn=toy.toy_step, settings=toy.toy_settings(steps=4, log_every=2, checkpoint_every=2),
                   config={"toy": True}, config_hash="x")
    assert {g for _, g in seen} == {sentinel}, seen
    # the resume check, DDP, the two sync points (steps 2 and 4), the final barrier
    assert [k for k, _ in seen] == ["all_reduce", "ddp", "all_reduce", "all_reduce", "barrier"]


_RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, {repo!r})
    from pipeline.stages.depth.stage import _init_distributed
    from pipeline.training.runtime import TRAIN_TIMEOUT, setup_distributed

    def timeout(group):
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()

    barrier_group = _init_distributed(int(os.environ["WORLD_SIZE"]))  # what `run` does first, in the depth stage
    barrier_timeout = timeout(barrier_group)
    dist.barrier(group=barrier_group)
    dist.destroy_process_group(barrier_group)
    env, device = setup_distributed("cpu")  # then teach and distill
    t = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(t, group=env.group)
    out = {{"barrier_timeout_s": barrier_timeout, "train_timeout_s": timeout(env.group),
           "same_group": env.group is barrier_group, "backend": str(dist.get_backend(env.group)),
           "world": env.world_size, "sum": t.item(), "expected_s": TRAIN_TIMEOUT.total_seconds()}}
    with open(os.path.join({out!r}, f"rank{{env.rank}}.json"), "w") as f:
        json.dump(out, f)
    # torch's documented shutdown: all ranks done, then destroy. Without it this script's rank 1 twice died at
    # exit with SIGABRT ("terminate called without an active exception") on a heavily loaded machine (2 of ~70
    # runs; 0 of 80 when tried again): the same exit path as `run` under torchrun, which destroys at exit too.
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun/gloo test written for Linux")
def test_depth_barrier_group_is_not_the_training_group_two_cpu_ranks(tmp_path):
    """For real, 2 gloo ranks (torchrun --standalone: a free port): after the depth stage's barrier, training
    reduces over the process's group with the 30-minute timeout, not over the 48-hour barrier group."""
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for attempt in range(2):
        for rank in (0, 1):
            (tmp_path / f"rank{rank}.json").unlink(missing_ok=True)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        # One retry, for one signature only: gloo's SIGABRT of a rank at shutdown ("terminate called without an
        # active exception"), seen in 2 of 4 full-suite runs on the loaded 2-core VM of 2026-12-06 (and in 2 of ~70
        # runs of this script when it was written), never in 12 runs of the script alone beside two busy loops.
        # Any other failure, or the same one twice, fails the test.
        if r.returncode == 0 or attempt or "terminate called without an active exception" not in r.stderr:
            break
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["barrier_timeout_s"] == 48 * 3600 and not got["same_group"]
        assert got["train_timeout_s"] == got["expected_s"] == 1800
        assert got["backend"] == "gloo" and got["world"] == 2 and got["sum"] == 3.0
