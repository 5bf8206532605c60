"""`dkp-pipeline bench`: throughput and peak memory, always as ratios against a baseline in the same run.

Absolute numbers depend on the machine and on whoever else uses it; a ratio of two cases measured
back to back on the same machine mostly does not, so every bench reports both and the ratios are
what docs/benchmarks.md compares.

=================  ================================================  =====================================
bench              cases                                             ratios (speed: interleaved rates)
=================  ================================================  =====================================
``teach``          AutoLink training step (K=16, heatmaps S/4,       width64 vs width16 (steps/s, memory);
                   l1ssim loss, AdamW) at width 16 and at            on CUDA also AMP vs fp32 at width 64
                   AutoLink's width 64; on CUDA also width 64 + AMP
``teacher-cache``  distillation step, width 64, K=16: student step   cached vs live steps/s (the speed-up
                   + live frozen teacher forward on depth, or        of ``distill.teacher_cache``)
                   student step + teacher embeddings read from an
                   HDF5 embedding cache (distill's own reader)
``recon-loss``     AutoLink training step at width 16 with each       X/l1ssim for l1, mse and perceptual
                   reconstruction loss: l1ssim, l1, mse, perceptual  (steps/s, memory)
                   (VGG16 at 224 px, random weights: same cost)
``depth``          one MiDaS 3.1 model (--model, random weights in    stage / bare model and stage / run.py
                   the official layout) on --frames generated        loop frames/s, with the goals of
                   frames: (a) bare model on preprocessed batches    issue 4 (met or not)
                   on the device, (b) the whole ``depth`` stage
                   (workers, cache), (c) run.py's per-frame loop
``cache``          B*N depth maps (S x S, float32) written/read      cache vs .npy frames/s; bytes on disk
                   through the depth cache vs one ``np.save`` file
                   per frame
``gpu``            the GPU suite of issue 16 within a time budget    stage/bare, stage/run.py, device/cpu,
                   (pipeline/bench_gpu.py): depth bare/stage/run.py  workers needed, AMP/fp32, cached/live
                   per model x precision x batch, data side,
                   teach/distill fp32 vs AMP, live vs cached
=================  ================================================  =====================================

Each model case runs alone in a fresh Python process (``isolate=True``, the CLI's behaviour), so its
peak memory is its own: peak RSS from ``getrusage`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA,
reported both absolute and as growth over the process's footprint just before the first step. The
timed loop runs ``steps`` steps after one untimed warm-up step and times each; rates come from the
median step (min and max are kept), so a neighbour's burst on a shared machine moves them less.
Inputs are random tensors already on the device: data loading is not part of any model case
(except in ``depth``, whose point is to measure it: see :func:`case_depth_abc`, one process, no interleaving
step by step, but the bare-model and run.py cases are timed in halves before and after the stage).
Then all cases of a bench are built in one more process and timed step by step in alternating
order (ABBA...), so they share whatever load the machine has; speed ratios come from these
``interleaved`` rates (on a shared 2-core machine, runs minutes apart differed by up to 2x).
``teacher-cache`` also times the target alone (``target_s``: teacher forward vs embedding lookup).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.errors import ConfigError, DkpError

WHATS = ("teach", "train-step", "depth", "cache", "teacher-cache", "recon-loss", "gpu")
DEPTH_MODEL = "dpt_levit_224"  # the smallest MiDaS 3.1 model
DEPTH_FRAMES = 256
# Goals of issue 4 for the depth stage: stage/bare >= 0.9 (CPU) / 0.95 (GPU), stage/run.py >= 1.3 / 4.
DEPTH_GOALS = {"cpu": {"frames_per_s stage/bare_model": 0.9, "frames_per_s stage/run_py_loop": 1.3},
               "cuda": {"frames_per_s stage/bare_model": 0.95, "frames_per_s stage/run_py_loop": 4.0}}
N_KEYPOINTS = 16  # AutoLink's K for Human3.6M / DeepFashion
WIDTH = 64  # AutoLink's detector/decoder width
BASELINE_WIDTH = 16  # the synthetic preset's width
PRESET_KEYPOINTS = 10  # the synthetic preset's K
WARMUP = 1
MIB = 1 << 20


class BenchError(DkpError):
    """A benchmark case failed (e.g. out of memory at this batch/size)."""


# --------------------------------------------------------------------------------------------------
# measuring


def _rss_bytes() -> Optional[int]:
    """Resident set size now (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes; Linux: KiB


class _Memory:
    """Peak memory of what runs between ``start()`` and ``stop()``.

    CUDA: ``max_memory_allocated`` (tensors only, not the caching allocator's reserve). CPU: the
    process's peak RSS, which only grows, so it means "this case" only in a fresh process.
    """

    def __init__(self, device) -> None:
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            now = _rss_bytes()
            self.before = now if now is not None else _peak_rss_bytes()

    def stop(self) -> dict:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak, kind = torch.cuda.max_memory_allocated(self.device), "cuda_max_memory_allocated"
        else:
            peak, kind = _peak_rss_bytes(), "peak_rss"
        return {"mem_kind": kind, "peak_mem_mib": round(peak / MIB, 1),
                "peak_mem_growth_mib": round(max(0, peak - self.before) / MIB, 1)}


def _timed(step: Callable[[], Any], steps: int, device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` after ``WARMUP`` untimed ones (CUDA synchronised)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _rate(times: list[float], per_step: float = 1.0) -> dict:
    """Rates from per-step times. The median step is what a rate is taken from: on a shared machine
    a neighbour's burst inflates single steps, and the median ignores a minority of those."""
    import statistics

    med = statistics.median(times)
    return {"median_s": round(med, 5), "min_s": round(min(times), 5), "max_s": round(max(times), 5),
            "per_s": per_step / med}


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"bench --device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"bench --device {name!r}: torch sees no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"bench --device {name!r}: expected auto, cpu, cuda or cuda:N")
    return dev


def _amp_dtype(device):
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _amp_of(p: dict, device):
    """The autocast dtype a training case asks for: ``amp: "bf16"``, any other true value = the device's AMP dtype."""
    import torch

    return {"bf16": torch.bfloat16}.get(p.get("amp")) or (_amp_dtype(device) if p.get("amp") else None)


def _amp_name(amp) -> str:
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(amp), "off")


def _autocast(device, amp):
    import contextlib

    import torch

    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# cases (each takes plain JSON params and returns plain JSON, so it can run in a fresh process)


def _autolink(size: int, width: int, device, n_keypoints: int = N_KEYPOINTS):
    from dkp_core.keypoints import AutoLink

    return AutoLink(n_keypoints=n_keypoints, image_size=size, heatmap_size=size // 4, width=width).to(device)


class _Case:
    """A built benchmark case: ``step()`` does one unit of work; ``per_step`` items (frames) per call."""

    def __init__(self, step: Callable[[], Any], *, device, per_step: int = 1, unit: str = "steps_per_s",
                 extra: Optional[Callable[[], dict]] = None, cleanup: Optional[Callable[[], None]] = None) -> None:
        self.step, self.device, self.per_step, self.unit = step, device, per_step, unit
        self.extra = extra or (lambda: {})
        self.cleanup = cleanup or (lambda: None)


def _reconstruction_loss(name: str):
    """A reconstruction loss by name; ``perceptual`` with random VGG16 weights, which cost exactly what the
    ImageNet ones cost (same layers, same shapes), so no weight file is needed to time it."""
    import warnings

    from dkp_core.losses import make_reconstruction_loss

    if name == "perceptual":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make_reconstruction_loss("perceptual", vgg_state_dict=None)
    return make_reconstruction_loss(name)


def build_autolink_step(p: dict) -> _Case:
    """One AutoLink training step (forward, reconstruction loss ``p["recon_loss"]`` (default l1ssim),
    backward, AdamW) as the trainer does it."""
    import torch

    device = _device(p["device"])
    torch.manual_seed(0)
    model = _autolink(p["size"], p["width"], device, p.get("n_keypoints", N_KEYPOINTS)).train()
    if p.get("channels_last"):
        model.to(memory_format=torch.channels_last)  # what the trainer does (train.channels_last)
    recon = _reconstruction_loss(p.get("recon_loss", "l1ssim")).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    amp = _amp_of(p, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    x = torch.rand(p["batch"], 3, p["size"], p["size"], device=device) * 2 - 1  # (B, 3, S, S)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            out = model(x, mask_generator=gen)
            loss = recon(out.reconstruction.float(), x)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    n_params = sum(t.numel() for t in model.parameters())
    n_loss = sum(t.numel() for t in recon.parameters())  # the perceptual loss's frozen VGG16
    return _Case(step, device=device, extra=lambda: {
        "params_m": round(n_params / 1e6, 3), "amp": _amp_name(amp),
        "recon_loss": p.get("recon_loss", "l1ssim"), "loss_params_m": round(n_loss / 1e6, 3),
        "channels_last": bool(p.get("channels_last"))})


def build_distill_step(p: dict) -> _Case:
    """A distillation step: student AutoLink step + (live frozen teacher | cached embeddings) + (1 - cos); the
    whole step under autocast when ``p["amp"]`` (as the trainer runs it), channels_last when asked."""
    import numpy as np
    import torch

    from dkp_core.losses import distillation_loss, make_reconstruction_loss

    device = _device(p["device"])
    B, S, steps = p["batch"], p["size"], p["steps"]
    torch.manual_seed(0)
    width = p.get("width", WIDTH)
    student = _autolink(S, width, device).train()
    recon = make_reconstruction_loss("l1ssim").to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=1e-3)
    amp = _amp_of(p, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    rgb = torch.rand(B, 3, S, S, device=device) * 2 - 1  # (B, 3, S, S)
    gen = torch.Generator(device=device).manual_seed(0)
    gamma = 0.1
    tmp = None
    if p["mode"] == "live":
        teacher = _autolink(S, width, device).eval()
        if p.get("channels_last"):
            teacher.to(memory_format=torch.channels_last)
        for t in teacher.parameters():
            t.requires_grad_(False)
        depth = torch.rand(B, 3, S, S, device=device) * 2 - 1

        def target(_s):
            with torch.no_grad():
                return teacher.detector(depth, return_features=("logits",)).features["logits"].float()
    else:
        import h5py

        from pipeline.stages.distill import EmbeddingCache

        n = B * (steps + WARMUP)
        tmp = tempfile.TemporaryDirectory(prefix="dkp-bench-")
        path = Path(tmp.name) / "teacher_embeddings.h5"
        shape = (N_KEYPOINTS, S // 4, S // 4)  # logits (K, S/4, S/4)
        with h5py.File(path, "w") as f:  # the layout distill writes: position, embedding (N, n_flip, ...)
            f.create_dataset("position", data=np.arange(n, dtype=np.int64))
            emb = f.create_dataset("embedding", shape=(n, 2, *shape), dtype="float32", chunks=(1, 2, *shape))
            emb[...] = np.random.default_rng(0).standard_normal((n, 2, *shape), dtype=np.float32)
        cache = EmbeddingCache(path)

        def target(s):
            idx = torch.arange(s * B, (s + 1) * B) % n
            return cache.lookup(idx, torch.zeros(B, dtype=torch.bool)).to(device)

    counter = {"s": 0}
    target_times: list[float] = []

    if p.get("channels_last"):
        student.to(memory_format=torch.channels_last)  # what the trainer does (train.channels_last)

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            t0 = time.perf_counter()
            t = target(counter["s"])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            target_times.append(time.perf_counter() - t0)
            counter["s"] += 1
            out = student(rgb, mask_generator=gen, return_features=("logits",))
            loss = recon(out.reconstruction.float(), rgb) + gamma * distillation_loss(
                out.detector_output.features["logits"].float(), t)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return _Case(step, device=device, extra=lambda: {"target_s": _rate(target_times[WARMUP:])["median_s"],
                                                     "amp": _amp_name(amp),
                                                     "channels_last": bool(p.get("channels_last"))},
                 cleanup=tmp.cleanup if tmp is not None else None)


def official_layout_state_dict(model, model_type: str) -> dict:
    """``model``'s state dict (from ``create_model``) under the official MiDaS 3.1 checkpoint key names.

    The inverse of ``dkp_core.midas.checkpoint.convert_official_state_dict`` (derived buffers and unused
    heads left out, which the loader accepts): a file the stage loads like a downloaded checkpoint, with
    random weights, so the depth bench needs no download. The strict loader checks the result.
    """
    import re

    from dkp_core.midas import get_spec

    backbone = get_spec(model_type).backbone
    levit = None
    if backbone == "levit":
        from dkp_core.midas.backbones import levit_flat_layout

        inner = {"attn": (("m.qkv.c.", "qkv.linear."), ("m.qkv.bn.", "qkv.bn."), ("m.proj.1.c.", "proj.ln.linear."),
                          ("m.proj.1.bn.", "proj.ln.bn."), ("m.attention_biases", "attention_biases")),
                 "mlp": (("m.0.c.", "ln1.linear."), ("m.0.bn.", "ln1.bn."), ("m.2.c.", "ln2.linear."),
                         ("m.2.bn.", "ln2.bn.")),
                 "down_attn": (("kv.c.", "kv.linear."), ("kv.bn.", "kv.bn."), ("q.1.c.", "q.ln.linear."),
                               ("q.1.bn.", "q.ln.bn."), ("proj.1.c.", "proj.ln.linear."), ("proj.1.bn.", "proj.ln.bn."),
                               ("attention_biases", "attention_biases"))}
        inner["down_mlp"] = inner["mlp"]
        levit = [(prefix + ".", i, inner[kind]) for i, (prefix, kind) in
                 enumerate(levit_flat_layout(model.pretrained.model))]

    def backbone_key(sub: str) -> str:
        if backbone in ("swin", "swin2"):
            m = re.match(r"layers\.(\d+)\.downsample\.(.*)$", sub)
            return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else sub
        if levit is not None:
            m = re.match(r"stem\.conv(\d)\.(linear|bn)\.(.*)$", sub)
            if m:
                return f"patch_embed.{2 * (int(m.group(1)) - 1)}.{'c' if m.group(2) == 'linear' else 'bn'}.{m.group(3)}"
            for prefix, i, pairs in levit:
                if sub.startswith(prefix):
                    rest = sub[len(prefix):]
                    for old, new in pairs:
                        if rest.startswith(new):
                            return f"blocks.{i}.{old}{rest[len(new):]}"
        return sub

    out = {}
    for key, v in model.state_dict().items():
        if key.startswith("pretrained.model."):
            key = "pretrained.model." + backbone_key(key[len("pretrained.model."):])
        else:
            m = re.match(r"pretrained\.reassemble\.(\d)\.(readout|conv|resample)\.(.*)$", key)
            if m:
                old = {"readout": "0.project.0.", "conv": "3.", "resample": "4."}[m.group(2)]
                key = f"pretrained.act_postprocess{int(m.group(1)) + 1}.{old}{m.group(3)}"
        out[key] = v.detach().clone()
    return out


def _calibrate_head(model, x) -> None:
    """Random init makes MiDaS output all zeros (the last conv's output sits below its ReLU), which would
    make the cache compress to nothing. Rescale that conv so its pre-ReLU output on ``x`` (B, 3, h, w) has
    mean 2 and std 1, as the shared fixtures' weights do: depth maps that vary (values meaningless)."""
    import torch

    conv = [m for m in model.scratch.output_conv if isinstance(m, torch.nn.Conv2d)][-1]
    got = {}
    hook = conv.register_forward_hook(lambda mod, inp, out: got.update(out=out))
    with torch.no_grad():
        model.eval()(x)
        hook.remove()
        mean, std = float(got["out"].mean()), float(got["out"].std())
        conv.weight.div_(max(std, 1e-12))
        conv.bias.copy_(2.0 - (mean - conv.bias) / max(std, 1e-12))


def _write_frames(folder: Path, n: int, size: int, ext: str = ".png", noise: int = 256) -> list[Path]:
    """``n`` distinct ``size`` x ``size`` RGB frames (gradients plus uniform noise of amplitude ``noise`` in one
    channel), like a small video folder; ``ext`` .png or .jpg (OpenCV's default quality 95)."""
    from concurrent.futures import ThreadPoolExecutor

    import cv2
    import numpy as np

    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size]
    paths = [folder / f"frame{k:06d}{ext}" for k in range(n)]

    def write(k: int) -> None:
        rng = np.random.default_rng(k)
        img = np.stack([(xx + k) % size * 255 // size, yy * 255 // size,
                        rng.integers(0, noise, (size, size)) + (256 - noise) // 2], -1)
        cv2.imwrite(str(paths[k]), img.astype(np.uint8))

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:  # cv2 encodes without the GIL
        list(pool.map(write, range(n)))
    return paths


def _random_midas_weights(model_type: str, x, path: Path, device=None):
    """Random-init ``model_type`` (built on ``device``: fast on a GPU) with a calibrated head (on ``x``, (B, 3, h, w)),
    saved in the official layout at ``path``. Returns the model (eval mode, on ``device``)."""
    import torch

    from dkp_core.midas import create_model

    torch.manual_seed(0)
    model = create_model(model_type, device=device)
    _calibrate_head(model, x.to(next(model.parameters()).device))
    torch.save({k: v.cpu() for k, v in official_layout_state_dict(model, model_type).items()}, path)
    return model


def _depth_config(root: Path, name: str, data_root: Path, model_type: str, weights: Path, **depth):
    """An experiment config over the folder dataset ``data_root`` with provider midas and ``depth`` settings."""
    from pipeline.config import load_config

    exp = root / f"{name}.yaml"
    exp.write_text(json.dumps({"name": name, "data": {"manifest": "folder", "root": str(data_root)},
                               "depth": {"provider": "midas", "model_type": model_type, "weights": str(weights),
                                         **depth}}))
    return load_config(str(exp))


def _run_depth_stage(cfg, store: Path, n: int) -> tuple[dict, Path, float]:
    """``run_pipeline(only="depth")`` as `dkp-pipeline depth` runs it: (artifact.json, cache dir, wall seconds)."""
    import io as _io

    from rich.console import Console

    from pipeline.runner import run_pipeline

    t0 = time.perf_counter()
    run_pipeline(cfg, str(store), only="depth", until="depth", console=Console(file=_io.StringIO(), width=200))
    wall = time.perf_counter() - t0
    (cache,) = list((store / "depth").iterdir())
    rec = json.loads((cache / "artifact.json").read_text())
    if rec.get("n_valid") != n or rec["compute"]["frames"] != n:
        raise BenchError(f"bench depth: the stage wrote {rec.get('n_valid')} valid frames of {n}")
    return rec, cache, wall


def _run_py_loop(model, spec, frames: list[Path], out: Path, device) -> float:
    """Seconds for MiDaS run.py's loop over ``frames``: cv2.imread, RGB / 255 (float64), resize + normalise,
    forward at batch 1 under ``no_grad`` in fp32, bicubic back to the frame size, ``np.save`` per frame."""
    import cv2
    import numpy as np
    import torch

    from dkp_core.midas.transforms import postprocess, preprocess

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for q in frames:
        img = cv2.imread(str(q))
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB) / 255.0  # (H, W, 3) float64 in [0, 1]
        sample = torch.from_numpy(preprocess(img, spec)).to(device).unsqueeze(0)  # (1, 3, h, w)
        with torch.no_grad():
            pred = postprocess(model.forward(sample), img.shape[:2]).squeeze().cpu().numpy()  # (H, W)
        np.save(out / f"{q.stem}.npy", pred)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


class _EnvVar:
    def __init__(self, name: str, value: str) -> None:
        self.name, self.value = name, value

    def __enter__(self):
        self.old = os.environ.get(self.name)
        os.environ[self.name] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.old


def case_depth_abc(p: dict) -> dict:
    """The three depth cases on the same generated frames, in one process, in the order
    a1 c1 b c2 a2 (a, c: first and second half of the frames), so that a and c bracket b in time.

    (a) ``bare_model``: the stage's own inference call (``_infer``: same precision, memory format,
        device) on batches preprocessed beforehand and already on the device;
    (b) ``stage``: ``run_pipeline(only="depth")`` with provider midas on a folder manifest of the frames
        (DataLoader workers decode and preprocess, the background writer fills the HDF5 cache); rate from
        the stage's own frame loop (``compute.seconds`` in artifact.json), wall time kept too;
    (c) ``run_py_loop``: MiDaS run.py's loop: cv2.imread, RGB / 255, resize + normalise, forward at batch 1
        under ``no_grad`` in fp32, bicubic back to the frame size, ``np.save`` per frame.
    One untimed warm-up batch (a) and frame (c) first; kernels are then warm for all three cases.
    """
    import cv2
    import numpy as np
    import torch

    from dkp_core.midas import get_spec
    from dkp_core.midas.transforms import preprocess
    from pipeline.midas_weights import load_midas
    from pipeline.stages.depth import compute as D

    device = _device(p["device"])
    mt, n, size, batch = p["model_type"], p["frames"], p["size"], p["batch"]
    spec = get_spec(mt)
    precision = "fp32" if device.type == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory(prefix="dkp-bench-depth-") as tmp, _EnvVar("DKP_CACHE_DIR", f"{tmp}/dkp-cache"):
        root = Path(tmp)
        paths = _write_frames(root / "data" / "images", n, size)
        xs = np.stack([preprocess(cv2.cvtColor(cv2.imread(str(q)), cv2.COLOR_BGR2RGB) / 255.0, spec) for q in paths])
        weights = root / f"{mt}.pt"
        _random_midas_weights(mt, torch.from_numpy(xs[:batch]), weights)
        cfg = _depth_config(root, "bench-depth", root / "data", mt, weights, batch_size_inference=batch,
                            precision=precision, device=device.type)

        # (a): the stage's model bundle and inference call, inputs preprocessed and on the device beforehand
        bundle = D._load_model(cfg, None)
        batches = [torch.from_numpy(xs[i:i + batch]).to(bundle[1]) for i in range(0, n, batch)]  # (B, 3, h, w)
        del xs
        stats = {"seconds_model": 0.0, "fp32_fallbacks": 0}
        D._infer(bundle, batches[0], stats)  # warm-up
        # (c): run.py's model: fp32, default memory format (run.py's --optimize is off by default)
        model_c, _ = load_midas(mt, weights, device=device)
        out_c = root / "run_py_out"
        out_c.mkdir()

        def run_py(frames: list[Path]) -> float:
            return _run_py_loop(model_c, spec, frames, out_c, device)

        def bare(bs: list) -> float:
            sync()
            t0 = time.perf_counter()
            for x in bs:
                D._infer(bundle, x, stats)
            sync()
            return time.perf_counter() - t0

        run_py(paths[:1])  # warm-up
        half_b, half_f = len(batches) // 2, n // 2
        a1, c1 = bare(batches[:half_b]), run_py(paths[:half_f])
        frames_a1 = sum(len(x) for x in batches[:half_b])

        # (b): the stage, as `dkp-pipeline depth` runs it
        rec, cache, b_wall = _run_depth_stage(cfg, root / "store", n)
        comp = rec["compute"]
        cache_bytes = sum(f.stat().st_size for f in (cache / "shards").glob("*.h5"))

        c2, a2 = run_py(paths[half_f:]), bare(batches[half_b:])
        # the stage's values equal the run.py loop's (same weights; fp32 on CPU)
        from pipeline.depth_cache import DepthCacheReader

        with DepthCacheReader(cache) as r:
            k = n - 1
            got, want = r.read(k), np.load(out_c / f"{paths[k].stem}.npy")
            max_rel = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
            depth_std = float(want.std())

    fa = (frames_a1, n - frames_a1)
    fc = (half_f, n - half_f)
    return {
        "cases": {
            "bare_model": {"frames_per_s": n / (a1 + a2), "seconds": round(a1 + a2, 3), "frames": n,
                           "halves_frames_per_s": [round(fa[0] / a1, 3), round(fa[1] / a2, 3)],
                           "batch": batch, "precision": precision},
            "stage": {"frames_per_s": n / comp["seconds"], "seconds": comp["seconds"], "frames": n,
                      "frames_per_s_wall": n / b_wall, "wall_s": round(b_wall, 3),
                      "seconds_model": comp["seconds_model"],
                      "seconds_waiting_for_writer": comp["seconds_waiting_for_writer"],
                      "seconds_writing": comp["seconds_writing"], "fp32_fallbacks": comp["fp32_fallbacks"],
                      "num_workers": cfg.depth.num_workers, "batch": batch, "precision": precision,
                      "cache_bytes": cache_bytes, "storage_dtype": cfg.depth.storage_dtype},
            "run_py_loop": {"frames_per_s": n / (c1 + c2), "seconds": round(c1 + c2, 3), "frames": n,
                            "halves_frames_per_s": [round(fc[0] / c1, 3), round(fc[1] / c2, 3)], "batch": 1,
                            "precision": "fp32"},
        },
        "setup": {"weights": "random init, official layout (torch.save of create_model's state dict, keys mapped)",
                  "order": "a1 c1 b c2 a2 (halves of the frames), after one warm-up batch (a) and frame (c)",
                  "stage_rate": "frames / compute.seconds (the stage's frame loop: DataLoader start to last shard "
                                "committed); wall_s also counts manifest, weights hash, model load, preview",
                  "stage_vs_run_py_max_rel_diff": max_rel, "depth_std_last_frame": depth_std},
    }


BUILDERS: dict[str, Callable[[dict], _Case]] = {
    "autolink_step": build_autolink_step,
    "distill_step": build_distill_step,
}


def _rate_fields(times: list[float], case: _Case) -> dict:
    r = _rate(times, per_step=case.per_step)
    return {case.unit: r["per_s"], "s_per_step": r["median_s"], "s_per_step_min": r["min_s"], "s_per_step_max": r["max_s"]}


def case_alone(p: dict) -> dict:
    """One case on its own (its peak memory is this process's): rates, memory, the builder's extras."""
    case = BUILDERS[p["builder"]](p["params"])
    mem = _Memory(case.device)
    mem.start()
    times = _timed(case.step, p["params"]["steps"], case.device)
    res = {**_rate_fields(times, case), **mem.stop(), **case.extra()}
    case.cleanup()
    return res


def case_interleaved(p: dict) -> dict:
    """Several cases built in one process and timed step by step in alternating order (ABBA...).

    A ratio of two rates measured minutes apart on a shared machine mostly measures the neighbours;
    interleaved, both cases see the same load, so their ratio is what the ratios come from."""
    cases = {name: BUILDERS[b](params) for name, (b, params) in p["cases"].items()}
    names = list(cases)
    for _ in range(WARMUP):
        for n in names:
            cases[n].step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(p["steps"]):
        for n in (names if r % 2 == 0 else names[::-1]):
            c = cases[n]
            if c.device.type == "cuda":
                import torch

                torch.cuda.synchronize(c.device)
            t0 = time.perf_counter()
            c.step()
            if c.device.type == "cuda":
                import torch

                torch.cuda.synchronize(c.device)
            times[n].append(time.perf_counter() - t0)
    out = {n: _rate_fields(times[n], cases[n]) for n in names}
    for c in cases.values():
        c.cleanup()
    return out


def case_gpu_model(p: dict) -> dict:
    from pipeline.bench_gpu import case_gpu_model as case

    return case(p)


def case_gpu_train(p: dict) -> dict:
    from pipeline.bench_gpu import case_gpu_train as case

    return case(p)


CASE_FNS: dict[str, Callable[[dict], dict]] = {
    "alone": case_alone,
    "interleaved": case_interleaved,
    "depth_abc": case_depth_abc,
    "gpu_model": case_gpu_model,  # bench gpu (pipeline/bench_gpu.py)
    "gpu_train": case_gpu_train,
}


def run_case(fn: str, params: dict, *, isolate: bool = True, timeout: float = 3600) -> dict:
    """Run one case, in a fresh ``python -m pipeline.bench`` process when ``isolate``."""
    if not isolate:
        return CASE_FNS[fn](params)
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-m", "pipeline.bench", fn, json.dumps(params)], capture_output=True,
                       text=True, env=env, timeout=timeout)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        hint = "; try a smaller --batch or --size" if "out of memory" in r.stderr.lower() or r.returncode < 0 else ""
        raise BenchError(f"bench case {fn} {params} failed (exit {r.returncode}): {tail}{hint}")
    return json.loads(lines[-1])


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    # 4 significant digits: a ratio far below 1 (the perceptual loss: ~0.02) keeps its precision
    return float(f"{a / b:.4g}") if a is not None and b not in (None, 0) else None


# --------------------------------------------------------------------------------------------------
# benches


def _compare(specs: dict[str, tuple[str, dict]], *, steps: int, isolate: bool) -> dict[str, dict]:
    """Each case alone (its memory and rates), then all of them interleaved in one process (the rates
    that ratios use, under ``"interleaved"``)."""
    cases = {n: run_case("alone", {"builder": b, "params": prm}, isolate=isolate) for n, (b, prm) in specs.items()}
    inter = run_case("interleaved", {"cases": {n: list(v) for n, v in specs.items()}, "steps": steps},
                     isolate=isolate)
    for n in cases:
        cases[n]["interleaved"] = inter[n]
    return cases


def _speed(case: dict) -> float:
    r = case["interleaved"]
    return r["steps_per_s"] if "steps_per_s" in r else r["frames_per_s"]


def bench_teach(*, batch: int, size: int, steps: int, device, isolate: bool = True) -> dict:
    base = {"device": str(device), "batch": batch, "size": size, "steps": steps}
    b_name, w_name = f"width{BASELINE_WIDTH}", f"width{WIDTH}"
    specs = {b_name: ("autolink_step", base | {"width": BASELINE_WIDTH}),
             w_name: ("autolink_step", base | {"width": WIDTH})}
    if device.type == "cuda":
        specs[f"{w_name}_amp"] = ("autolink_step", base | {"width": WIDTH, "amp": True})
    cases = _compare(specs, steps=steps, isolate=isolate)
    b, w = cases[b_name], cases[w_name]
    ratios = {f"steps_per_s {w_name}/{b_name}": _ratio(_speed(w), _speed(b)),
              f"peak_mem_growth {w_name}/{b_name}": _ratio(w["peak_mem_growth_mib"], b["peak_mem_growth_mib"])}
    if device.type == "cuda":
        a = cases[f"{w_name}_amp"]
        ratios[f"steps_per_s {w_name} amp/fp32"] = _ratio(_speed(a), _speed(w))
        ratios[f"peak_mem_growth {w_name} amp/fp32"] = _ratio(a["peak_mem_growth_mib"], w["peak_mem_growth_mib"])
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
    cases = _compare(specs, steps=steps, isolate=isolate)
    ratios = {}
    for a, b in (("channels_last", "nchw"), ("channels_last_bf16", "channels_last")):
        ratios[f"steps_per_s {a}/{b}"] = _ratio(_speed(cases[a]), _speed(cases[b]))
        ratios[f"peak_mem_growth {a}/{b}"] = _ratio(cases[a]["peak_mem_growth_mib"], cases[b]["peak_mem_growth_mib"])
    return {"baseline": "nchw", "cases": cases, "ratios": ratios,
            "setup": {"width": BASELINE_WIDTH, "n_keypoints": PRESET_KEYPOINTS, "heatmap_size": size // 4,
                      "recon_loss": "l1ssim", "optimizer": "AdamW"}}


RECON_LOSSES = ("l1ssim", "l1", "mse", "perceptual")


def bench_recon_loss(*, batch: int, size: int, steps: int, device, isolate: bool = True) -> dict:
    """One training step at the synthetic preset's width with each reconstruction loss; l1ssim is the baseline.

    The perceptual case uses random VGG16 weights: the cost is that of the ImageNet weights (same network),
    what it would learn is not (docs/results.md measures the weight-free losses' quality)."""
    base = {"device": str(device), "batch": batch, "size": size, "steps": steps, "width": BASELINE_WIDTH}
    cases = _compare({n: ("autolink_step", base | {"recon_loss": n}) for n in RECON_LOSSES}, steps=steps,
                     isolate=isolate)
    b = cases["l1ssim"]
    ratios = {}
    for n in RECON_LOSSES[1:]:
        ratios[f"steps_per_s {n}/l1ssim"] = _ratio(_speed(cases[n]), _speed(b))
        ratios[f"peak_mem_growth {n}/l1ssim"] = _ratio(cases[n]["peak_mem_growth_mib"], b["peak_mem_growth_mib"])
    return {"baseline": "l1ssim", "cases": cases, "ratios": ratios,
            "setup": {"width": BASELINE_WIDTH, "n_keypoints": N_KEYPOINTS, "heatmap_size": size // 4,
                      "optimizer": "AdamW", "perceptual": "VGG16 to relu4_3 at 224x224, random weights (same cost)"}}


def bench_teacher_cache(*, batch: int, size: int, steps: int, device, isolate: bool = True) -> dict:
    base = {"device": str(device), "batch": batch, "size": size, "steps": steps}
    cases = _compare({"live_teacher": ("distill_step", base | {"mode": "live"}),
                      "cached_embeddings": ("distill_step", base | {"mode": "cached"})}, steps=steps, isolate=isolate)
    live, cached = cases["live_teacher"], cases["cached_embeddings"]
    return {"baseline": "live_teacher", "cases": cases,
            "ratios": {"speedup cached/live": _ratio(_speed(cached), _speed(live)),
                       "target_s cached/live": _ratio(cached["target_s"], live["target_s"]),
                       "target share of a live step": _ratio(live["target_s"], live["s_per_step"]),
                       "peak_mem_growth cached/live": _ratio(cached["peak_mem_growth_mib"],
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
    ratios = {"frames_per_s stage/bare_model": _ratio(b, a), "frames_per_s stage/run_py_loop": _ratio(b, c),
              "frames_per_s stage_wall/bare_model": _ratio(cases["stage"]["frames_per_s_wall"], a)}
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
            "ratios": {"write frames_per_s cache/npy": _ratio(cases["cache_write"]["frames_per_s"],
                                                              cases["npy_write"]["frames_per_s"]),
                       "read frames_per_s cache/npy": _ratio(cases["cache_read"]["frames_per_s"],
                                                             cases["npy_read"]["frames_per_s"]),
                       "bytes cache/npy": _ratio(cases["cache_write"]["bytes"], cases["npy_write"]["bytes"])},
            "setup": {"n_frames": n, "shard_size": batch, "map": f"{size}x{size} float32",
                      "page_cache": "warm (reads follow writes)"}}


def bench_gpu(**kw) -> dict:
    """The GPU suite of issue 16 (depth: bare / stage / run.py per model, precision, batch; data side; training):
    pipeline/bench_gpu.py, a module of its own for its size."""
    from pipeline.bench_gpu import bench_gpu as suite

    return suite(**kw)


BENCHES: dict[str, Callable[..., dict]] = {
    "teach": bench_teach,
    "train-step": bench_train_step,
    "teacher-cache": bench_teacher_cache,
    "recon-loss": bench_recon_loss,
    "depth": bench_depth,
    "cache": bench_cache,
    "gpu": bench_gpu,
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
    training = ("teach", "train-step", "teacher-cache", "recon-loss", "gpu")  # AutoLink steps at --batch, --size
    if what in training and size % 16:
        raise ConfigError(f"bench {what} --size {size}: AutoLink needs a multiple of 16 (e.g. {size // 16 * 16 or 16})")
    if what in training and batch == 1 and size == 16:
        raise ConfigError(f"bench {what} --batch 1 --size 16: the detector's 1x1 bottleneck leaves BatchNorm one value "
                          "per channel in training; use --batch 2 or --size 32")
    dev = _device(device)
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
    if what == "gpu":
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
    for k, v in rec["ratios"].items():
        console.print(f"  ratio {k} = {_fmt(v)}  (baseline: {rec['baseline']})", markup=False, soft_wrap=True)
    for k, g in rec.get("goals", {}).items():
        console.print(f"  goal {k} >= {g['goal']}: {'met' if g['met'] else 'NOT met'} ({_fmt(g['value'])})",
                      markup=False, soft_wrap=True)
    if output:
        p = Path(output)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        console.print(f"appended to {p}", markup=False, soft_wrap=True)
    if what == "gpu":
        from pipeline.bench_gpu import gpu_markdown

        md = gpu_markdown(rec)
        if output:
            p = Path(output)
            table = p.with_suffix(".md") if p.suffix != ".md" else p.with_suffix(".table.md")
            table.write_text(md + "\n")
            console.print(f"tables written to {table}", markup=False, soft_wrap=True)
        else:
            console.print(md, markup=False, soft_wrap=True)
    return rec


def _main(argv: list[str]) -> None:
    """``python -m pipeline.bench CASE PARAMS_JSON``: run one case, print its JSON result."""
    fn, params = argv[0], json.loads(argv[1])
    print(json.dumps(CASE_FNS[fn](params)), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
