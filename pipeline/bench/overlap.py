"""`dkp-pipeline bench depth-overlap`: the depth stage's pipelining, proven on a CPU with stand-ins.

A stand-in model that takes ``T`` ms a batch (it sleeps, as a GPU kernel frees the host) and a data side that takes
``H`` ms a batch (each DataLoader worker sleeps ``H x workers`` ms per batch on top of its real decoding of tiny
frames, so the workers together deliver a batch every ``H`` ms) run through the real stage (``run_pipeline``,
``only="depth"``: the batch planner, the workers, the lane, the FIFO, the background HDF5 writer). Per (T, H):

==================  ==============================================================================================
case                what runs
==================  ==============================================================================================
``serial``          the baseline: no workers (the main thread reads each batch), the model on the host lane:
                    nothing overlaps, so a batch costs T + H
``host``            W workers (CPU preprocessing in them, as a CPU run does), the model in the main thread: data
                    overlaps the model, the main thread's own work adds to T
``gpu_stand_in``    W workers, the model on the stand-in GPU lane (``lanes.ThreadLane``: copy-in, compute and
                    copy-out each a FIFO thread, ordered like CUDA streams by events), device preprocessing (the
                    GPU default: the resize runs on the copy-in lane): the host only launches and fetches, one
                    wait per batch
==================  ==============================================================================================

The rate is the stage's own steady rate (``frames_after_first_batch / seconds_after_first_batch`` in its
record: the workers' start-up and the first batch's read excluded), compared with ``1 / max(T, H)`` (full
overlap) and ``1 / (T + H)`` (none). Host waits: the lane's fetches per batch (the one wait allowed), and every
``.item()``/``.tolist()``/``bool()``/``float()``/``int()``/``.cpu()``/``torch.cuda.synchronize`` call the
stage's own code makes while it runs (each a host sync on CUDA), counted by patching torch in the bench process.
"""
from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from pipeline.bench.harness import EnvVar

MODEL_TYPE = "dpt_levit_224"  # one network shape for every frame (224 x 224)
GOAL = 0.9  # frames/s >= GOAL / max(T, H) (issue 22)
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu")


class StandInModel:
    """A depth model that takes ``seconds`` a batch: sleeps (frees the host like an asynchronous GPU forward;
    on the stand-in lane, its compute thread) and returns zeros of the network's output shape (B, h, w)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, x):
        import torch

        time.sleep(self.seconds)
        return torch.zeros(x.shape[0], *x.shape[2:])


@contextmanager
def stand_ins(model_s: float, data_s_per_worker: float):
    """The stage's ``load_model`` gives the stand-in model; each worker sleeps ``data_s_per_worker`` per batch."""
    import torch

    from pipeline.stages.depth import compute
    from pipeline.stages.depth.frames import BatchedFrames

    old_load, old_extra = compute.load_model, BatchedFrames.extra_work_s
    compute.load_model = lambda d, sha, **kw: (StandInModel(model_s), torch.device("cpu"), None)
    BatchedFrames.extra_work_s = data_s_per_worker
    try:
        yield
    finally:
        compute.load_model, BatchedFrames.extra_work_s = old_load, old_extra


@contextmanager
def count_host_syncs(counts: dict, roots=None):
    """Count, per method name, the calls code under ``roots`` (default: the project's pipeline/ and dkp_core/)
    makes to torch methods that wait for the device on CUDA, in every thread of this process, while the block
    runs."""
    import torch

    repo = Path(__file__).resolve().parents[2]
    roots = tuple(str(r) for r in (roots or (repo / "pipeline", repo / "dkp_core")))
    here = str(Path(__file__).resolve())
    saved = {}

    def wrap(owner, name):
        real = getattr(owner, name)
        saved[(owner, name)] = real

        def counted(*a, **kw):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(roots) and caller != here:
                counts[name] = counts.get(name, 0) + 1
            return real(*a, **kw)

        setattr(owner, name, counted)

    for name in SYNC_METHODS:
        wrap(torch.Tensor, name)
    wrap(torch.cuda, "synchronize")
    try:
        yield counts
    finally:
        for (owner, name), real in saved.items():
            setattr(owner, name, real)


def write_tiny_frames(folder: Path, n: int, size: int = 16) -> None:
    import cv2
    import numpy as np

    folder.mkdir(parents=True)
    for k in range(n):
        img = np.full((size, size, 3), k % 256, np.uint8)
        cv2.imwrite(str(folder / f"f{k:05d}.png"), img)


def run_overlap_case(root: Path, data_root: Path, *, name: str, model_ms: float, data_ms: float, workers: int,
                     lane: Optional[str], batch: int, shard_size: int, preprocess: str) -> dict:
    """One stage run with the stand-ins; its rate, what held it back, and the host waits it made."""
    from rich.console import Console

    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    weights = root / "stand-in.pt"
    weights.write_bytes(b"stand-in: never read")
    exp = root / f"{name}.yaml"
    exp.write_text(json.dumps({"name": name, "data": {"manifest": "folder", "root": str(data_root)},
                               "depth": {"provider": "midas", "model_type": MODEL_TYPE, "weights": str(weights),
                                         "device": "cpu", "precision": "fp32", "preprocess": preprocess,
                                         "batch_size_inference": batch, "num_workers": workers,
                                         "shard_size": shard_size, "storage_dtype": "float32"}}))
    store = root / f"store-{name}"
    counts: dict = {}
    with stand_ins(model_ms / 1e3, data_ms / 1e3 * max(1, workers)), count_host_syncs(counts):
        run_pipeline(load_config(str(exp)), str(store), only="depth", until="depth",
                     console=Console(file=io.StringIO(), width=200), stage_options={"lane": lane} if lane else {})
    (cache,) = list((store / "depth").iterdir())
    c = json.loads((cache / "artifact.json").read_text())["compute"]
    fps = c["frames_after_first_batch"] / c["seconds_after_first_batch"]
    t, h = model_ms / 1e3, data_ms / 1e3
    full, none = batch / max(t, h), batch / (t + h)
    return {"frames_per_s": fps, "frames": c["frames"], "batches": c["batches"], "batch": batch, "workers": workers,
            "lane": c["lane"], "model_ms": model_ms, "data_ms": data_ms,
            "vs_full_overlap": round(fps / full, 4), "vs_no_overlap": round(fps / none, 4),
            "fetches_per_batch": round(c["fetches"] / c["batches"], 3),
            "host_syncs_in_stage_code": sum(counts.values()), "host_syncs_by_method": counts,
            "seconds_model": c["seconds_model"], "seconds_waiting_for_data": c["seconds_waiting_for_data"],
            "seconds_waiting_for_device": c["seconds_waiting_for_device"],
            "seconds_waiting_for_writer": c["seconds_waiting_for_writer"], "limit": c["limit"]}


def case_depth_overlap(p: dict) -> dict:
    """Every (T, H) pair of ``p["pairs"]`` x the three cases (module docstring), on one set of tiny frames.

    torch runs one intra-op thread here: the stage's real host work on 16 px frames is tiny, and several OpenMP
    threads spinning beside the workers and the lane's threads cost more than they give (measured: an isfinite
    over 8 x 224^2 took 80 ms with 2 threads on 2 busy cores, 1 ms with one)."""
    import torch

    torch.set_num_threads(1)
    cases = {}
    with tempfile.TemporaryDirectory(prefix="dkp-bench-overlap-") as tmp, EnvVar("DKP_CACHE_DIR",
                                                                                f"{tmp}/dkp-cache"):
        root = Path(tmp)
        n = p["batches"] * p["batch"]
        write_tiny_frames(root / "data" / "images", n)
        for t, h in p["pairs"]:
            # the CPU's shape with its defaults (resize in the workers) and the GPU's (resize on the device lane)
            for case, workers, lane, pre in (("serial", 0, None, "cpu"), ("host", p["workers"], None, "cpu"),
                                             ("gpu_stand_in", p["workers"], "threads", "device")):
                name = f"T{t:g}_H{h:g}/{case}"
                cases[name] = run_overlap_case(root, root / "data", name=name.replace("/", "-"), model_ms=t,
                                               data_ms=h, workers=workers, lane=lane, batch=p["batch"],
                                               shard_size=p["shard_size"], preprocess=pre)
    return {"cases": cases}


def bench_depth_overlap(*, batch: int, size: int, steps: int, device, isolate: bool = True,
                        pairs=((100, 100), (100, 50), (50, 100)), workers: int = 2, shard_size: int = 64) -> dict:
    """The bench (module docstring). ``batch``: frames per batch; ``steps``: batches per case (>= 20 recommended:
    the first batch is excluded from the rate); ``size`` is unused (the frames are 16 px: the stand-ins set the
    pace)."""
    from pipeline.bench.harness import ratio, run_case
    from pipeline.errors import ConfigError

    if device.type != "cpu":
        raise ConfigError("bench depth-overlap proves the pipelining on a CPU with stand-ins; use --device cpu "
                          "(on a GPU, `bench gpu` measures the stage against the bare model)")
    params = {"pairs": [list(map(float, pr)) for pr in pairs], "batch": batch, "batches": max(steps, 4),
              "workers": workers, "shard_size": shard_size}
    res = run_case("depth_overlap", params, isolate=isolate, timeout=3600)
    cases = res["cases"]
    ratios, goals = {}, {}
    for t, h in params["pairs"]:
        pre = f"T{t:g}_H{h:g}"
        for case in ("host", "gpu_stand_in"):
            c = cases[f"{pre}/{case}"]
            ratios[f"{pre} frames_per_s {case}/serial"] = ratio(c["frames_per_s"], cases[f"{pre}/serial"]["frames_per_s"])
            goals[f"{pre} {case} frames_per_s x max(T, H) / batch"] = {
                "goal": GOAL, "value": c["vs_full_overlap"], "met": c["vs_full_overlap"] >= GOAL}
        g = cases[f"{pre}/gpu_stand_in"]
        goals[f"{pre} gpu_stand_in host waits per batch beyond the fetch"] = {
            "goal": 0, "value": g["fetches_per_batch"] - 1 + g["host_syncs_in_stage_code"] / max(1, g["batches"]),
            "met": g["fetches_per_batch"] <= 1 and g["host_syncs_in_stage_code"] == 0, "op": "<="}
    return {"baseline": "serial (no workers, model on the host: T + H a batch)", "cases": cases, "ratios": ratios,
            "goals": goals, "setup": {"model_type": MODEL_TYPE, "frame_size": 16, "batch": batch,
                                      "batches": params["batches"], "workers": workers, "shard_size": shard_size,
                                      "data_ms": "per batch, all workers together (each sleeps H x workers)",
                                      "rate": "frames_after_first_batch / seconds_after_first_batch (stage record)"}}
