"""The training-step cases: AutoLink's step and the distillation step, built from the stages' own step function.

Both run :func:`pipeline.stages.distill.distill_step` (at gamma 0 it is plain AutoLink, the reconstruction step
the teach stage runs on its depth input) inside one optimiser step as the trainer runs it (zero_grad, the step
under autocast, GradScaler, AdamW with the config's default lr and weight decay). The distillation target comes
from a live frozen teacher (:func:`~pipeline.stages.distill.teacher_embedding`) or from the stage's teacher
embedding cache (written by :func:`~pipeline.stages.distill.build_embedding_cache`, read through
:class:`~pipeline.stages.distill.EmbeddingCache`). Inputs are random tensors already on the device.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from pipeline.bench.harness import WARMUP, Case, amp_name, amp_of, autocast, bench_device, rate, sync

N_KEYPOINTS = 16  # AutoLink's K for Human3.6M / DeepFashion
WIDTH = 64  # AutoLink's detector/decoder width
BASELINE_WIDTH = 16  # the synthetic preset's width
PRESET_KEYPOINTS = 10  # the synthetic preset's K


def _autolink(size: int, width: int, device, n_keypoints: int = N_KEYPOINTS):
    from dkp_core.keypoints import AutoLink

    return AutoLink(n_keypoints=n_keypoints, image_size=size, heatmap_size=size // 4, width=width).to(device)


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


def _optimiser_step(model, step_fn, batch: dict, p: dict, device):
    """``(step, amp)``: ``step()`` is one optimiser step of ``step_fn`` on ``batch`` as the trainer takes it."""
    import torch

    from pipeline.config import DistillConfig
    from pipeline.training import StepContext

    defaults = DistillConfig()
    opt = torch.optim.AdamW(model.parameters(), lr=defaults.lr, weight_decay=defaults.weight_decay)
    amp = amp_of(p, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    gen = torch.Generator(device=device).manual_seed(0)
    sctx = StepContext(step=0, epoch=0, rank=0, world_size=1, device=device, generator=gen, module=model,
                       amp_dtype=amp)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss, _ = step_fn(model, batch, sctx)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step, amp


def build_autolink_step(p: dict) -> Case:
    """One AutoLink training step (forward, reconstruction loss ``p["recon_loss"]`` (default l1ssim),
    backward, AdamW) as the trainer does it."""
    import torch

    from pipeline.stages.distill import distill_step

    device = bench_device(p["device"])
    torch.manual_seed(0)
    model = _autolink(p["size"], p["width"], device, p.get("n_keypoints", N_KEYPOINTS)).train()
    if p.get("channels_last"):
        model.to(memory_format=torch.channels_last)  # what the trainer does (train.channels_last)
    recon = _reconstruction_loss(p.get("recon_loss", "l1ssim")).to(device)
    x = torch.rand(p["batch"], 3, p["size"], p["size"], device=device) * 2 - 1  # (B, 3, S, S)
    step_fn = distill_step(recon, None, gamma=0.0, layer="logits", flatten="sample")  # gamma 0: no target
    step, amp = _optimiser_step(model, step_fn, {"rgb": x}, p, device)
    n_params = sum(t.numel() for t in model.parameters())
    n_loss = sum(t.numel() for t in recon.parameters())  # the perceptual loss's frozen VGG16
    return Case(step, device=device, extra=lambda: {
        "params_m": round(n_params / 1e6, 3), "amp": amp_name(amp),
        "recon_loss": p.get("recon_loss", "l1ssim"), "loss_params_m": round(n_loss / 1e6, 3),
        "channels_last": bool(p.get("channels_last"))})


class _RandomDepthFrames:
    """What :func:`~pipeline.stages.distill.build_embedding_cache` reads of its FrameDataset (``indices``,
    ``manifest.split("all")``, ``load(i, flip)["depth"]``), for ``depth`` (N, 3, S, S): frames 0..N-1, all training."""

    def __init__(self, depth) -> None:
        import numpy as np

        self.depth = depth
        self.indices = np.arange(len(depth))
        self.manifest = self

    def split(self, _name: str):
        return self.indices

    def __len__(self) -> int:
        return len(self.depth)

    def load(self, i: int, _flip: bool) -> dict:
        return {"depth": self.depth[i]}


def build_distill_step(p: dict) -> Case:
    """A distillation step: student AutoLink step + (live frozen teacher | cached embeddings) + gamma (1 - cos)
    (the config's default gamma, layer and flatten); the whole step under autocast when ``p["amp"]`` (as the
    trainer runs it), channels_last when asked. The cached case first builds the embedding cache of
    B x (steps + warm-up) random depth frames with both flips, untimed (on a CPU the peak RSS includes it)."""
    import io

    import torch
    from rich.console import Console

    from pipeline.config import DistillConfig
    from pipeline.stages.distill import EmbeddingCache, build_embedding_cache, distill_step, teacher_embedding

    device = bench_device(p["device"])
    defaults = DistillConfig()
    B, S, steps = p["batch"], p["size"], p["steps"]
    torch.manual_seed(0)
    width = p.get("width", WIDTH)
    student = _autolink(S, width, device).train()
    recon = _reconstruction_loss("l1ssim").to(device)
    rgb = torch.rand(B, 3, S, S, device=device) * 2 - 1  # (B, 3, S, S)
    teacher = _autolink(S, width, device).eval()
    if p.get("channels_last"):
        teacher.to(memory_format=torch.channels_last)
    for t in teacher.parameters():
        t.requires_grad_(False)
    tmp = None
    if p["mode"] == "live":
        depth = torch.rand(B, 3, S, S, device=device) * 2 - 1
        batch = {"rgb": rgb, "depth": depth}

        def target(b):
            return teacher_embedding(teacher, b["depth"], defaults.layer)
    else:
        n = B * (steps + WARMUP)
        tmp = tempfile.TemporaryDirectory(prefix="dkp-bench-")
        path = Path(tmp.name) / "teacher_embeddings.h5"
        frames = _RandomDepthFrames(torch.rand(n, 3, S, S) * 2 - 1)
        build_embedding_cache(path, teacher, frames, defaults.layer, True, device, Console(file=io.StringIO()))
        del teacher, frames
        cache = EmbeddingCache(path)
        counter = {"s": 0}
        batch = {"rgb": rgb, "flip": torch.zeros(B, dtype=torch.bool)}

        def target(b):
            idx = torch.arange(counter["s"] * B, (counter["s"] + 1) * B) % n
            counter["s"] += 1
            return cache.lookup(idx, b["flip"]).to(device)

    target_times: list[float] = []

    def timed_target(b):
        t0 = time.perf_counter()
        t = target(b)
        sync(device)
        target_times.append(time.perf_counter() - t0)
        return t

    if p.get("channels_last"):
        student.to(memory_format=torch.channels_last)  # what the trainer does (train.channels_last)
    step_fn = distill_step(recon, timed_target, gamma=defaults.gamma, layer=defaults.layer, flatten=defaults.flatten)
    step, amp = _optimiser_step(student, step_fn, batch, p, device)

    def cleanup():
        if tmp is not None:
            cache.close()
            tmp.cleanup()

    return Case(step, device=device, extra=lambda: {"target_s": rate(target_times[WARMUP:])["median_s"],
                                                    "amp": amp_name(amp),
                                                    "channels_last": bool(p.get("channels_last"))},
                cleanup=cleanup)


def case_train_window(p: dict) -> dict:
    """The AutoLink step of ``p["params"]`` on ``p["threads"]`` torch threads, in a process of its own: after the
    warm-up it writes ``p["ready"]``, waits for ``p["go"]`` (so that processes started together are timed over
    the same window) and times ``steps`` steps. Returns the window's absolute start and end (``time.time()``)."""
    import os

    import torch

    torch.set_num_threads(int(p["threads"]))
    params = p["params"]
    case = build_autolink_step(params)
    for _ in range(WARMUP):
        case.step()
    Path(p["ready"]).touch()
    deadline = time.time() + 600
    while not os.path.exists(p["go"]):
        if time.time() > deadline:
            raise TimeoutError("no go signal within 600 s")
        time.sleep(0.01)
    t0 = time.time()
    for _ in range(params["steps"]):
        case.step()
    return {"start": t0, "end": time.time(), "steps": params["steps"], "threads": torch.get_num_threads()}
