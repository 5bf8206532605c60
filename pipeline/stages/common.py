"""What teach and distill share when they run: model construction from config, losses, the depth the teacher
reads, the frame cache, threads and progress, pictures, the end of a training, model loading, progress and repair
of an interrupted or damaged one."""
from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline import config as C
from pipeline.errors import CheckpointError


def model_args(section: C.TrainConfig, in_channels: int = 3) -> dict:
    m = section.model
    args = dict(n_keypoints=m.n_keypoints, in_channels=in_channels, image_size=m.image_size,
                heatmap_size=m.heatmap_size, thick=m.thick, sklr=m.sklr, mask_ratio=m.mask_ratio,
                mask_blocks=m.mask_blocks, width=m.width)
    if m.extra_blocks:  # only when set: model.pt files of AutoLink's depth keep their arguments
        args["extra_blocks"] = m.extra_blocks
    return args


# model_args key of a student trained with distill.adapter: (student channels, teacher channels) of its 1x1 adapter
ADAPTER_ARG = "distill_adapter"


def build_model(args: dict):
    """An AutoLink from its model_args; a student distilled through a learned adapter (``distill.adapter``) gets
    the adapter as its ``distill_adapter`` submodule, so that its model.pt loads whole (eval never runs it)."""
    from dkp_core.keypoints import AutoLink

    args = dict(args)
    adapter = args.pop(ADAPTER_ARG, None)
    model = AutoLink(**args)
    if adapter is not None:
        from torch import nn

        model.distill_adapter = nn.Conv2d(int(adapter[0]), int(adapter[1]), kernel_size=1)
    return model


def train_settings(section: C.TrainConfig):
    from pipeline.training import TrainSettings

    return TrainSettings.from_config(section)


def attach_frame_cache(ctx, section: C.TrainConfig, ds, *, build: bool = True) -> None:
    """Read ``ds``'s samples from the training-frame cache (pipeline/data/framecache.py) when ``frame_cache`` is
    on: built first if missing, when this training draws at least one epoch of samples (``build``), else only
    reused if another stage or run built it. The samples are the same either way; the keys do not change."""
    if not section.frame_cache or len(ds) == 0:
        return
    from pipeline.data import framecache

    worth = section.steps * section.batch_size >= len(ds)  # under an epoch, decoding each sample is cheaper
    depth_key = ctx.plan.stages["depth"].key if ds.use_depth else None
    framecache.attach(ds, ctx.store.root, depth_key=depth_key, build=build and worth, console=ctx.console)


def reconstruction_loss(section: C.TrainConfig):
    from dkp_core.losses import make_reconstruction_loss

    if section.recon_loss == "perceptual":
        from pipeline.weights.vgg import load_vgg16_state_dict

        return make_reconstruction_loss("perceptual", vgg_state_dict=load_vgg16_state_dict(section.vgg_weights))
    return make_reconstruction_loss(section.recon_loss)


@contextlib.contextmanager
def training_progress():
    """Let the trainer's INFO lines reach stderr while a stage trains.

    ``pipeline.training`` shows a rich bar (steps done/total, loss, steps/s, ETA) on an interactive
    stderr and otherwise *logs* ``step N/TOTAL  loss L  R steps/s  ETA H:MM:SS`` at each metrics line;
    the CLI configures no logging, so without this those lines (and "resuming from ...") would be
    dropped under Slurm, CI or a pipe. If the application already configured logging, only the
    level is raised, so nothing is printed twice.
    """
    logger = logging.getLogger("pipeline.train")  # the trainer's logger (pipeline.training.log)
    old_level = logger.level
    handler = None
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
        logger.setLevel(old_level)


@contextlib.contextmanager
def training_threads(section: C.TrainConfig):
    """Run a training with ``section.deterministic``'s threads; yields what enters the artifact's record.

    On a CPU the float reductions of a convolution's backward pass are split over torch's threads, so their order,
    and the last bits of every gradient, change with the thread count; two two-thread runs of one key differ too
    (docs/results.md, "Run-to-run spread"). One thread is the only count that gives the same weights on any
    machine with the same kernels, so ``deterministic`` trains on one (the thread count is restored after).
    On CUDA it turns on torch's deterministic algorithms (warn-only: an op without one warns) and cuDNN's
    deterministic mode; that path is not measured on a GPU here.

    Yields ``{"threads": N, "deterministic": bool, "cpu_capability": "AVX512" ...}``: the thread count and the
    CPU's kernel family decide the bits of a non-deterministic run, so they are recorded beside every model."""
    import os

    import torch

    before = torch.get_num_threads()
    det_before = torch.are_deterministic_algorithms_enabled()
    cudnn_before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    if section.deterministic:
        torch.set_num_threads(1)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        cap = None
    try:
        yield {"threads": torch.get_num_threads(), "deterministic": bool(section.deterministic), "cpu_capability": cap}
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(det_before)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_before


def load_trained(path: Path):
    """Rebuild an AutoLink from a trainer's model.pt (weights_only). Returns (model in eval(), payload)."""
    from pipeline.store.checkpoint import load_safe

    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    if not p.is_file():
        raise CheckpointError(f"{p}: no trained model here (expected model.pt from teach/distill)")
    payload = load_safe(p)
    args = payload.get("model_args")
    state = payload.get("model") or payload.get("state_dict") or payload.get("model_state")
    if not isinstance(args, dict) or state is None:
        raise CheckpointError(f"{p}: not a distill-dkp model file (no model_args/state); was it written by "
                              "`dkp-pipeline teach` or `distill`?")
    model = build_model(args)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{p}: weights do not fit the model they describe ({str(e).splitlines()[0]})") from None
    return model.eval(), payload


def to_uint8(t) -> np.ndarray:
    """(3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8."""
    a = t.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte().numpy()
    return np.ascontiguousarray(a.transpose(1, 2, 0))


def keypoint_grid(model, batch_images, *, out_png: Path, background=None, max_items: int = 16,
                  dim: float = 0.6) -> np.ndarray:
    """Detect keypoints on ``batch_images`` (B, C, S, S) and save a grid with links drawn on them; returns the
    grid, (H, W, 3) uint8.

    Links are drawn white; the background is darkened to ``dim`` of its brightness so that they stay
    visible on depth pictures, whose near figure is itself white."""
    import torch

    from pipeline.viz import draw_keypoints, grid, save_png

    imgs = batch_images[:max_items]
    dev = next(model.parameters()).device
    with torch.no_grad():
        out = model.detector(imgs.to(dev))
    kp = out.keypoints.float().cpu().numpy()  # (B, K, 2) in [-1, 1]
    S = imgs.shape[-1]
    px = (kp + 1) / 2 * (S - 1)
    w = model.links.edge_weights().detach().float().cpu().numpy()
    bg = background[:max_items] if background is not None else imgs
    tiles = [draw_keypoints((to_uint8(bg[i]) * dim).astype(np.uint8), px[i], links=w, scale=max(1, 256 // S))
             for i in range(len(imgs))]
    out_png.parent.mkdir(parents=True, exist_ok=True)
    picture = grid(tiles, cols=8)
    save_png(out_png, picture)
    return picture


def train_log(ctx):
    """The TensorBoard log of a training stage (None without the ``tensorboard`` package), named after the
    experiment and the plan entry (teach, distill, baseline): see :mod:`pipeline.tblog`."""
    from pipeline import tblog

    return tblog.open_log(ctx.path, f"{ctx.cfg.name}-{tblog.entry_name(ctx)}")


def log_picture(log, step: int, picture: np.ndarray) -> None:
    if log is not None:
        log.image("keypoints", step, picture)


def train_progress(path: Path) -> tuple[int, int]:
    """(steps done, total) of an interrupted training artifact, from its newest checkpoint name."""
    import json

    from pipeline.store.checkpoint import CHECKPOINT_DIRNAME, list_checkpoints

    cks = list_checkpoints(Path(path) / CHECKPOINT_DIRNAME)
    rec = json.loads((Path(path) / "artifact.json").read_text())
    total = int(rec.get("config", {}).get("steps", 0))
    return (cks[-1][0] if cks else 0), total


# Files the end of a training writes again from its final checkpoint (the weights, the loss curve from metrics.jsonl,
# the last picture copied from samples/, the teacher-embedding cache rebuilt before training when absent).
_REMADE_AT_THE_END = ("model.pt", "loss.png", "keypoints.png", "teacher_embeddings")


def repair_training(path: Path, damaged: list[str]) -> None:
    """Prepare a finished training artifact with ``damaged`` files (relative paths) for a resumed run that writes
    them again, exactly as an uninterrupted run did: the damaged files are deleted and so are the checkpoints
    after the newest step whose outputs are all intact, so the trainer resumes from the last checkpoint before
    the damage (from the final one when only what the end writes is damaged; from scratch when no checkpoint is
    early enough: training is deterministic, so the result is the same, only slower). A damaged metrics.jsonl is
    kept: the trainer cuts it after the checkpoint it resumes from, which precedes its first bad line."""
    import re

    from pipeline.store.checkpoint import CHECKPOINT_DIRNAME, list_checkpoints
    from pipeline.training.log import METRICS_FILENAME

    path = Path(path)
    ckpts = list_checkpoints(path / CHECKPOINT_DIRNAME)
    resume_at = ckpts[-1][0] if ckpts else 0  # the newest step from which nothing damaged was written yet
    for rel in damaged:
        picture = re.fullmatch(r"samples/step_(\d+)\.png", rel)
        if rel in _REMADE_AT_THE_END or rel.split("/", 1)[0] in _REMADE_AT_THE_END:
            continue
        if picture:  # drawn after step N: resume from a checkpoint before N
            resume_at = min(resume_at, int(picture.group(1)) - 1)
        elif rel == METRICS_FILENAME:
            resume_at = min(resume_at, _intact_metrics_step(path / rel))
        else:  # anything else the training writes: from the start
            resume_at = 0
    for step, ckpt in ckpts:
        if step > resume_at:
            ckpt.unlink(missing_ok=True)
    for rel in damaged:
        if rel != METRICS_FILENAME:  # its intact lines are kept: the trainer cuts it at the checkpoint it resumes
            (path / rel).unlink(missing_ok=True)
        if "/" in rel and rel.split("/", 1)[0] == "teacher_embeddings":  # its index last: the intact parts are kept
            (path / "teacher_embeddings" / "index.json").unlink(missing_ok=True)  # and the missing ones rebuilt


def _intact_metrics_step(path: Path) -> int:
    """The step of the last line of ``path`` before the first line that does not parse (0: none intact)."""
    import json

    last = 0
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return 0
    for line in text.splitlines():
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            break
        if step <= last:
            break
        last = step
    return last


def open_teacher_depth(ctx):
    """The depth cache as the teacher reads it: degraded when ``depth.degrade`` is set (pipeline/data/degrade.py)."""
    from pipeline.data.degrade import teacher_reader
    from pipeline.depth_cache import DepthCacheReader

    return teacher_reader(DepthCacheReader(ctx.upstream_path("depth")), ctx.cfg.depth.degrade)


def fixed_batch(ds, n: int = 16) -> dict:
    """The first n items (no flip): the same frames in every picture of a run."""
    import torch

    items = [ds[i] for i in range(min(n, len(ds)))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def finish_training(ctx, res, title: str) -> None:
    """The end of a training (rank 0 owns the pictures): its loss curve (loss.png) and its last picture
    (keypoints.png)."""
    from pipeline.viz import loss_curve

    if res.metrics_path.exists():
        loss_curve(res.metrics_path, ctx.path / "loss.png", title=title)
    samples = sorted((ctx.path / "samples").glob("step_*.png"))
    if samples:
        import shutil

        shutil.copyfile(samples[-1], ctx.path / "keypoints.png")


@dataclass
class TrainingInputs:
    """What both trainings open before they build their dataset: their section, the device (cuda:local rank under
    torchrun), the depth as the teacher reads it, and the training frames that have valid depth."""

    section: C.TrainConfig
    device: Any
    reader: Any  # the depth cache as the teacher reads it (depth.degrade applied)
    train_idx: np.ndarray  # (N,) manifest indices of the train split with valid depth


def open_training(ctx, section: str) -> TrainingInputs:
    """The device (an emulated precision refused before any work), the teacher's depth and the training frames."""
    from pipeline.data.datasets import valid_train_indices
    from pipeline.training import resolve_device
    from pipeline.training.runtime import check_amp

    sec = ctx.settings  # the section, hflip resolved (the stage's settings)
    device = resolve_device(sec.device, ctx.process.local_rank)
    check_amp(sec.amp, device, section=section)
    reader = open_teacher_depth(ctx)
    return TrainingInputs(sec, device, reader, valid_train_indices(ctx.plan.manifest, reader, "train"))


def train_stage(ctx, inputs: TrainingInputs, *, dataset, model, args: dict, step_fn, pictures: str, title: str,
                collate_fn=None, record: Optional[dict] = None) -> dict:
    """What teach and distill do around the trainer, once: the fixed picture batch (the first test frames, ``pictures``
    "depth" or "rgb", drawn at every eval step), the TensorBoard log, the trainer (its threads, its progress lines,
    the checkpoints and model.pt, which records the stage and its ``input``), then the end: the loss curve, the last
    picture and the result for artifact.json (``record``: the stage's own fields). Returns the trainer's result and
    the result dict as ``(res, result)``. The stage seeds and builds its model before (the initial weights are part
    of the run's identity)."""
    from pipeline.data.datasets import FrameDataset, collate_frames
    from pipeline.training import train

    m, sec = ctx.plan.manifest, inputs.section
    test = m.split("test")
    vis_idx = test[:16] if len(test) else inputs.train_idx[:16]
    vis = fixed_batch(FrameDataset(manifest=m, indices=vis_idx, image_size=sec.model.image_size, use_rgb=True,
                                   use_depth=pictures == "depth", depth_reader=inputs.reader))
    log = train_log(ctx)

    def on_eval(step, model):
        log_picture(log, step, keypoint_grid(model, vis[pictures], background=vis[pictures],
                                             out_png=ctx.path / "samples" / f"step_{step:06d}.png"))

    with training_progress(), training_threads(sec) as threads:
        res = train(run_dir=ctx.path, model=model, dataset=dataset.loader_view(), step_fn=step_fn,
                    settings=train_settings(sec), config=ctx.run_config, on_eval=on_eval, config_hash=ctx.stage.key,
                    model_args=args, train_log=log, collate_fn=collate_fn or collate_frames,
                    model_info={"stage": ctx.stage.stage, "input": pictures, "image_size": sec.model.image_size,
                                "depth_norm": sec.depth_norm})
    if ctx.process.is_main:
        finish_training(ctx, res, title)
    result = {"steps": res.steps, "final_loss": res.final_loss, "steps_per_s": res.steps_per_s, "amp": res.amp_dtype,
              "world_size": res.world_size, "device": res.device, "n_train_frames": len(dataset), **threads,
              **(record or {})}
    return res, result


def figure_mass(model, manifest, indices, size: int, key: str, reader, device) -> dict | None:
    """Share of the detector's heatmap mass on the figure (pipeline.data.foreground), when masks are known.

    Independent of the regression: a detector whose keypoints ignore the figure has mass ~ the figure's area
    fraction. Returns {"mass_in_mask", "mask_area", "ratio", "n_frames"} or None (no masks for this dataset).
    """
    import torch

    from pipeline.data.datasets import FrameDataset
    from pipeline.data.foreground import foreground_masks, heatmap_mass_in_mask

    if len(indices) == 0:
        return None
    masks = foreground_masks(manifest, indices, size)
    if masks is None:
        return None
    ds = FrameDataset(manifest=manifest, indices=indices, image_size=size, use_rgb=key == "rgb",
                      use_depth=key == "depth", depth_reader=reader)
    x = torch.stack([ds[i][key] for i in range(len(ds))]).to(device)
    with torch.no_grad():
        heat = model.to(device).eval().detector(x).heatmaps.float().cpu().numpy()  # (N, K, h, w)
    return heatmap_mass_in_mask(heat, masks) | {"n_frames": int(len(indices))}
