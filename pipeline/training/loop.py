"""The training loop: :func:`train`, read top to bottom.

Setup (device, process group, SyncBatchNorm, optimiser), resume from the newest checkpoint, then one iteration
per optimiser step: seed, forward under autocast, the loss and metrics recorded on the device, backward, and at a
*sync point* (a metrics line, a checkpoint, an eval, the end, a stop) the one host read of the interval: the
non-finite check, "stop?", metrics line, eval, checkpoint. Between sync points a step reads nothing back from the
device, so on a GPU the host queues the next step while the device computes this one. The pieces it calls live
beside it: :mod:`.settings`, :mod:`.sampling`, :mod:`.rng`, :mod:`.runtime`, :mod:`.log`, :mod:`.resume`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from pipeline.store.checkpoint import CHECKPOINT_DIRNAME, check_plain, checkpoint_name, remove_stale_temporaries
from pipeline.training.log import METRICS_FILENAME, Accumulator, Progress, StepMeter, append_metrics, log, \
    read_metric_lines, truncate_metrics
from pipeline.training.resume import MODEL_FILENAME, RunState, config_digest, resume, save_checkpoint, save_model
from pipeline.training.rng import seed_global_rngs
from pipeline.training.runtime import (Dist, NonFiniteLossError, StopSignals, TrainingInterrupted, amp_name, barrier,
                                       check_training_group, make_optimizer, resolve_amp, setup_distributed,
                                       to_device)
from pipeline.training.sampling import TAG_STEP_GENERATOR, ByEpochIndex, StepBatchSampler, derive_seed, worker_init
from pipeline.training.settings import (EpochDataset, StepContext, StepFn, TrainLog, TrainResult, TrainSettings,
                                        lr_factor)


def train(*, run_dir: Path, model: nn.Module, dataset: EpochDataset, step_fn: StepFn, settings: TrainSettings,
          config: Mapping[str, Any], on_eval: Callable[[int, nn.Module], None] | None = None,
          params: Iterable[nn.Parameter] | None = None, config_hash: str | None = None,
          model_args: Mapping[str, Any] | None = None,
          collate_fn: Callable[[list[Any]], Any] | None = None, train_log: TrainLog | None = None,
          model_info: Mapping[str, Any] | None = None) -> TrainResult:
    """Train ``model`` with AdamW for ``settings.steps`` steps, resuming from ``run_dir`` if possible.

    Args:
        run_dir: where ``checkpoints/``, ``metrics.jsonl`` and ``model.pt`` go; must be private to
            this run (hold the artifact lock) and, for multi-node DDP, shared by all nodes.
        model: trained in place (moved to the device; BatchNorm → SyncBatchNorm under DDP on CUDA).
        dataset: an :class:`EpochDataset`.
        step_fn: ``(model, batch, ctx) -> (loss, metrics)``: a scalar loss tensor to minimise and a
            dict of values to log (same keys every step): 0-d tensors (kept on the device until the
            metrics line: return ``x.detach()``, not ``x.item()``, which waits for the GPU every step) or
            numbers. Runs under autocast when AMP is on.
        settings: :class:`TrainSettings`.
        config: the resolved config; stored in every checkpoint and in ``model.pt`` (plain values only).
        on_eval: called on rank 0 as ``on_eval(step, model)`` every ``eval_every`` steps and at the
            end, with the unwrapped model in ``eval()`` mode under ``no_grad``.
        params: the parameters to optimise (default: every ``model`` parameter with
            ``requires_grad``); they must belong to ``model`` so checkpoints hold them.
        config_hash: identity of the semantic config (the artifact key); a checkpoint written
            under another hash is refused. Default: :func:`config_digest` of ``config``.
        model_args: constructor arguments of the model, stored in ``model.pt`` so it can be rebuilt.
        model_info: what a reader of ``model.pt`` needs besides the weights (the stage that trained it, its input
            modality, size and normalisation), stored there as ``info`` (plain values only).
        collate_fn: DataLoader collate function (default: torch's ``default_collate``).
        train_log: a :class:`TrainLog` that also receives every metrics line (TensorBoard); rank 0 only.

    Returns:
        :class:`TrainResult`. Raises :class:`TrainingInterrupted` after checkpointing on
        SIGTERM/SIGINT (one process: after the current step; under torchrun: at the next sync point,
        so that every rank stops at the same step), :class:`NonFiniteLossError` on a NaN/Inf loss (at
        the next sync point, before anything of that step or later is written), and
        :class:`~pipeline.errors.CheckpointError` for a checkpoint that does not fit this run.
    """
    if not (hasattr(dataset, "get") and hasattr(dataset, "__len__")):
        raise TypeError(f"dataset {type(dataset).__name__} must implement __len__() and get(index, epoch)")
    check_plain(dict(config), "config")
    if model_args is not None:
        check_plain(dict(model_args), "model_args")
    if model_info is not None:
        check_plain(dict(model_info), "model_info")
    # The group lives as long as the process (runtime.init_default_group): `dkp-pipeline run` under torchrun
    # trains teach and then distill in one process.
    dist_env, device = setup_distributed(settings.device)
    return _train(run_dir=Path(run_dir), model=model, dataset=dataset, step_fn=step_fn, settings=settings,
                  config=dict(config), on_eval=on_eval, params=params, config_hash=config_hash or config_digest(config),
                  model_args=dict(model_args or {}), collate_fn=collate_fn, dist_env=dist_env, device=device,
                  train_log=train_log if dist_env.is_main else None, model_info=dict(model_info or {}))


def _train(*, run_dir: Path, model: nn.Module, dataset: EpochDataset, step_fn: StepFn, settings: TrainSettings,
           config: dict[str, Any], on_eval: Callable[[int, nn.Module], None] | None,
           params: Iterable[nn.Parameter] | None, config_hash: str, model_args: dict[str, Any],
           collate_fn: Callable[[list[Any]], Any] | None, dist_env: Dist, device: torch.device,
           train_log: TrainLog | None = None, model_info: dict[str, Any] | None = None) -> TrainResult:
    rank, world, is_main = dist_env.rank, dist_env.world_size, dist_env.is_main
    ckpt_dir = run_dir / CHECKPOINT_DIRNAME
    metrics_path = run_dir / METRICS_FILENAME
    model_path = run_dir / MODEL_FILENAME
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temporaries(run_dir) + remove_stale_temporaries(ckpt_dir):
            log.info("removed %s left by an interrupted run", stale)

    # ---- setup -----------------------------------------------------------------------------------
    amp_dtype = resolve_amp(settings.amp, device, allow_slow=settings.allow_slow_amp)
    sampler = StepBatchSampler(dataset_len=len(dataset), batch_size=settings.batch_size, seed=settings.seed,
                               start_step=0, end_step=settings.steps, rank=rank, world_size=world)
    model = _place(model, settings, device, world, is_main, sampler.local_batch, dist_env.group)
    optimizer = make_optimizer(_trainable(model, params), settings, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = RunState(model=model, optimizer=optimizer, scaler=scaler, acc=Accumulator(), sampler=sampler,
                     settings=settings, config=config, config_hash=config_hash, amp_dtype=amp_dtype, world=world,
                     group=dist_env.group)
    acc = state.acc

    # ---- resume ----------------------------------------------------------------------------------
    start_step, last_ckpt = resume(state, ckpt_dir, device, is_main)
    if is_main:
        truncate_metrics(metrics_path, start_step)
    wrapped: nn.Module = model
    if world > 1:
        check_training_group(dist_env.group, device)  # never DDP over a gloo-only group on CUDA
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, process_group=dist_env.group)
        if is_main:
            log.info("DDP over %d ranks on %s, process group backend %s", world, device.type,
                     dist.get_backend(dist_env.group))
    sampler.start_step = start_step
    loader_iter: Iterator[Any] = iter(())
    if start_step < settings.steps:
        loader_iter = iter(make_loader(dataset, sampler, settings, device, collate_fn))

    # ---- the loop --------------------------------------------------------------------------------
    stop = StopSignals()
    stop.install()
    progress = Progress(total=settings.steps, start=start_step, bar=is_main and sys.stderr.isatty(), log_lines=is_main)
    # Every log point is a sync point, so at most log_every steps wait on the device between two reads.
    meter = StepMeter(device, capacity=settings.log_every)
    last_record: dict[str, Any] | None = None
    t_loop = time.perf_counter()
    done = start_step
    if train_log is not None:
        train_log.start(start_step)
    try:
        for step in range(start_step, settings.steps):
            batch = next(loader_iter)
            epoch = step // sampler.steps_per_epoch
            seed_global_rngs(settings.seed, step, rank)  # dropout & co: a function of (seed, step, rank)
            generator = torch.Generator(device=device).manual_seed(
                derive_seed(TAG_STEP_GENERATOR, settings.seed, step, rank))
            ctx = StepContext(step=step, epoch=epoch, rank=rank, world_size=world, device=device,
                              generator=generator, module=model, amp_dtype=amp_dtype)
            batch = to_device(batch, device)
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * lr_factor(settings, step)
            optimizer.zero_grad(set_to_none=True)
            autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                        else contextlib.nullcontext())
            with autocast:
                loss, metrics = step_fn(wrapped, batch, ctx)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise TypeError(f"step_fn must return a scalar loss tensor first, got {type(loss).__name__} "
                                f"{tuple(getattr(loss, 'shape', ()))}")
            meter.add(step, loss, metrics)  # stays on the device until the next sync point

            scaler.scale(loss).backward()
            scaler.step(optimizer)  # fused AdamW on CUDA: an overflow step is skipped on the device, no read
            scaler.update()
            done = step + 1
            progress.step(done)

            is_log = done % settings.log_every == 0 or done == settings.steps
            is_ckpt = done % settings.checkpoint_every == 0 or done == settings.steps
            is_eval = on_eval is not None and ((settings.eval_every and done % settings.eval_every == 0)
                                               or done == settings.steps)
            # One process stops right after the signalled step; under torchrun the ranks agree on the step at
            # the next sync point (in its one collective), so no rank waits in a collective the others skipped.
            signalled_alone = world == 1 and stop.signum is not None
            if not (is_log or is_ckpt or is_eval or signalled_alone):
                continue

            # ---- a sync point: the one host read since the last one --------------------------------------
            rows, stop_after_this_step, scale = meter.sync(
                world=world, group=dist_env.group, stop=stop.signum is not None,
                scale=_scale_tensor(scaler) if is_log and scaler.is_enabled() else None)
            for row_step, loss_value, _ in rows:
                if not math.isfinite(loss_value):  # the first bad step; nothing of it or later is written
                    raise NonFiniteLossError(_nonfinite_message(loss_value, row_step, settings, sampler, run_dir,
                                                                last_ckpt))
            for _, loss_value, step_metrics in rows:
                acc.add(loss_value, step_metrics)

            # Order matters for resume: the metrics line for `done` is written before the checkpoint
            # of `done`, so a checkpoint never exists without the lines up to it.
            if is_log:
                record = {"step": done, "epoch": epoch, **acc.means()}
                if scale is not None:
                    record["loss_scale"] = scale
                acc.reset()
                last_record = record
                if is_main:
                    append_metrics(metrics_path, record)
                    progress.step(done, record["loss"])
                    progress.logged(done, record["loss"])
                    if train_log is not None:
                        train_log.scalars(done, {k: v for k, v in record.items() if k not in ("step", "epoch")}
                                          | {"lr": optimizer.param_groups[0]["lr"]})
            if is_eval and is_main:
                _run_eval(on_eval, done, model)
            if is_ckpt or (stop_after_this_step and done < settings.steps):
                last_ckpt = save_checkpoint(state, ckpt_dir, done) if is_main else ckpt_dir / checkpoint_name(done)
            if stop_after_this_step and done < settings.steps:
                stop_signum = stop.signum or signal.SIGTERM  # another rank's signal: report SIGTERM
                barrier(dist_env, device)  # let rank 0 finish writing before torchrun sees the others exit
                raise TrainingInterrupted(
                    f"training stopped by {signal.Signals(stop_signum).name} after step {done}/{settings.steps}; "
                    f"checkpoint {last_ckpt} saved. Re-run the same command to continue from it.", stop_signum)
    finally:
        progress.close()
        stop.restore()
        if train_log is not None:
            train_log.close()

    # ---- the end ---------------------------------------------------------------------------------
    loop_s = time.perf_counter() - t_loop
    if last_record is None and is_main:
        lines = read_metric_lines(metrics_path)
        last_record = json.loads(lines[-1][1]) if lines else None
    if is_main:
        save_model(state, model_path, model_args, info=model_info)
    barrier(dist_env, device)
    ran = done - start_step
    return TrainResult(steps=settings.steps, resumed_from=start_step,
                       final_loss=float(last_record["loss"]) if last_record else float("nan"),
                       model_path=model_path, metrics_path=metrics_path, checkpoint_path=last_ckpt,
                       steps_per_s=ran / loop_s if ran and loop_s > 0 else 0.0, amp_dtype=amp_name(amp_dtype),
                       world_size=world, device=str(device))


def make_loader(dataset: EpochDataset, sampler: StepBatchSampler, settings: TrainSettings, device: torch.device,
                collate_fn: Callable[[list[Any]], Any] | None = None) -> DataLoader:
    """The trainer's DataLoader: ``sampler``'s batches of ``dataset.get(index, epoch)`` from ``num_workers``
    processes, pinned on CUDA so that :func:`to_device`'s non-blocking copies are asynchronous."""
    return DataLoader(ByEpochIndex(dataset), batch_sampler=sampler, num_workers=settings.num_workers,
                      collate_fn=collate_fn, pin_memory=device.type == "cuda",
                      worker_init_fn=functools.partial(worker_init, os.getpid()) if settings.num_workers else None)


def _place(model: nn.Module, settings: TrainSettings, device: torch.device, world: int, is_main: bool,
           local_batch: int, group: Any = None) -> nn.Module:
    """``model`` on ``device`` (NHWC if ``channels_last``), with SyncBatchNorm over ``group`` under DDP on CUDA."""
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D parameters only; convolutions then run NHWC
    if world > 1 and settings.sync_batchnorm:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
        elif is_main and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            log.warning("SyncBatchNorm needs CUDA; on CPU each rank normalises over its own %d samples", local_batch)
    return model


def _trainable(model: nn.Module, params: Iterable[nn.Parameter] | None) -> list[nn.Parameter]:
    owned = {id(p) for p in model.parameters()}
    trainable = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: pass params= or set requires_grad on the model's parameters")
    if any(id(p) not in owned for p in trainable):
        raise ValueError("params must be parameters of `model`, otherwise checkpoints would not contain them")
    return trainable


def _scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The GradScaler's scale as a device tensor (``get_scale()`` would read it to the host: a sync of its own)."""
    get = getattr(scaler, "_get_scale_async", None)  # torch's own accessor; private, hence the fallback
    return get() if get is not None else torch.tensor(scaler.get_scale())


def _run_eval(on_eval: Callable[[int, nn.Module], None], step: int, model: nn.Module) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            on_eval(step, model)
    finally:
        model.train(was_training)


def _nonfinite_message(value: float, step: int, settings: TrainSettings, sampler: StepBatchSampler,
                       run_dir: Path, last_ckpt: Path | None) -> str:
    indices = sampler.global_batch(step).tolist()
    shown = ", ".join(map(str, indices[:8])) + (", …" if len(indices) > 8 else "")
    where = (f"last good checkpoint: {last_ckpt}" if last_ckpt is not None
             else "no checkpoint was written before it")
    return (f"training diverged: the loss is {value} at step {step + 1}/{settings.steps} in {run_dir} "
            f"(epoch {step // sampler.steps_per_epoch}, samples {shown}); {where}. Re-running resumes there and "
            f"meets the same step again with the same settings: lower lr (now {settings.lr}), set amp to 'off' "
            f"(now {settings.amp!r}), or check those samples for NaN/Inf.")
