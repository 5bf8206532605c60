"""`dkp-pipeline bench gpu`: every depth and training measurement of issue 16 in one command, within a time budget.

Registered in :mod:`pipeline.bench` (``BENCHES["gpu"]``) and built from its harness (``_timed``, ``_rate``,
``_Memory``, ``_compare``, ``run_case``, the official-layout random weights, the run.py loop); it lives in its own
module because it is large. One record (one JSON line, like every bench) plus a markdown table.

Parts, each in a fresh process (``isolate``), in this order: training, then each model, smallest first.
Part k gets ``remaining / parts left`` of the budget as its deadline, so time a part leaves unused goes to the
later, larger ones. Inside a part the cases run in priority order; before each, its duration is estimated from
what this part has measured so far (per-frame model time, data-side rates; the first case of a part has no
estimate and runs while time is left) and the case is skipped, and recorded as skipped with its estimate, when
it would end past the deadline. Every case records its estimate beside the time it took.

Per model (random weights in the official checkpoint layout, frames: ``--frames`` JPEGs of ``--frame-size``²):

==================  ==============================================================================================
case                what it measures
==================  ==============================================================================================
``bare/P/bB``       the model alone, precision P (fp32 | bf16 | fp16 autocast), batch B, on inputs already on the
                    device in the stage's memory format (channels_last on CUDA): frames/s, TFLOP/s, peak memory,
                    and for P != fp32 the depth's max / mean relative difference against fp32 on the same frames
``data_side``       one worker's work on one core (``cv2.setNumThreads(1)``): read + decode, the old and the new
                    (bit-identical) CPU preprocessing; the device path (decode on the device + torch resize) at
                    the stage's batch; depth of the two paths (fp32 model) as max / mean relative difference
``stage/cpu``       the whole ``depth`` stage (``run_pipeline``), ``depth.preprocess: cpu``, W workers
``stage/device``    the same with ``depth.preprocess: device``; depth difference of the two caches
``run_py_loop``     MiDaS run.py's loop (batch 1, fp32, NCHW, per-frame ``np.save``)
``bare/P/bB/nchw``  the other memory format (NCHW on CUDA, channels_last on CPU) at the stage's P and B
``bare/P/bB/compile``  ``torch.compile`` (default inductor) at the stage's P and B; ``compile_s`` = first call
==================  ==============================================================================================

Training (AutoLink's setting: width 64, K = 16, l1ssim, AdamW, channels_last as the trainer; ``--size`` px,
``--batch``): ``teach/fp32`` vs ``teach/amp`` and ``distill/{live,cached}/{fp32,amp}`` (a live frozen teacher vs
the teacher-embedding cache), through ``_compare`` (alone, then interleaved; ratios from the interleaved rates).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.bench import (DEPTH_GOALS, N_KEYPOINTS, WARMUP, WIDTH, BenchError, _autocast, _compare, _depth_config,
                            _device, _EnvVar, _Memory, _random_midas_weights, _rate, _ratio, _run_depth_stage,
                            _run_py_loop, _speed, _timed, _write_frames, run_case)
from pipeline.errors import ConfigError

GPU_MODELS = ("dpt_levit_224", "dpt_swin2_tiny_256", "dpt_beit_base_384", "dpt_beit_large_512")
GPU_BATCHES = (1, 8, 32, 64)
GPU_FRAMES = 512
FRAME_SIZE = 1000  # Human3.6M's frames: 1000 x 1000 JPEGs
BUDGET_S = 300.0
TRAIN_BATCH = 64  # AutoLink's batch (the CLI's --batch when it is not given)
JPEG_NOISE = 32  # amplitude of the frames' noise channel: JPEGs of ~natural size, not worst-case noise
# Assumptions, not measurements: what a torch.compile first call and a part's start (process, imports, random
# weights) are taken to cost before anything was measured. The record keeps what they really took.
COMPILE_PRIOR_S = 60.0
PART_PRIOR_S = 10.0
GRACE_S = 60.0  # how far past its deadline a part may run (its last case) before it is killed
GOALS_CUDA = {"frames_per_s stage/bare_model": 0.95, "frames_per_s stage/run_py_loop": 4.0}
BEIT_L_GOAL_FPS = 300.0  # dpt_beit_large_512, bf16, one H200
AMP_GOAL = 1.5  # training steps/s AMP / fp32
_AMP = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


# --------------------------------------------------------------------------------------------------------- budget
class _Budget:
    """Runs cases in priority order until ``deadline`` (``time.time()``); logs estimate vs actual per case and keeps
    the results. With ``progress`` (a file), every log row and result is also appended there as it happens, so a
    part killed past its deadline (``run_case``'s timeout) still hands back what it finished (:func:`_recover`)."""

    def __init__(self, deadline: float, progress: Optional[str] = None) -> None:
        self.deadline, self.progress = deadline, progress
        self.log: list[dict] = []
        self.cases: dict[str, dict] = {}

    def _save(self, entry: dict) -> None:
        if self.progress:
            with open(self.progress, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def keep(self, cases: dict[str, dict]) -> None:
        self.cases.update(cases)
        self._save({"cases": cases})

    def result(self) -> dict:
        return {"cases": self.cases, "log": self.log}

    def run(self, name: str, estimate_s: Optional[float], fn: Callable[[], dict]) -> Optional[dict]:
        """``fn()``'s result, ``{"error": ...}`` when it raised (out of memory, a failed stage: the suite goes on),
        or None when it was skipped because it would end past the deadline (no estimate: if time is left)."""
        now = time.time()
        row: dict[str, Any] = {"case": name, "estimate_s": None if estimate_s is None else round(estimate_s, 2)}
        if now >= self.deadline or (estimate_s is not None and now + estimate_s > self.deadline):
            self.log.append(row | {"skipped": "budget", "left_s": round(self.deadline - now, 2)})
            self._save({"log": self.log[-1]})
            return None
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - recorded in the result and the log, never silent
            res = {"error": _error_text(e)}
            _free_device_memory()
        self.log.append(row | {"actual_s": round(time.time() - now, 2), **({"error": res["error"]} if "error" in res
                                                                             else {})})
        self._save({"log": self.log[-1]})
        return res


def _recover(progress: Path, error: BaseException) -> dict:
    """What a part that failed or was killed had finished, from its progress file, plus the error."""
    out: dict = {"cases": {}, "log": []}
    if progress.is_file():
        for line in progress.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # the line being written when it was killed
                continue
            out["cases"].update(entry.get("cases", {}))
            out["log"] += [entry["log"]] if "log" in entry else []
    out["log"].append({"case": "(part)", "estimate_s": None, "error": _error_text(error)})
    return out


def _error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}"


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------- helpers
def flops_per_frame(model_type: str) -> int:
    """FLOPs of one forward at the model's net size (``torch.utils.flop_counter`` on the meta device: no memory)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dkp_core.midas import create_model, get_spec

    spec = get_spec(model_type)
    model = create_model(model_type, device="meta")
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        model(torch.empty(1, 3, spec.net_h, spec.net_w, device="meta"))
    return int(fc.get_total_flops())


def _matmul_rates(device, precisions) -> dict[str, float]:
    """FLOP/s of a square matmul per precision on ``device``, measured (the estimate's optimistic rate)."""
    import torch

    n, reps = (4096, 10) if device.type == "cuda" else (384, 3)
    out = {}
    for prec in precisions:
        dtype = getattr(torch, _AMP[prec] or "float32")
        a = torch.randn(n, n, device=device).to(dtype)
        a @ a  # warm-up
        t = min(_timed(lambda: a @ a, reps, device))
        out[prec] = 2 * n ** 3 / max(t, 1e-9)
    return out


def _stage_precision(device) -> str:
    import torch

    if device.type == "cpu":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _rel_diff(a, b) -> dict:
    """max |a - b| / max |b| and mean |a - b| / mean |b| (b the reference), as floats."""
    d = (a - b).abs()
    return {"max_rel": float(d.max() / b.abs().max().clamp_min(1e-12)),
            "mean_rel": float(d.mean() / b.abs().mean().clamp_min(1e-12))}


def _nearest(table: dict, precision: str, batch: int) -> Optional[float]:
    """Seconds per frame measured at ``precision`` (else any precision) and the nearest batch; None if none."""
    for pool in ([k for k in table if k[0] == precision], list(table)):
        if pool:
            return table[min(pool, key=lambda k: abs(k[1] - batch))]
    return None


# --------------------------------------------------------------------------------------------------------- one model
def case_gpu_model(p: dict) -> dict:
    """Every depth case of one model, in priority order until ``p["deadline"]``; ``{"cases", "log"}``."""
    import cv2
    import numpy as np
    import torch

    from dkp_core.midas import get_spec
    from dkp_core.midas.transforms import postprocess, preprocess, preprocess_u8, target_size
    from pipeline.depth_cache import DepthCacheReader
    from pipeline.images import decode_rgb, read_frame_bytes, read_rgb
    from pipeline.stages.depth.frames import _device_batch

    budget = _Budget(p["deadline"], p.get("progress"))
    if time.time() >= p["deadline"]:  # no time left for this part: not even its setup
        budget.run("(all cases)", None, dict)
        return budget.result()
    device = _device(p["device"])
    mt, steps, workers = p["model_type"], p["steps"], p["workers"]
    spec = get_spec(mt)
    p_stage, b_stage, flops = p["stage_precision"], p["stage_batch"], p["flops_per_frame"]
    frames = sorted(Path(p["data_root"], "images").glob("*.jpg"))
    n = len(frames)
    cuda = device.type == "cuda"
    spf: dict[tuple[str, int], float] = {}  # (precision, batch) -> measured model seconds per frame
    data: dict[str, float] = {}

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory(prefix="dkp-bench-gpu-") as tmp, _EnvVar("DKP_CACHE_DIR", f"{tmp}/dkp-cache"):
        root = Path(tmp)
        t0 = time.perf_counter()
        xs = torch.from_numpy(np.stack([preprocess_u8(read_rgb(q), spec) for q in frames[:4]]))  # (r, 3, h, w)
        weights = root / f"{mt}.pt"
        base = _random_midas_weights(mt, xs, weights, device=device)  # = what load_midas(weights) builds
        setup_s = time.perf_counter() - t0
        # the stage's memory format (channels_last on CUDA, as stages/depth.py) and the other one (lazily)
        fmt = {"default": torch.channels_last if cuda else torch.contiguous_format}
        fmt["other"] = torch.contiguous_format if cuda else torch.channels_last
        models: dict[str, Any] = {"default": base.to(memory_format=fmt["default"])}
        xs_dev = xs.to(device)
        with torch.inference_mode():
            y_ref = models["default"](xs_dev.contiguous(memory_format=fmt["default"])).float()  # (r, h, w) fp32

        def model(variant: str):
            if variant not in models:
                if variant == "other":
                    models["other"] = copy.deepcopy(models["default"]).to(memory_format=fmt["other"])
                else:  # compile
                    models["compile"] = torch.compile(models["default"])
            return models[variant]

        def bare(prec: str, b: int, variant: str = "default") -> dict:
            m = model(variant)
            amp = getattr(torch, _AMP[prec]) if _AMP[prec] else None
            memory_format = fmt["other" if variant == "other" else "default"]
            x = xs_dev[torch.arange(b) % len(xs_dev)].contiguous(memory_format=memory_format)  # (b, 3, h, w)

            def forward(inp):
                with torch.inference_mode(), _autocast(device, amp):
                    return m(inp)

            res: dict[str, Any] = {}
            if variant == "compile":
                sync()
                t_c = time.perf_counter()
                forward(x)
                sync()
                res["compile_s"] = round(time.perf_counter() - t_c, 2)
            mem = _Memory(device)
            mem.start()
            r = _rate(_timed(lambda: forward(x), steps, device), per_step=b)
            res.update(mem.stop())
            fps = r["per_s"]
            if variant == "default":  # depth against fp32 on the reference frames (one more forward)
                spf[(prec, b)] = 1.0 / fps
                y = forward(xs_dev.contiguous(memory_format=memory_format)).float()
                if prec != "fp32":
                    res["vs_fp32"] = _rel_diff(y, y_ref)
            else:  # the timed shape: a compiled model would recompile for another
                y = forward(x).float()
            return {"frames_per_s": fps, "s_per_batch": r["median_s"], "s_per_batch_min": r["min_s"],
                    "s_per_batch_max": r["max_s"], "tflops_per_s": round(flops * fps / 1e12, 3), "batch": b,
                    "precision": prec, "memory_format": "channels_last" if memory_format == torch.channels_last
                    else "nchw", "compile": variant == "compile", "finite": bool(torch.isfinite(y).all()), **res}

        def bare_estimate(prec: str, b: int) -> Optional[float]:
            s = _nearest(spf, prec, b)
            return None if s is None else (WARMUP + steps) * b * s + len(xs) * s

        def run_bare(prec: str, variant: str = "default", only: Optional[int] = None) -> None:
            suffix = {"default": "", "other": "/nchw" if cuda else "/channels_last", "compile": "/compile"}[variant]
            for b in ([only] if only else p["batches"]):
                name = f"bare/{prec}/b{b}{suffix}"
                est = bare_estimate(prec, b)
                if variant == "compile" and est is not None:
                    est += COMPILE_PRIOR_S
                res = budget.run(name, est, lambda: bare(prec, b, variant))
                if res is not None:
                    budget.keep({name: res})
                    if "error" in res:  # out of memory: larger batches of this precision fail too
                        break

        def data_side() -> dict:
            k = min(n, p["data_frames"])
            old_threads = cv2.getNumThreads()
            cv2.setNumThreads(1)
            try:
                t = time.perf_counter()
                raws = [read_frame_bytes(q) for q in frames[:k]]
                t_read = time.perf_counter() - t
                t = time.perf_counter()
                imgs = [decode_rgb(q, r) for q, r in zip(frames, raws)]
                t_decode = time.perf_counter() - t
                t = time.perf_counter()
                old = [preprocess(im.astype(np.float32) / 255.0, spec) for im in imgs]
                t_old = time.perf_counter() - t
                t = time.perf_counter()
                new = [preprocess_u8(im, spec) for im in imgs]
                t_new = time.perf_counter() - t
            finally:
                cv2.setNumThreads(old_threads)
            exact = all(np.array_equal(a, b) for a, b in zip(old, new))
            items = [{"i": j, "jpeg": torch.from_numpy(r), "hw": im.shape[:2], "path": str(q),
                      "key": (3, *target_size(*im.shape[:2], spec))} for j, (q, r, im) in enumerate(zip(frames, raws,
                                                                                                        imgs))]

            def no_bad(i, message):
                raise BenchError(f"bench gpu: frame {i} failed on the device path: {message}")

            def device_path(chunk):
                return _device_batch(chunk, spec, device, no_bad)[0]

            device_path(items[:b_stage])  # warm-up (decoder initialisation)
            sync()
            t = time.perf_counter()
            x_dev = torch.cat([device_path(items[j:j + b_stage]) for j in range(0, k, b_stage)])  # (k, 3, h, w)
            sync()
            t_dev = time.perf_counter() - t
            # depth of the two paths, fp32 model, first frames (what the device path changes, without the cache's
            # float16 rounding)
            r = min(4, k)
            with torch.inference_mode():
                m = models["default"]
                ya = m(torch.from_numpy(np.stack(new[:r])).to(device).contiguous(memory_format=fmt["default"]))
                yb = m(x_dev[:r].contiguous(memory_format=fmt["default"]))
                hw = imgs[0].shape[:2]
                da, db = postprocess(ya.float(), hw), postprocess(yb.float(), hw)
            per_worker = k / (t_read + t_decode + t_new)
            data.update(per_worker=per_worker, per_worker_old=k / (t_read + t_decode + t_old), device=k / t_dev)
            return {"frames": k, "frame_size": list(imgs[0].shape[:2]), "jpeg_kib": round(sum(map(len, raws)) / k
                                                                                          / 1024, 1),
                    "read_ms": round(1e3 * t_read / k, 3), "decode_ms": round(1e3 * t_decode / k, 3),
                    "cpu_preprocess_old_ms": round(1e3 * t_old / k, 3), "cpu_preprocess_ms": round(1e3 * t_new / k, 3),
                    "cpu_new_equals_old": exact, "cpu_frames_per_s_per_worker": per_worker,
                    "cpu_old_frames_per_s_per_worker": data["per_worker_old"], "device_frames_per_s": data["device"],
                    "device_batch": b_stage, "device_vs_cpu_input": _rel_diff(x_dev[:r].cpu(),
                                                                              torch.from_numpy(np.stack(new[:r]))),
                    "device_vs_cpu_depth_fp32": _rel_diff(db.cpu(), da.cpu())}

        caches: dict[str, Path] = {}

        def stage(pre: str) -> dict:
            cfg = _depth_config(root, f"gpu-{pre}", Path(p["data_root"]), mt, weights, precision=p_stage,
                                batch_size_inference=b_stage, num_workers=workers, preprocess=pre, device=device.type)
            mem = _Memory(device)
            mem.start()
            rec, cache, wall = _run_depth_stage(cfg, root / f"store-{pre}", n)
            caches[pre] = cache
            c = rec["compute"]
            out = {"frames_per_s": n / c["seconds"], "seconds": c["seconds"], "frames_per_s_wall": n / wall,
                   "wall_s": round(wall, 3), "frames": n, "batch": b_stage, "precision": p_stage, "preprocess": pre,
                   "num_workers": workers, "storage_dtype": cfg.depth.storage_dtype, **mem.stop(),
                   **{k: c[k] for k in ("seconds_model", "seconds_waiting_for_writer", "seconds_writing",
                                        "fp32_fallbacks")}}
            if pre == "device" and "cpu" in caches:
                worst, means = 0.0, []
                with DepthCacheReader(caches["cpu"]) as ra, DepthCacheReader(cache) as rb:
                    for j in range(min(n, 64)):  # reading a 1000^2 float16 map back costs ~ms: a sample
                        d = _rel_diff(torch.from_numpy(rb.read(j)), torch.from_numpy(ra.read(j)))
                        worst, means = max(worst, d["max_rel"]), means + [d["mean_rel"]]
                out["cache_vs_cpu_cache"] = {"max_rel": worst, "mean_rel": sum(means) / len(means)}
            return out

        def stage_estimate(pre: str) -> Optional[float]:
            s = _nearest(spf, p_stage, b_stage)
            feed = data.get("device") if pre == "device" else data.get("per_worker", 0) * workers
            if s is None or not feed:
                return None
            return setup_s + n * max(s, 1.0 / feed)

        def run_py() -> dict:
            m = models["default"] if not cuda else model("other")  # run.py: NCHW, fp32
            k = p["run_py_frames"]
            out = root / "run_py"
            out.mkdir(exist_ok=True)
            _run_py_loop(m, spec, frames[:1], out, device)  # warm-up
            sec = _run_py_loop(m, spec, frames[:k], out, device)
            return {"frames_per_s": k / sec, "seconds": round(sec, 3), "frames": k, "batch": 1, "precision": "fp32",
                    "memory_format": "nchw"}

        def add(name: str, est: Optional[float], fn) -> None:
            res = budget.run(name, est, fn)
            if res is not None:
                budget.keep({name: res})

        # priority order: what the goals need first
        run_bare(p_stage)
        add("data_side", None, data_side)
        for pre in ("cpu", "device"):
            add(f"stage/{pre}", stage_estimate(pre), lambda pre=pre: stage(pre))
        s1 = _nearest(spf, "fp32", 1)
        add("run_py_loop", None if s1 is None or "per_worker_old" not in data else
            (p["run_py_frames"] + 1) * (s1 + 1.0 / data["per_worker_old"]), run_py)
        for prec in p["precisions"]:
            if prec != p_stage:
                run_bare(prec)
        run_bare(p_stage, "other", only=b_stage)
        if p["compile"]:
            run_bare(p_stage, "compile", only=b_stage)
    return budget.result()


# --------------------------------------------------------------------------------------------------------- training
def case_gpu_train(p: dict) -> dict:
    """teach fp32 vs AMP, distill {live, cached} x {fp32, AMP}, each group through ``_compare`` in this process."""
    device = _device(p["device"])
    amp = True if device.type == "cuda" else "bf16"  # the device's AMP dtype; CPU autocast: bf16
    base = {"device": p["device"], "batch": p["batch"], "size": p["size"], "steps": p["steps"], "width": p["width"],
            "channels_last": True}
    groups = {"teach": {"fp32": ("autolink_step", base), "amp": ("autolink_step", base | {"amp": amp})},
              "distill": {f"{mode}/{a}": ("distill_step", base | {"mode": mode} | ({"amp": amp} if a == "amp" else {}))
                          for mode in ("live", "cached") for a in ("fp32", "amp")}}
    budget = _Budget(p["deadline"], p.get("progress"))
    per_case = None  # seconds one case took in the last group (alone + its share of the interleaved run)
    for group, specs in groups.items():
        est = None if per_case is None else per_case * len(specs) * (1.5 if group == "distill" else 1)
        res = budget.run(group, est, lambda specs=specs: _compare(specs, steps=p["steps"], isolate=False))
        if res is None:
            continue
        if "error" in res:
            budget.keep({group: res})
            continue
        per_case = budget.log[-1]["actual_s"] / len(specs)
        budget.keep({f"{group}/{name}": c for name, c in res.items()})
    return budget.result()


# --------------------------------------------------------------------------------------------------------- the suite
def _parse_list(text, what: str, cast) -> tuple:
    if isinstance(text, (list, tuple)):
        return tuple(text)
    try:
        vals = tuple(cast(v.strip()) for v in str(text).split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals:
        raise ConfigError(f"bench gpu --{what} {text!r}: expected a comma-separated list, e.g. --{what} "
                          + {"models": "dpt_levit_224,dpt_beit_large_512", "batches": "1,8,32"}[what])
    return vals


def estimate_lower_bound(*, models, flops: dict, rates: dict, batches, precisions, steps: int, frames: int,
                         run_py_frames: int, stage_precision: str, stage_batch: int, compile: bool) -> float:
    """Seconds the suite needs at least: every model case's FLOPs at the measured matmul rate of its precision,
    plus the priors (``PART_PRIOR_S`` per part, ``COMPILE_PRIOR_S`` per compile). Real models reach a fraction
    of the matmul rate, so the run takes longer; the budget, not this number, bounds it."""
    total = PART_PRIOR_S * (len(models) + 1)
    for m in models:
        f = flops[m]
        total += sum((WARMUP + steps) * b * f / rates[p] for p in precisions for b in batches)
        total += (2 * frames + (WARMUP + steps) * stage_batch) * f / rates[stage_precision]  # stages, other format
        total += (run_py_frames + 1) * f / rates["fp32"]
        if compile:
            total += COMPILE_PRIOR_S + (WARMUP + steps) * stage_batch * f / rates[stage_precision]
    return total


def bench_gpu(*, batch: int, size: int, steps: int, device, isolate: bool = True, models=GPU_MODELS,
              batches=GPU_BATCHES, frames: int = GPU_FRAMES, frame_size: int = FRAME_SIZE, budget_s: float = BUDGET_S,
              precisions: Optional[tuple] = None, compile: Optional[bool] = None, workers: Optional[int] = None,
              train_width: int = WIDTH, console=None) -> dict:
    """The suite (module docstring). ``batch``/``size``: the training steps'; ``steps``: timed steps per case.

    ``precisions`` (default: the stage's AMP dtype, fp32, the other half type on CUDA; fp32 on CPU), ``compile``
    (default: on CUDA only; inductor compiles take minutes on a CPU), ``workers`` (the stage's DataLoader
    workers; default: CPUs - 1, at most 16) and ``train_width`` (default AutoLink's 64) are for tests and
    experiments."""
    from dkp_core.midas import list_models

    models = _parse_list(models, "models", str)
    batches = tuple(sorted(set(_parse_list(batches, "batches", int))))
    bad = [m for m in models if m not in list_models()]
    if bad:
        raise ConfigError(f"bench gpu --models: {bad[0]!r} is not a MiDaS 3.1 model; valid: {', '.join(list_models())}")
    if batches[0] < 1:
        raise ConfigError(f"bench gpu --batches {','.join(map(str, batches))}: batch sizes must be >= 1")
    for name, v, lo in (("frames", frames, 2), ("frame-size", frame_size, 16)):
        if not isinstance(v, int) or v < lo:
            raise ConfigError(f"bench gpu --{name} {v!r}: must be an integer >= {lo}")
    if not isinstance(budget_s, (int, float)) or budget_s <= 0:
        raise ConfigError(f"bench gpu --budget-s {budget_s!r}: must be a number of seconds > 0")
    if device.type == "cuda" and (device.index or 0) != 0:
        raise ConfigError(f"bench gpu --device {device}: the depth stage runs on cuda:LOCAL_RANK (cuda:0 here); "
                          f"use CUDA_VISIBLE_DEVICES={device.index} with --device cuda")
    say = (lambda text: console.print(text, markup=False, soft_wrap=True)) if console is not None else (lambda t: None)
    t_start = time.time()
    deadline = t_start + budget_s
    cuda = device.type == "cuda"
    p_stage = _stage_precision(device)
    precisions = tuple(precisions or ((p_stage, "fp32", "fp16" if p_stage == "bf16" else "bf16") if cuda else
                                      ("fp32",)))
    stage_batch = 32 if 32 in batches else batches[-1]
    workers = workers or max(1, min(16, (os.cpu_count() or 2) - 1))
    compile = cuda if compile is None else bool(compile)
    run_py_frames = max(2, min(64, frames // 8))
    common = {"device": str(device), "steps": steps}
    with tempfile.TemporaryDirectory(prefix="dkp-bench-gpu-") as tmp:
        data_root = Path(tmp) / "data"
        t0 = time.perf_counter()
        _write_frames(data_root / "images", frames, frame_size, ext=".jpg", noise=JPEG_NOISE)
        frames_s = time.perf_counter() - t0
        flops = {m: flops_per_frame(m) for m in models}
        rates = _matmul_rates(device, set(precisions) | {"fp32", p_stage})
        estimate = estimate_lower_bound(models=models, flops=flops, rates=rates, batches=batches, precisions=precisions,
                                        steps=steps, frames=frames, run_py_frames=run_py_frames,
                                        stage_precision=p_stage, stage_batch=stage_batch, compile=compile)
        say(f"bench gpu: {len(models)} model(s) x batches {list(batches)} x {list(precisions)}, {frames} frames of "
            f"{frame_size}^2, training at batch {batch}, {size} px; estimated >= {estimate:.0f} s (FLOPs at the "
            f"measured matmul rate + priors), budget {budget_s:.0f} s: cases that would overrun are skipped")
        parts: list[tuple[str, str, dict]] = [("train", "gpu_train", common | {"batch": batch, "size": size,
                                                                                "width": train_width})]
        parts += [(m, "gpu_model", common | {
            "model_type": m, "data_root": str(data_root), "batches": list(batches), "precisions": list(precisions),
            "stage_precision": p_stage, "stage_batch": stage_batch, "workers": workers, "compile": compile,
            "flops_per_frame": flops[m], "data_frames": min(frames, 64), "run_py_frames": run_py_frames})
            for m in models]
        cases: dict[str, dict] = {}
        log: list[dict] = []
        for k, (name, fn, params) in enumerate(parts):
            left = deadline - time.time()
            share = max(0.0, left) / (len(parts) - k)
            t_part = time.time()
            progress = Path(tmp) / f"part{k}.jsonl"
            try:  # a part past its deadline by more than GRACE_S is killed; what it finished is in `progress`
                res = run_case(fn, params | {"deadline": t_part + share, "progress": str(progress)}, isolate=isolate,
                               timeout=share + GRACE_S)
            except (BenchError, subprocess.TimeoutExpired) as e:
                res = _recover(progress, e)
            prefix = "" if name == "train" else f"{name}/"
            cases.update({prefix + c: v for c, v in res["cases"].items()})
            log += [{"part": name, **row} for row in res["log"]]
            n_skip = sum("skipped" in row for row in res["log"])
            say(f"  {name}: {time.time() - t_part:.0f} s of its {share:.0f} s share, {len(res['cases'])} case(s)"
                + (f", {n_skip} skipped (budget)" if n_skip else "")
                + (f", errors: {[r['case'] for r in res['log'] if 'error' in r]}" if any('error' in r for r in
                                                                                        res["log"]) else ""))
    ratios, goals = _ratios_and_goals(cases, models, device, p_stage, stage_batch)
    return {"baseline": f"bare model ({p_stage}, batch {stage_batch}), run.py loop, fp32",
            "cases": cases, "ratios": ratios, "goals": goals,
            "budget": {"budget_s": budget_s, "estimate_lower_bound_s": round(estimate, 1),
                       "actual_s": round(time.time() - t_start, 1), "frames_write_s": round(frames_s, 2),
                       "skipped": [f"{r['part']}: {r['case']}" for r in log if "skipped" in r], "log": log},
            "setup": {"models": list(models), "batches": list(batches), "precisions": list(precisions),
                      "stage_precision": p_stage, "stage_batch": stage_batch, "num_workers": workers,
                      "compile": compile, "frames": frames, "frame_size": [frame_size, frame_size],
                      "frame_format": f"JPEG (OpenCV quality 95, noise amplitude {JPEG_NOISE})",
                      "run_py_frames": run_py_frames, "flops_per_frame": flops,
                      "matmul_flops_per_s": {k: float(f"{v:.4g}") for k, v in rates.items()},
                      "train": {"width": train_width, "n_keypoints": N_KEYPOINTS, "batch": batch, "size": size,
                                "recon_loss": "l1ssim", "channels_last": True},
                      "weights": "random init, official layout", "tf32": _tf32_flags()}}


def _tf32_flags() -> dict:
    import torch

    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}


def _ratios_and_goals(cases: dict, models, device, p_stage: str, b_stage: int) -> tuple[dict, dict]:
    def fps(name: str) -> Optional[float]:
        c = cases.get(name) or {}
        return c.get("frames_per_s")

    ratios: dict[str, Optional[float]] = {}
    goals: dict[str, dict] = {}
    goal_values = GOALS_CUDA if device.type == "cuda" else DEPTH_GOALS["cpu"]
    for m in models:
        bare = fps(f"{m}/bare/{p_stage}/b{b_stage}")
        best = max(("cpu", "device"), key=lambda pre: fps(f"{m}/stage/{pre}") or 0.0)
        for pre in ("cpu", "device"):
            s = fps(f"{m}/stage/{pre}")
            ratios[f"{m} frames_per_s stage_{pre}/bare_model"] = _ratio(s, bare)
            ratios[f"{m} frames_per_s stage_{pre}/run_py_loop"] = _ratio(s, fps(f"{m}/run_py_loop"))
        ratios[f"{m} frames_per_s stage_device/stage_cpu"] = _ratio(fps(f"{m}/stage/device"), fps(f"{m}/stage/cpu"))
        ds = cases.get(f"{m}/data_side") or {}
        ratios[f"{m} workers needed for the bare model"] = _ratio(bare, ds.get("cpu_frames_per_s_per_worker"))
        for key, g in goal_values.items():
            v = ratios[f"{m} {key.replace('stage/', f'stage_{best}/')}"]
            goals[f"{m} {key}"] = {"goal": g, "value": v, "met": v is not None and v >= g, "via": f"stage/{best}"}
    if device.type == "cuda" and "dpt_beit_large_512" in models:
        m = "dpt_beit_large_512"
        v = max([fps(f"{m}/stage/{pre}") or 0.0 for pre in ("cpu", "device")]) or None
        goals[f"{m} stage frames_per_s ({p_stage})"] = {"goal": BEIT_L_GOAL_FPS, "value": v,
                                                       "met": v is not None and v >= BEIT_L_GOAL_FPS}
    pairs = [("teach steps_per_s amp/fp32", "teach/amp", "teach/fp32")]
    pairs += [(f"distill {mode} steps_per_s amp/fp32", f"distill/{mode}/amp", f"distill/{mode}/fp32")
              for mode in ("live", "cached")]
    pairs += [(f"distill {a} steps_per_s cached/live", f"distill/cached/{a}", f"distill/live/{a}")
              for a in ("fp32", "amp")]
    for key, a, b in pairs:
        ca, cb = cases.get(a) or {}, cases.get(b) or {}
        ratios[key] = _ratio(_speed(ca), _speed(cb)) if "interleaved" in ca and "interleaved" in cb else None
        if device.type == "cuda" and "amp/fp32" in key:
            goals[key] = {"goal": AMP_GOAL, "value": ratios[key], "met": ratios[key] is not None
                          and ratios[key] >= AMP_GOAL}
    return ratios, goals


# --------------------------------------------------------------------------------------------------------- markdown
def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 10 ** nd else f"{v:.0f}"
    return str(v)


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(_f(v) for v in r) + " |" for r in rows]


def gpu_markdown(rec: dict) -> str:
    """The record of ``bench gpu`` as markdown tables (what docs/benchmarks.md's GPU section shows)."""
    st, cases = rec["setup"], rec["cases"]
    out = [f"## bench gpu: {rec['device_name']} ({rec['device']}), torch {rec['torch']}, {rec['time']}", "",
           f"{rec['wall_s']} s of a {rec['budget']['budget_s']:.0f} s budget (estimated >= "
           f"{rec['budget']['estimate_lower_bound_s']} s); stage precision {st['stage_precision']}, batch "
           f"{st['stage_batch']}, {st['num_workers']} workers; {st['frames']} frames of "
           f"{st['frame_size'][0]}x{st['frame_size'][1]} ({st['frame_format']}); TF32 {st['tf32']}. Peak memory: "
           f"torch.cuda.max_memory_allocated per case on CUDA; on a CPU the process's peak RSS (not per case).", ""]
    for m in st["models"]:
        rows = []
        for name, c in cases.items():
            if name.startswith(f"{m}/bare/"):
                d = c.get("vs_fp32") or {}
                rows.append([name[len(m) + 1:], c.get("precision"), c.get("batch"), c.get("memory_format"),
                             c.get("compile"), c.get("frames_per_s"), c.get("tflops_per_s"), c.get("peak_mem_mib"),
                             d.get("max_rel"), d.get("mean_rel"), c.get("compile_s"), c.get("error")])
        if rows:
            out += [f"### {m}: bare model ({st['flops_per_frame'][m] / 1e9:.1f} GFLOP/frame)", ""]
            out += _table(["case", "precision", "batch", "format", "compile", "frames/s", "TFLOP/s", "peak MiB",
                           "max rel vs fp32", "mean rel vs fp32", "compile s", "error"], rows) + [""]
    rows = []
    for m in st["models"]:
        ds = cases.get(f"{m}/data_side") or {}
        sc, sd, rp = (cases.get(f"{m}/{k}") or {} for k in ("stage/cpu", "stage/device", "run_py_loop"))
        r = rec["ratios"]
        rows.append([m, (cases.get(f"{m}/bare/{st['stage_precision']}/b{st['stage_batch']}") or {}).get("frames_per_s"),
                     sc.get("frames_per_s"), sd.get("frames_per_s"), rp.get("frames_per_s"),
                     r.get(f"{m} frames_per_s stage_cpu/bare_model"), r.get(f"{m} frames_per_s stage_device/bare_model"),
                     r.get(f"{m} frames_per_s stage_cpu/run_py_loop"), r.get(f"{m} frames_per_s stage_device/run_py_loop"),
                     (sd.get("cache_vs_cpu_cache") or {}).get("max_rel"),
                     (ds.get("device_vs_cpu_depth_fp32") or {}).get("max_rel"),
                     (ds.get("device_vs_cpu_depth_fp32") or {}).get("mean_rel"),
                     sc.get("peak_mem_mib"), sc.get("seconds_waiting_for_writer")])
    out += ["### depth stage vs bare model vs run.py loop (frames/s)", ""]
    out += _table(["model", "bare", "stage cpu", "stage device", "run.py", "cpu/bare", "device/bare", "cpu/run.py",
                   "device/run.py", "caches max rel (device vs cpu)", "depth max rel (fp32)", "depth mean rel (fp32)",
                   "stage peak MiB", "writer wait s"], rows) + [""]
    rows = []
    for m in st["models"]:
        ds = cases.get(f"{m}/data_side") or {}
        if ds and "error" not in ds:
            rows.append([m, ds["read_ms"], ds["decode_ms"], ds["cpu_preprocess_old_ms"], ds["cpu_preprocess_ms"],
                         ds["cpu_new_equals_old"], ds["cpu_old_frames_per_s_per_worker"],
                         ds["cpu_frames_per_s_per_worker"], ds["device_frames_per_s"],
                         rec["ratios"].get(f"{m} workers needed for the bare model")])
    out += ["### data side alone (one worker = one core; device: decode + resize on the device)", ""]
    out += _table(["model", "read ms", "decode ms", "preprocess old ms", "preprocess ms", "bit-identical",
                   "old frames/s/worker", "frames/s/worker", "device frames/s", "workers for bare"], rows) + [""]
    rows = [[n, c.get("amp"), _speed(c) if "interleaved" in c else None, c.get("peak_mem_mib"), c.get("error")]
            for n, c in cases.items() if n.split("/")[0] in ("teach", "distill")]
    out += [f"### training steps/s (width {st['train']['width']}, {st['train']['size']} px, batch "
            f"{st['train']['batch']}; interleaved)", ""]
    out += _table(["case", "amp", "steps/s", "peak MiB", "error"], rows) + [""]
    out += ["### ratios and goals", ""]
    out += _table(["ratio", "value"], [[k, v] for k, v in rec["ratios"].items() if v is not None]) + [""]
    out += _table(["goal", "target", "value", "met"], [[k, g["goal"], g["value"], g["met"]]
                                                       for k, g in rec.get("goals", {}).items()]) + [""]
    log = rec["budget"]["log"]
    out += ["### budget: estimate vs actual per case", ""]
    out += _table(["part", "case", "estimate s", "actual s", "skipped / error"],
                  [[r["part"], r["case"], r.get("estimate_s"), r.get("actual_s"), r.get("skipped") or r.get("error")]
                   for r in log]) + [""]
    return "\n".join(out)
