"""`dkp-pipeline bench gpu`: every depth and training measurement of issue 16 in one command, within a time budget.

Registered in ``benches.BENCHES["gpu"]`` and built from the harness (``timed``, ``rate``, ``Memory``, ``compare``,
``run_case``) and the depth and training cases (the official-layout random weights, the stage run, the run.py
loop, the training steps). Here: the suite, its budget and its training part; one model's cases are in
``gpu_model.py``, the ratios, goals and markdown tables in ``gpu_report.py``. One record (one JSON line, like
every bench) plus a markdown table.

Parts, each in a fresh process (``isolate``), in this order: training, then each model, smallest first.
Part k gets ``remaining / parts left`` of the budget as its deadline, so time a part leaves unused goes to the
later, larger ones. Inside a part the cases run in priority order; before each, its duration is estimated from
what this part has measured so far (per-frame model time, data-side rates; the first case of a part has no
estimate and runs while time is left) and the case is skipped, and recorded as skipped with its estimate, when
it would end past the deadline. Every case records its estimate beside the time it took.

Per model (random weights in the official checkpoint layout; frames: ``--frames`` JPEGs of each of
``--frame-sizes``², default 128² (AutoLink's size), 256² (Taichi) and 1000² (Human3.6M)):

=========================  =======================================================================================
case                       what it measures
=========================  =======================================================================================
``bare/P/bB``              the model alone, precision P (fp32 | bf16 | fp16 autocast), batch B, on inputs already on
                           the device in the stage's memory format (channels_last on CUDA): frames/s, TFLOP/s, peak
                           memory, and for P != fp32 the depth's max / mean relative difference against fp32
``data_side/S``            one worker's work on one core (``cv2.setNumThreads(1)``) at frame size S: read + decode,
                           the old and the new (bit-identical) CPU preprocessing; the device path (decode on the
                           device + torch resize) at the stage's batch; depth of the two paths (fp32 model)
``loader/S``               the data side's ceiling: the stage's own DataLoader (its planned batches, W workers,
                           pinned on CUDA; device preprocessing on CUDA) with no model: frames/s it delivers
``writer/S``               the writer's ceiling: frames/s the background HDF5 writer stores (float16 + scale, gzip,
                           checksums) of S² maps, nothing else running
``stage/S/best``           the whole ``depth`` stage (``run_pipeline``) at its best settings: the suite's stage
                           precision and batch, W workers, device preprocessing on CUDA; its steady rate, what its
                           record says held it back, host waits per batch, GPU utilisation (NVML, sampled)
``stage/S/defaults``       the same with nothing set: what a user gets (auto precision, preprocessing, batch, workers)
``run_py_loop``            MiDaS run.py's loop (batch 1, fp32, NCHW, per-frame ``np.save``) at the largest size
``bare/P/bB/nchw``         the other memory format (NCHW on CUDA, channels_last on CPU) at the stage's P and B
``bare/P/bB/compile``      ``torch.compile`` (default inductor) at the stage's P and B; ``compile_s`` = first call
=========================  =======================================================================================

The record's ``limits`` name, per model and frame size, the lowest of the ceilings (bare model, data side, writer,
and on CUDA the device decode) beside what the stage's own record says held it back.

Training (AutoLink's setting: width 64, K = 16, AdamW as the trainer makes it (fused on CUDA), channels_last;
``--size`` px, ``--batch``): ``teach/fp32`` vs ``teach/amp`` (l1ssim), ``paper/fp32`` vs ``paper/fp16`` (the
paper presets' step: perceptual VGG16 loss, fp16 with a GradScaler) and ``distill/{live,cached}/{fp32,amp}`` (a
live frozen teacher vs the teacher-embedding cache read by the trainer's DataLoader and ``to_device``), through
``compare`` (alone, then interleaved; ratios from the interleaved rates), each with the host reads (and on CUDA
the syncs) of one step; ``syncs``: the trainer's own loop, host reads per step; ``data``: samples/s the
trainer's DataLoader delivers from the teach stage's dataset with the configured workers, against the GPU's
demand (the paper step's samples/s).
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.bench.depth import stage_precision as default_stage_precision
from pipeline.bench.depth import write_frames
from pipeline.bench.gpu_report import ratios_and_goals
from pipeline.bench.harness import WARMUP, BenchError, bench_device, compare, run_case, timed
from pipeline.bench.training import N_KEYPOINTS, WIDTH
from pipeline.errors import ConfigError

GPU_MODELS = ("dpt_levit_224", "dpt_swin2_tiny_256", "dpt_beit_base_384", "dpt_beit_large_512")
GPU_BATCHES = (1, 8, 32, 64)
GPU_FRAMES = 512
FRAME_SIZES = (128, 256, 1000)  # AutoLink's training size, Taichi's frames, Human3.6M's raw 1000 x 1000 JPEGs
BUDGET_S = 300.0
TRAIN_BATCH = 64  # AutoLink's batch (the CLI's --batch when it is not given)
JPEG_NOISE = 32  # amplitude of the frames' noise channel: JPEGs of ~natural size, not worst-case noise
# Assumptions, not measurements: what a torch.compile first call and a part's start (process, imports, random
# weights) are taken to cost before anything was measured. The record keeps what they really took.
COMPILE_PRIOR_S = 60.0
PART_PRIOR_S = 10.0
GRACE_S = 60.0  # how far past its deadline a part may run (its last case) before it is killed
SYNC_LOG_EVERY = 4  # the trainer's loop in the syncs case: 2 metrics intervals of this many steps
AMP_DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


# --------------------------------------------------------------------------------------------------------- budget
class Budget:
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
        dtype = getattr(torch, AMP_DTYPES[prec] or "float32")
        a = torch.randn(n, n, device=device).to(dtype)
        a @ a  # warm-up
        t = min(timed(lambda: a @ a, reps, device))
        out[prec] = 2 * n ** 3 / max(t, 1e-9)
    return out



# --------------------------------------------------------------------------------------------------------- training
def case_gpu_train(p: dict) -> dict:
    """The training part, in priority order: teach fp32 vs AMP (l1ssim), the paper's step fp32 vs fp16 (perceptual
    VGG16, random weights, GradScaler), distill {live, cached} x {fp32, AMP} (each group through ``compare`` in
    this process), the trainer's loop with its host reads counted (``syncs``, fp16 on CUDA), and the data side's
    ceiling: what the trainer's DataLoader delivers with the configured workers (``data``)."""
    device = bench_device(p["device"])
    cuda = device.type == "cuda"
    amp = True if cuda else "bf16"  # the device's AMP dtype; CPU autocast: bf16
    base = {"device": p["device"], "batch": p["batch"], "size": p["size"], "steps": p["steps"], "width": p["width"],
            "channels_last": True}
    paper = base | {"recon_loss": "perceptual"} | ({"vgg_size": p["vgg_size"]} if p.get("vgg_size") else {})
    groups = {"teach": {"fp32": ("autolink_step", base), "amp": ("autolink_step", base | {"amp": amp})},
              "paper": {"fp32": ("autolink_step", paper), "fp16": ("autolink_step", paper | {"amp": "fp16"})},
              "distill": {f"{mode}/{a}": ("distill_step", base | {"mode": mode} | ({"amp": amp} if a == "amp" else {}))
                          for mode in ("live", "cached") for a in ("fp32", "amp")}}
    # How much longer than teach's a case of the group takes (the estimate's prior): VGG16 at 224 px per image
    # (and emulated fp16 on a CPU) for the paper's step; a teacher forward or a lookup beside the student's step.
    weight = {"teach": 1.0, "paper": 3.0 if cuda else 10.0, "distill": 1.5}
    budget = Budget(p["deadline"], p.get("progress"))
    per_case = None  # seconds one teach case took (alone + its share of the interleaved run)
    for group, specs in groups.items():
        est = None if per_case is None else per_case * len(specs) * weight[group]
        res = budget.run(group, est, lambda specs=specs: compare(specs, steps=p["steps"], isolate=False))
        if res is None:
            continue
        if "error" in res:
            budget.keep({group: res})
            continue
        if per_case is None:
            per_case = budget.log[-1]["actual_s"] / len(specs)
        budget.keep({f"{group}/{name}": c for name, c in res.items()})
    syncs = {"device": p["device"], "batch": p["batch"], "size": p["size"], "width": p["width"],
             "amp": "fp16" if cuda else None, "log_every": SYNC_LOG_EVERY}
    res = budget.run("syncs", None if per_case is None else per_case * 2 * SYNC_LOG_EVERY / max(1, p["steps"]),
                     lambda: run_case("trainer_syncs", syncs, isolate=False))
    if res is not None:
        budget.keep({"syncs": res})
    workers = p.get("train_workers")
    data = {"device": p["device"], "batch": p["batch"], "size": p["size"], "steps": p.get("data_batches", 20),
            "workers": workers,  # None: the config's default (from the cores, as the trainer resolves it)
            "frames": p.get("data_frames", 2 * p["batch"]), "frame_size": p.get("data_frame_size", 2 * p["size"])}
    res = budget.run("data", None, lambda: run_case("data_loader", data, isolate=False))
    if res is not None:
        budget.keep({"data": res})
    return budget.result()


# --------------------------------------------------------------------------------------------------------- the suite
def parse_list(text, what: str, cast) -> tuple:
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
                         run_py_frames: int, stage_precision: str, stage_batch: int, compile: bool,
                         n_sizes: int = 1) -> float:
    """Seconds the suite needs at least: every model case's FLOPs at the measured matmul rate of its precision,
    plus the priors (``PART_PRIOR_S`` per part, ``COMPILE_PRIOR_S`` per compile). Real models reach a fraction
    of the matmul rate, so the run takes longer; the budget, not this number, bounds it."""
    total = PART_PRIOR_S * (len(models) + 1)
    for m in models:
        f = flops[m]
        total += sum((WARMUP + steps) * b * f / rates[p] for p in precisions for b in batches)
        total += (2 * frames * n_sizes + (WARMUP + steps) * stage_batch) * f / rates[stage_precision]  # stages
        total += (run_py_frames + 1) * f / rates["fp32"]
        if compile:
            total += COMPILE_PRIOR_S + (WARMUP + steps) * stage_batch * f / rates[stage_precision]
    return total


def bench_gpu(*, batch: int, size: int, steps: int, device, isolate: bool = True, models=GPU_MODELS,
              batches=GPU_BATCHES, frames: int = GPU_FRAMES, frame_sizes=FRAME_SIZES, budget_s: float = BUDGET_S,
              precisions: Optional[tuple] = None, compile: Optional[bool] = None, workers: Optional[int] = None,
              train_width: int = WIDTH, train_workers: Optional[int] = None, vgg_size: Optional[int] = None,
              data_frames: Optional[int] = None, console=None) -> dict:
    """The suite (module docstring). ``batch``/``size``: the training steps'; ``steps``: timed steps per case.

    ``precisions`` (default: the stage's AMP dtype, fp32, the other half type on CUDA; fp32 on CPU), ``compile``
    (default: on CUDA only; inductor compiles take minutes on a CPU), ``workers`` (the stage's DataLoader
    workers; default: CPUs - 1, at most 16), ``train_width`` (default AutoLink's 64), ``train_workers`` (the
    training DataLoader's, default the config's ``num_workers``), ``vgg_size`` (the perceptual loss's input side,
    default AutoLink's 224) and ``data_frames`` (frames of the data-side case, default 4 x batch) are for tests and
    experiments."""
    from dkp_core.midas import list_models

    models = parse_list(models, "models", str)
    batches = tuple(sorted(set(parse_list(batches, "batches", int))))
    frame_sizes = tuple(sorted(set(parse_list(frame_sizes, "frame-sizes", int))))
    bad = [m for m in models if m not in list_models()]
    if bad:
        raise ConfigError(f"bench gpu --models: {bad[0]!r} is not a MiDaS 3.1 model; valid: {', '.join(list_models())}")
    if batches[0] < 1:
        raise ConfigError(f"bench gpu --batches {','.join(map(str, batches))}: batch sizes must be >= 1")
    for name, v, lo in (("frames", frames, 2), *(("frame-sizes", fs, 16) for fs in frame_sizes)):
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
    p_stage = default_stage_precision(device)
    precisions = tuple(precisions or ((p_stage, "fp32", "fp16" if p_stage == "bf16" else "bf16") if cuda else
                                      ("fp32",)))
    stage_batch = 32 if 32 in batches else batches[-1]
    workers = workers or max(1, min(16, (os.cpu_count() or 2) - 1))
    compile = cuda if compile is None else bool(compile)
    run_py_frames = max(2, min(64, frames // 8))
    common = {"device": str(device), "steps": steps}
    with tempfile.TemporaryDirectory(prefix="dkp-bench-gpu-") as tmp:
        data_roots = {str(fs): str(Path(tmp) / f"data-{fs}") for fs in frame_sizes}
        t0 = time.perf_counter()
        for fs in frame_sizes:
            write_frames(Path(data_roots[str(fs)]) / "images", frames, fs, ext=".jpg", noise=JPEG_NOISE)
        frames_s = time.perf_counter() - t0
        flops = {m: flops_per_frame(m) for m in models}
        rates = _matmul_rates(device, set(precisions) | {"fp32", p_stage})
        estimate = estimate_lower_bound(models=models, flops=flops, rates=rates, batches=batches, precisions=precisions,
                                        steps=steps, frames=frames, run_py_frames=run_py_frames,
                                        stage_precision=p_stage, stage_batch=stage_batch, compile=compile,
                                        n_sizes=len(frame_sizes))
        say(f"bench gpu: {len(models)} model(s) x batches {list(batches)} x {list(precisions)}, {frames} frames of "
            f"each of {', '.join(f'{fs}^2' for fs in frame_sizes)}, training at batch {batch}, {size} px; estimated "
            f">= {estimate:.0f} s (FLOPs at the "
            f"measured matmul rate + priors), budget {budget_s:.0f} s: cases that would overrun are skipped")
        train = {"batch": batch, "size": size, "width": train_width, "train_workers": train_workers,
                 "data_frames": data_frames or 4 * batch, "data_frame_size": 2 * size}
        train |= {"vgg_size": vgg_size} if vgg_size else {}
        parts: list[tuple[str, str, dict]] = [("train", "gpu_train", common | train)]
        parts += [(m, "gpu_model", common | {
            "model_type": m, "data_roots": data_roots, "frame_sizes": list(frame_sizes), "batches": list(batches),
            "precisions": list(precisions),
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
    ratios, goals, limits = ratios_and_goals(cases, models, device, p_stage, stage_batch, frame_sizes)
    return {"baseline": f"bare model ({p_stage}, batch {stage_batch}), run.py loop, fp32",
            "cases": cases, "ratios": ratios, "goals": goals, "limits": limits,
            "budget": {"budget_s": budget_s, "estimate_lower_bound_s": round(estimate, 1),
                       "actual_s": round(time.time() - t_start, 1), "frames_write_s": round(frames_s, 2),
                       "skipped": [f"{r['part']}: {r['case']}" for r in log if "skipped" in r], "log": log},
            "setup": {"models": list(models), "batches": list(batches), "precisions": list(precisions),
                      "stage_precision": p_stage, "stage_batch": stage_batch, "num_workers": workers,
                      "compile": compile, "frames": frames, "frame_sizes": list(frame_sizes),
                      "frame_format": f"JPEG (OpenCV quality 95, noise amplitude {JPEG_NOISE})",
                      "run_py_frames": run_py_frames, "flops_per_frame": flops,
                      "matmul_flops_per_s": {k: float(f"{v:.4g}") for k, v in rates.items()},
                      "train": {"width": train_width, "n_keypoints": N_KEYPOINTS, "batch": batch, "size": size,
                                "recon_loss": "l1ssim (teach, distill); perceptual, VGG16 at "
                                              f"{vgg_size or 224} px (paper)", "channels_last": True,
                                "data_frames": data_frames or 4 * batch, "data_frame_size": 2 * size},
                      "weights": "random init, official layout", "tf32": _tf32_flags()}}


def _tf32_flags() -> dict:
    import torch

    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}
