"""Checkpoints: what one holds, whether it may be resumed by this run, and putting its state back.

A checkpoint (``checkpoints/step_*.pt``, written by :func:`pipeline.store.checkpoint.save_atomic`) holds the model,
the optimiser, the GradScaler, the global RNG states, the metrics since the last line and the sampler's
position; with randomness a pure function of (seed, step, rank) that is all an exact resume needs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.store.checkpoint import checkpoint_name, latest_checkpoint, prune_checkpoints, save_atomic
from pipeline.errors import CheckpointError
from pipeline.store.io import json_digest
from pipeline.training.log import Accumulator, log
from pipeline.training.rng import rng_state, set_rng_state
from pipeline.training.runtime import amp_name
from pipeline.training.sampling import StepBatchSampler
from pipeline.training.settings import TrainSettings

CHECKPOINT_FORMAT = "dkp.train-checkpoint/1"
MODEL_FORMAT = "dkp.model/1"
MODEL_FILENAME = "model.pt"


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``config`` (sorted keys, no whitespace)."""
    return json_digest(config, allow_nan=True, default=str)


@dataclasses.dataclass
class RunState:
    """Everything a checkpoint saves and restores, besides the RNGs (global, saved by :mod:`.rng`)."""

    model: nn.Module  # unwrapped (never the DDP wrapper: its state_dict keys carry a "module." prefix)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    acc: Accumulator
    sampler: StepBatchSampler
    settings: TrainSettings
    config: dict[str, Any]
    config_hash: str
    amp_dtype: torch.dtype | None
    world: int
    group: Any = None  # the training process group (runtime.Dist.group)


def save_checkpoint(state: RunState, ckpt_dir: Path, done: int) -> Path:
    """Write the checkpoint of step ``done`` atomically and prune to ``keep_checkpoints``; returns its path."""
    s, sampler = state.settings, state.sampler
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": done,
        "config_hash": state.config_hash,
        "config": state.config,
        "settings": dataclasses.asdict(s),
        "amp_dtype": amp_name(state.amp_dtype),
        "world_size": state.world,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": rng_state(),
        "sampler": {"seed": s.seed, "batch_size": s.batch_size, "dataset_len": sampler.dataset_len,
                    "steps_per_epoch": sampler.steps_per_epoch, "step": done,
                    "epoch": done // sampler.steps_per_epoch, "index_in_epoch": done % sampler.steps_per_epoch},
        "metrics": state.acc.state(),
        "versions": {"torch": str(torch.__version__), "numpy": str(np.__version__)},
    }
    path = save_atomic(payload, ckpt_dir / checkpoint_name(done))
    prune_checkpoints(ckpt_dir, s.keep_checkpoints)
    return path


def resume(state: RunState, ckpt_dir: Path, device: torch.device, is_main: bool) -> tuple[int, Path | None]:
    """Restore the newest checkpoint in ``ckpt_dir`` into ``state`` (and the global RNGs).

    Returns ``(start_step, checkpoint path or None)``; ``(0, None)`` for a fresh run."""
    found = latest_checkpoint(ckpt_dir)
    start_step = found[0] if found else 0
    if state.world > 1:
        # Every rank must resume from the same step, else the collectives of the loop deadlock.
        t = torch.tensor([start_step, -start_step], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=state.group)
        if int(t[0]) != -int(t[1]):
            raise CheckpointError(f"ranks found different checkpoints in {ckpt_dir} (steps {-int(t[1])}..{int(t[0])}); "
                                  "run_dir must be on a file system shared by all nodes")
    if not found:
        return 0, None
    step, path, ckpt = found
    check_resumable(ckpt, path=path, settings=state.settings, config_hash=state.config_hash, sampler=state.sampler,
                    amp_dtype=state.amp_dtype, world=state.world)
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    state.acc.load(ckpt["metrics"])
    if is_main:
        log.info("resuming from %s (step %d/%d)", path, step, state.settings.steps)
    return start_step, path


def save_model(state: RunState, path: Path, model_args: dict[str, Any], info: dict[str, Any] | None = None) -> None:
    """The final weights (CPU tensors) with what rebuilds the model, ``model.pt``; ``info``: what a reader needs
    besides (the stage that trained it, its input modality...), absent when the caller gave none."""
    state_dict = {k: v.detach().cpu() for k, v in state.model.state_dict().items()}
    payload = {"format": MODEL_FORMAT, "state_dict": state_dict, "model_args": model_args, "config": state.config,
               "config_hash": state.config_hash, "step": state.settings.steps}
    if info:
        payload["info"] = info
    save_atomic(payload, path)


def check_resumable(ckpt: Mapping[str, Any], *, path: Path, settings: TrainSettings, config_hash: str,
                    sampler: StepBatchSampler, amp_dtype: torch.dtype | None, world: int) -> None:
    fix = f"use a fresh run directory, or delete {path.parent} to start this run from scratch"
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a dkp-pipeline training checkpoint (format {ckpt.get('format')!r}, "
                              f"expected {CHECKPOINT_FORMAT!r}); {fix}")
    if ckpt["config_hash"] != config_hash:
        raise CheckpointError(f"{path} was written for another config (hash {str(ckpt['config_hash'])[:12]}…, "
                              f"this run's is {config_hash[:12]}…); it cannot be resumed with this config; {fix}")
    saved = ckpt["settings"]
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(settings, k)!r}"
             for k in TrainSettings.RESUME_MUST_MATCH
             if (tuple(saved.get(k)) if k == "betas" else saved.get(k)) != getattr(settings, k)]
    if ckpt["amp_dtype"] != amp_name(amp_dtype):
        diffs.append(f"amp: checkpoint {ckpt['amp_dtype']!r} vs now {amp_name(amp_dtype)!r}")
    if ckpt["sampler"]["dataset_len"] != sampler.dataset_len:
        diffs.append(f"training-set size: checkpoint {ckpt['sampler']['dataset_len']} vs now {sampler.dataset_len}")
    if diffs:
        raise CheckpointError(f"{path} cannot be resumed exactly by this run: " + "; ".join(diffs) + f"; {fix}")
    if ckpt["step"] > settings.steps:
        raise CheckpointError(f"{path} is at step {ckpt['step']}, past steps={settings.steps}; "
                              f"raise steps to at least {ckpt['step']} or {fix}")
    if ckpt["world_size"] != world:
        log.warning("%s was written by %d rank(s), resuming with %d: the same samples per step (global sampler), "
                    "but BatchNorm statistics and float sums differ slightly", path, ckpt["world_size"], world)
