"""The benches of `dkp-pipeline bench` (``BENCHES``), ``run_bench`` (one JSON record) and ``bench_command`` (the CLI).

Each bench runs its cases through the harness (alone, then interleaved) and derives its ratios; the cases
themselves are in ``training.py`` and ``depth.py``, the GPU suite in ``gpu.py``, ``precision`` in ``precision.py``.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.bench.depth import DEPTH_FRAMES, DEPTH_GOALS, DEPTH_MODEL
from pipeline.bench.frames import bench_frames
from pipeline.bench.scale import bench_scale
from pipeline.bench.gpu import bench_gpu
from pipeline.bench.gpu_report import gpu_markdown
from pipeline.bench.harness import WARMUP, bench_device, compare, ratio, run_case, speed
from pipeline.bench.depth_precision import bench_depth_precision
from pipeline.bench.overlap import bench_depth_overlap
from pipeline.bench.precision import bench_precision
from pipeline.bench.writer import bench_depth_writer
from pipeline.bench.training import BASELINE_WIDTH, N_KEYPOINTS, PRESET_KEYPOINTS, WIDTH
from pipeline.errors import ConfigError

WHATS = ("teach", "train-step", "side-by-side", "depth", "depth-overlap", "depth-precision", "depth-writer", "cache",
         "teacher-cache", "recon-loss", "gpu", "precision", "video", "frames", "scale")
ROUNDS = 2  # side-by-side: one / side by side, alternated this many times


def bench_teach(*, batch: int, size: int, steps: int, device, isolate: bool = True) -> dict:
    base = {"device": str(device), "batch": batch, "size": size, "steps": steps}
    b_name, w_name = f"width{BASELINE_WIDTH}", f"width{WIDTH}"
    specs = {b_name: ("autolink_step", base | {"width": BASELINE_WIDTH}),
             w_name: ("autolink_step", base | {"width": WIDTH})}
    if device.type == "cuda":
        specs[f"{w_name}_amp"] = ("autolink_step", base | {"width": WIDTH, "amp": True})
    cases = compare(specs, steps=steps, isolate=isolate)
    b, w = cases[b_name], cases[w_name]
    ratios = {f"steps_per_s {w_name}/{b_name}": ratio(speed(w), speed(b)),
              f"peak_mem_growth {w_name}/{b_name}": ratio(w["peak_mem_growth_mib"], b["peak_mem_growth_mib"])}
    if device.type == "cuda":
        a = cases[f"{w_name}_amp"]
        ratios[f"steps_per_s {w_name} amp/fp32"] = ratio(speed(a), speed(w))
        ratios[f"peak_mem_growth {w_name} amp/fp32"] = ratio(a["peak_mem_growth_mib"], w["peak_mem_growth_mib"])
    return {"baseline": b_name, "cases": cases, "ratios": ratios,
            "setup": {"n_keypoints": N_KEYPOINTS, "heatmap_size": size // 4, "recon_loss": "l1ssim",
                      "optimizer": "AdamW"}}


def bench_train_step(*, batch: int, size: int, steps: int, device, isolate: bool = True) -> dict:
    """The synthetic preset's training step (width 16, K = 10) in NCHW (the baseline), channels_last (the
    trainer's default) and channels_last under bf16 autocast (``amp: bf16``; fast only where the CPU has
    bf16 matrix units, e.g. AMX)."""
    base = {"device": str(device), "batch": batch, "size": size, "steps": steps, "width": BASELINE_WIDTH,
            "n_keypoints": PRESET_KEYPOINTS}
    specs = {"nchw": ("autolink_step", base), "channels_last": ("autolink_step", base | {"channels_last": True}),
             "channels_last_bf16": ("autolink_step", base | {"channels_last": True, "amp": "bf16"})}
    cases = compare(specs, steps=steps, isolate=isolate)
    ratios = {}
    for a, b in (("channels_last", "nchw"), ("channels_last_bf16", "channels_last")):
        ratios[f"steps_per_s {a}/{b}"] = ratio(speed(cases[a]), speed(cases[b]))
        ratios[f"peak_mem_growth {a}/{b}"] = ratio(cases[a]["peak_mem_growth_mib"], cases[b]["peak_mem_growth_mib"])
    return {"baseline": "nchw", "cases": cases, "ratios": ratios,
            "setup": {"width": BASELINE_WIDTH, "n_keypoints": PRESET_KEYPOINTS, "heatmap_size": size // 4,
                      "recon_loss": "l1ssim", "optimizer": "AdamW"}}


def bench_side_by_side(*, batch: int, size: int, steps: int, device, isolate: bool = True, rounds: int = ROUNDS) -> dict:
    """What `run` does with the student and the baseline on a CPU: the synthetic preset's step (width 16, K = 10,
    channels_last, bf16 autocast) in one process on all of torch's N threads (the baseline, ``one_process``)
    against N processes of one thread each, started together (``side_by_side``): steps per second in all, over
    the processes' common window. The two alternate ``rounds`` times so both see the same load; the ratio is
    that of the medians. Always in fresh processes (``isolate`` is ignored: the point is several of them)."""
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    import torch

    if device.type != "cpu":
        raise ConfigError("bench side-by-side measures CPU processes sharing the cores; use --device cpu")
    n = torch.get_num_threads()
    if n < 2:
        raise ConfigError(f"bench side-by-side: torch has {n} thread here (OMP_NUM_THREADS?); it needs 2 or more")
    params = {"device": "cpu", "batch": batch, "size": size, "steps": steps, "width": BASELINE_WIDTH,
              "n_keypoints": PRESET_KEYPOINTS, "channels_last": True, "amp": "bf16"}

    def window(threads: list[int]) -> dict:
        with tempfile.TemporaryDirectory(prefix="dkp-bench-") as tmp, ThreadPoolExecutor(len(threads)) as pool:
            go = Path(tmp) / "go"
            ready = [Path(tmp) / f"ready-{i}" for i in range(len(threads))]
            futures = [pool.submit(run_case, "train_window", {"params": params, "threads": t, "ready": str(r),
                                                              "go": str(go)}) for t, r in zip(threads, ready)]
            while not all(r.exists() for r in ready):
                if any(f.done() for f in futures):
                    break  # a process failed before its warm-up ended: its error is raised below
                time.sleep(0.01)
            go.touch()
            res = [f.result() for f in futures]
        wall = max(r["end"] for r in res) - min(r["start"] for r in res)
        return {"steps_per_s": sum(r["steps"] for r in res) / wall, "wall_s": round(wall, 3),
                "processes": len(threads), "threads_each": threads[0]}

    results: dict[str, list[dict]] = {"one_process": [], "side_by_side": []}
    for _ in range(rounds):
        results["one_process"].append(window([n]))
        results["side_by_side"].append(window([1] * n))
    cases = {}
    for name, rs in results.items():
        cases[name] = {"steps_per_s": statistics.median(r["steps_per_s"] for r in rs),
                       "rounds_steps_per_s": [round(r["steps_per_s"], 3) for r in rs],
                       "processes": rs[0]["processes"], "threads_each": rs[0]["threads_each"]}
    return {"baseline": "one_process", "cases": cases,
            "ratios": {"steps_per_s side_by_side/one_process": ratio(cases["side_by_side"]["steps_per_s"],
                                                                     cases["one_process"]["steps_per_s"])},
            "setup": {"width": BASELINE_WIDTH, "n_keypoints": PRESET_KEYPOINTS, "heatmap_size": size // 4,
                      "recon_loss": "l1ssim", "optimizer": "AdamW", "channels_last": True, "amp": "bf16",
                      "rounds": rounds}}


RECON_LOSSES = ("l1ssim", "l1", "mse", "perceptual")


def bench_recon_loss(*, batch: int, size: int, steps: int, device, isolate: bool = True) -> dict:
    """One training step at the synthetic preset's width with each reconstruction loss; l1ssim is the baseline.

    The perceptual case uses random VGG16 weights: the cost is that of the ImageNet weights (same network),
    what it would learn is not (docs/results.md measures the weight-free losses' quality)."""
    base = {"device": str(device), "batch": batch, "size": size, "steps": steps, "width": BASELINE_WIDTH}
    cases = compare({n: ("autolink_step", base | {"recon_loss": n}) for n in RECON_LOSSES}, steps=steps,
                     isolate=isolate)
    b = cases["l1ssim"]
    ratios = {}
    for n in RECON_LOSSES[1:]:
        ratios[f"steps_per_s {n}/l1ssim"] = ratio(speed(cases[n]), speed(b))
        ratios[f"peak_mem_growth {n}/l1ssim"] = ratio(cases[n]["peak_mem_growth_mib"], b["peak_mem_growth_mib"])
    return {"baseline": "l1ssim", "cases": cases, "ratios": ratios,
            "setup": {"width": BASELINE_WIDTH, "n_keypoints": N_KEYPOINTS, "heatmap_size": size // 4,
                      "optimizer": "AdamW", "perceptual": "VGG16 to relu4_3 at 224x224, random weights (same cost)"}}


def bench_teacher_cache(*, batch: int, size: int, steps: int, device, isolate: bool = True) -> dict:
    base = {"device": str(device), "batch": batch, "size": size, "steps": steps}
    cases = compare({"live_teacher": ("distill_step", base | {"mode": "live"}),
                      "cached_embeddings": ("distill_step", base | {"mode": "cached"})}, steps=steps, isolate=isolate)
    live, cached = cases["live_teacher"], cases["cached_embeddings"]
    return {"baseline": "live_teacher", "cases": cases,
            "ratios": {"speedup cached/live": ratio(speed(cached), speed(live)),
                       "target_s cached/live": ratio(cached["target_s"], live["target_s"]),
                       "target share of a live step": ratio(live["target_s"], live["s_per_step"]),
                       "peak_mem_growth cached/live": ratio(cached["peak_mem_growth_mib"],
                                                             live["peak_mem_growth_mib"])},
            "setup": {"width": WIDTH, "n_keypoints": N_KEYPOINTS, "layer": "logits", "recon_loss": "l1ssim"}}


def bench_depth(*, batch: int, size: int, steps: int, device, isolate: bool = True, model: str = DEPTH_MODEL,
                frames: int = DEPTH_FRAMES) -> dict:
    """(a) bare model, (b) the full ``depth`` stage, (c) a run.py-style loop, on the same frames in one process.

    ``steps`` is unused (the frame count sets the work); ``size`` is the side of the generated frames."""
    from dkp_core.midas import get_spec, list_models

    try:
        spec = get_spec(model)
    except ValueError:
        raise ConfigError(f"bench depth --model {model!r}: not a MiDaS 3.1 model; valid: {', '.join(list_models())}") \
            from None
    if not isinstance(frames, int) or frames < 2 * batch:
        raise ConfigError(f"bench depth --frames {frames!r}: must be an integer >= 2 x --batch ({2 * batch}); the bare "
                          "model and the run.py loop are timed in two halves around the stage")
    if device.type == "cuda" and (device.index or 0) != 0:
        raise ConfigError(f"bench depth --device {device}: the depth stage runs on cuda:LOCAL_RANK (cuda:0 here); "
                          f"use CUDA_VISIBLE_DEVICES={device.index} with --device cuda")
    p = {"device": str(device), "model_type": model, "frames": frames, "size": size, "batch": batch}
    res = run_case("depth_abc", p, isolate=isolate)
    cases = res["cases"]
    a, b, c = (cases[n]["frames_per_s"] for n in ("bare_model", "stage", "run_py_loop"))
    ratios = {"frames_per_s stage/bare_model": ratio(b, a), "frames_per_s stage/run_py_loop": ratio(b, c),
              "frames_per_s stage_wall/bare_model": ratio(cases["stage"]["frames_per_s_wall"], a)}
    goal = DEPTH_GOALS[device.type]
    goals = {k: {"goal": g, "value": ratios[k], "met": ratios[k] is not None and ratios[k] >= g}
             for k, g in goal.items()}
    return {"baseline": "bare_model (a) and run_py_loop (c)", "cases": cases, "ratios": ratios, "goals": goals,
            "setup": {"model_type": model, "net_size": [spec.net_h, spec.net_w], "frames": frames,
                      "frame_size": [size, size], **res["setup"]}}


def bench_cache(*, batch: int, size: int, steps: int, device=None, isolate: bool = True) -> dict:
    """Depth cache write/read (shards of ``batch`` frames) vs one ``np.save`` file per frame."""
    import cv2
    import numpy as np

    from pipeline.depth_cache import CacheWriter, DepthCacheReader, finalize

    n = batch * steps
    rng = np.random.default_rng(0)
    # Smooth maps like MiDaS output (compression depends on it): upsampled 8x8 noise plus a ramp.
    maps = [cv2.resize(rng.random((8, 8), dtype=np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
            + np.linspace(0, 1, size, dtype=np.float32)[None, :] + 1.0 for _ in range(n)]

    def du(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    with tempfile.TemporaryDirectory(prefix="dkp-bench-cache-") as tmp:
        root = Path(tmp)
        npy = root / "npy"
        npy.mkdir()
        t0 = time.perf_counter()
        for i, d in enumerate(maps):
            np.save(npy / f"{i:06d}.npy", d)
        t_npy_w = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = [np.load(npy / f"{i:06d}.npy") for i in range(n)]
        t_npy_r = time.perf_counter() - t0
        assert len(back) == n

        cdir = root / "cache"
        t0 = time.perf_counter()
        w = CacheWriter(cdir, spec={"bench": True}, n_frames=n, shard_size=batch)
        for plan in w.shards_todo():
            ids = [f"f{i:06d}" for i in range(plan.start, plan.stop)]
            w.write_shard(plan, ids, ["xxh3:0"] * plan.n, maps[plan.start:plan.stop], [True] * plan.n)
        finalize(cdir)
        t_c_w = time.perf_counter() - t0
        t0 = time.perf_counter()
        reader = DepthCacheReader(cdir)
        got = [reader.read(i) for i in range(n)]
        t_c_r = time.perf_counter() - t0
        err = max(float(np.abs(g - m).max() / m.max()) for g, m in zip(got, maps))
        cases = {
            "npy_write": {"frames_per_s": n / t_npy_w, "bytes": du(npy)},
            "npy_read": {"frames_per_s": n / t_npy_r},
            "cache_write": {"frames_per_s": n / t_c_w, "bytes": du(cdir / "shards"), "storage_dtype": "float16"},
            "cache_read": {"frames_per_s": n / t_c_r, "max_rel_error": err},
        }
    return {"baseline": "one np.save file per frame (float32)", "cases": cases,
            "ratios": {"write frames_per_s cache/npy": ratio(cases["cache_write"]["frames_per_s"],
                                                              cases["npy_write"]["frames_per_s"]),
                       "read frames_per_s cache/npy": ratio(cases["cache_read"]["frames_per_s"],
                                                             cases["npy_read"]["frames_per_s"]),
                       "bytes cache/npy": ratio(cases["cache_write"]["bytes"], cases["npy_write"]["bytes"])},
            "setup": {"n_frames": n, "shard_size": batch, "map": f"{size}x{size} float32",
                      "page_cache": "warm (reads follow writes)"}}


BENCHES: dict[str, Callable[..., dict]] = {
    "teach": bench_teach,
    "train-step": bench_train_step,
    "side-by-side": bench_side_by_side,
    "teacher-cache": bench_teacher_cache,
    "recon-loss": bench_recon_loss,
    "depth": bench_depth,
    "depth-overlap": bench_depth_overlap,  # the depth stage's pipelining with stand-ins (overlap.py, issue 22)
    "depth-precision": bench_depth_precision,  # depth values under bf16/fp16 against fp32 (depth_precision.py)
    "depth-writer": bench_depth_writer,  # the writer: HDF5's filters on one thread vs chunks encoded on a pool
    "cache": bench_cache,
    "gpu": bench_gpu,  # the GPU suite of issue 16 (gpu.py)
    "video": lambda **kw: __import__("pipeline.bench.video", fromlist=["bench_video"]).bench_video(**kw),  # issue 26
    "precision": bench_precision,  # each preset's precision vs fp32 on this device (issue 23, precision.py)
    "frames": bench_frames,  # a training sample per core, decoded vs from the frame cache (frames.py, issue 23)
    "scale": bench_scale,  # no-op status/run, manifest and depth import at 10k..1M frames (scale.py, issue 23)
}


def run_bench(what: str, *, batch: int, size: int, steps: int, device: str = "auto", isolate: bool = True,
              **kw) -> dict:
    """Run bench ``what``; returns the JSON record (see module docstring) without printing."""
    import platform

    import torch

    if what not in BENCHES:
        raise ConfigError(f"unknown bench {what!r}; valid: {', '.join(WHATS)}")
    for name, v, lo in (("batch", batch, 1), ("steps", steps, 1), ("size", size, 16)):
        if not isinstance(v, int) or v < lo:
            raise ConfigError(f"bench --{name} {v!r}: must be an integer >= {lo}")
    training = ("teach", "train-step", "side-by-side", "teacher-cache", "recon-loss", "gpu", "precision")  # AutoLink steps at --batch, --size
    if what in training and size % 16:
        raise ConfigError(f"bench {what} --size {size}: AutoLink needs a multiple of 16 (e.g. {size // 16 * 16 or 16})")
    if what in training and batch == 1 and size == 16:
        raise ConfigError(f"bench {what} --batch 1 --size 16: the detector's 1x1 bottleneck leaves BatchNorm one value "
                          "per channel in training; use --batch 2 or --size 32")
    dev = bench_device(device)
    t0 = time.time()
    body = BENCHES[what](batch=batch, size=size, steps=steps, device=dev, isolate=isolate, **kw)
    return {
        "bench": what,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "wall_s": round(time.time() - t0, 2),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or
                                                                                    platform.machine()),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": str(torch.__version__),
        "batch": batch, "size": size, "steps": steps, "warmup_steps": WARMUP, "isolated": isolate,
        **body,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "-" if v is None else str(v)


def bench_command(what: str, *, batch: int, size: int, steps: int, device: str, output: Optional[str],
                  console, isolate: bool = True, **kw) -> dict:
    """The CLI's `bench`: run, print the cases and ratios, append the JSON record as one line to ``output``.

    ``isolate=False`` runs model cases in this process (tests: faster, but CPU peak RSS is then the
    process's, not the case's); ``kw`` goes to the bench (``model=``, ``frames=`` for depth). ``gpu`` also
    writes its markdown tables beside ``output`` (``X.jsonl`` -> ``X.md``), or prints them without one."""
    if what in ("gpu", "scale"):
        kw["console"] = console  # the suite says its estimate and each part's progress as it goes
    rec = run_bench(what, batch=batch, size=size, steps=steps, device=device, isolate=isolate, **kw)
    console.print(f"bench {what} on {rec['device']} ({rec['device_name']}, {rec['cpus']} CPUs, torch threads "
                  f"{rec['torch_threads']}, load {rec['loadavg_1m']}): batch {batch}, size {size}, steps {steps} "
                  f"after {rec['warmup_steps']} warm-up, {rec['wall_s']} s", markup=False, soft_wrap=True)
    for name, c in rec["cases"].items():
        flat = {k: v for k, v in c.items() if k != "interleaved"}
        flat.update({f"interleaved.{k}": v for k, v in c.get("interleaved", {}).items()})
        console.print(f"  {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(flat.items())), markup=False,
                      soft_wrap=True)
    for k, v in rec.get("marginal_us_per_frame", {}).items():
        console.print(f"  marginal cost {k}: {_fmt(v)} us per added frame", markup=False, soft_wrap=True)
    for k, v in rec["ratios"].items():
        console.print(f"  ratio {k} = {_fmt(v)}  (baseline: {rec['baseline']})", markup=False, soft_wrap=True)
    for k, g in rec.get("goals", {}).items():
        console.print(f"  goal {k} {g.get('op', '>=')} {g['goal']}: {'met' if g['met'] else 'NOT met'} "
                      f"({_fmt(g['value'])}{', ' + g['via'] if g.get('via') else ''})", markup=False, soft_wrap=True)
    if output:
        p = Path(output)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        console.print(f"appended to {p}", markup=False, soft_wrap=True)
    if what == "gpu":
        md = gpu_markdown(rec)
        if output:
            p = Path(output)
            table = p.with_suffix(".md") if p.suffix != ".md" else p.with_suffix(".table.md")
            table.write_text(md + "\n")
            console.print(f"tables written to {table}", markup=False, soft_wrap=True)
        else:
            console.print(md, markup=False, soft_wrap=True)
    return rec
