"""One trainer for ``teach`` and ``distill``: exact resume, atomic checkpoints, DDP, AMP, progress.

The caller brings the model, the dataset and a *step function*; this module owns everything that
must be right for a run that lasts days on shared machines:

* **Randomness is a pure function of (seed, step, rank)** — never of how the run was interrupted.
  The sampler's order is a permutation seeded by ``(seed, epoch)``; a sample's augmentation is the
  dataset's business but must be seeded by ``(seed, epoch, index)`` (see :class:`EpochDataset`,
  :func:`sample_generator`); every step gets a fresh ``torch.Generator`` seeded by
  ``(seed, step, rank)`` for masks, and the global python/numpy/torch RNGs are reseeded from the
  same triple before each step so dropout is covered too. Resuming therefore needs only the step
  number, the weights, the optimiser and the scaler, and a resumed CPU run ends bitwise identical
  to an uninterrupted one (tests/faults/test_train_kill.py).
* **Checkpoints** every ``checkpoint_every`` steps, at the end, and on SIGTERM/SIGINT, written by
  :func:`pipeline.checkpoint.save_atomic` (tmp + fsync + ``os.replace``); the newest
  ``keep_checkpoints`` are kept. Re-running the same command resumes from the newest one.
* **DDP** when started by ``torchrun`` (``WORLD_SIZE`` > 1): gloo on CPU, nccl on CUDA; the global
  batch is split across ranks, so one rank and N ranks see the same samples per step.

What a step function looks like (the model it receives is DDP-wrapped under torchrun: call it,
do not reach into its submodules for the forward pass, or gradients will not be synchronised)::

    def step_fn(model, batch, ctx):
        recon = model(batch["image"], generator=ctx.generator)
        loss = (recon - batch["image"]).abs().mean()
        return loss, {"l1": loss.item()}
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from pipeline.store.checkpoint import (
    CHECKPOINT_DIRNAME,
    check_plain,
    checkpoint_name,
    latest_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
    save_atomic,
)
from pipeline.errors import CheckpointError, ConfigError, DkpError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dkp.train-checkpoint/1"
MODEL_FORMAT = "dkp.model/1"
METRICS_FILENAME = "metrics.jsonl"
MODEL_FILENAME = "model.pt"

# Stream tags keep the seeds of different consumers apart even when (seed, a, b) coincide.
_TAG_SAMPLER = 1
_TAG_STEP_GENERATOR = 2
_TAG_GLOBAL_RNG = 3
_TAG_SAMPLE = 4

_AMP_CHOICES = ("auto", "off", "bf16", "fp16")
_SCHEDULE_CHOICES = ("constant", "cosine")
_DEVICE_CHOICES = ("auto", "cpu", "cuda")


# --------------------------------------------------------------------------------------------
# Settings, context, result
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    """How to optimise. Defaults are AutoLink's (research/paper_autolink.md §2.8)."""

    steps: int = 20001  # optimiser steps in total (AutoLink: max_steps=20001)
    batch_size: int = 64  # *global* batch: split evenly over the ranks of a torchrun
    lr: float = 1e-4
    weight_decay: float = 1e-3  # AdamW's decoupled decay
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    # "auto": bf16 on CUDA if the card supports it, else fp16 with a GradScaler; off on CPU.
    amp: str = "auto"
    checkpoint_every: int = 1000  # steps; also on SIGTERM/SIGINT and at the end
    log_every: int = 50  # steps per metrics.jsonl line (values are means over the interval)
    eval_every: int = 1000  # steps between on_eval calls; 0 = only at the end
    num_workers: int = 4  # DataLoader processes per rank
    device: str = "auto"  # "auto" | "cpu" | "cuda" (under torchrun: cuda:LOCAL_RANK)
    sync_batchnorm: bool = True  # convert BatchNorm to SyncBatchNorm under DDP on CUDA, as AutoLink
    keep_checkpoints: int = 2  # newest checkpoints kept; >1 so a damaged newest one has a fallback
    # Learning rate as a pure function of the step (so resuming needs no scheduler state): "constant"
    # (AutoLink) or "cosine" (to 0 at the last step); both after a linear warm-up of warmup_steps.
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    # NHWC weights and activations: the same maths, faster convolution kernels (oneDNN on CPU, cuDNN).
    channels_last: bool = True

    # Fields that cannot change the trained weights; leave them out of artifact keys.
    NON_SEMANTIC: ClassVar[frozenset[str]] = frozenset(
        {"checkpoint_every", "log_every", "eval_every", "num_workers", "device", "keep_checkpoints"})
    # Fields a checkpoint must agree on to be resumed (steps may grow: that extends a run).
    _RESUME_MUST_MATCH: ClassVar[tuple[str, ...]] = ("batch_size", "lr", "weight_decay", "betas", "seed",
                                                     "lr_schedule", "warmup_steps")

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        positive = ("steps", "batch_size", "checkpoint_every", "log_every", "keep_checkpoints")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"training setting '{name}' must be a positive integer, got {value!r}")
        for name in ("eval_every", "num_workers", "seed", "warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"training setting '{name}' must be an integer >= 0, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"training setting 'lr' must be a positive number, got {self.lr!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"training setting 'weight_decay' must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"training setting 'betas' must be two numbers in [0, 1), got {self.betas!r}")
        if self.lr_schedule not in _SCHEDULE_CHOICES:
            raise ConfigError(f"training setting 'lr_schedule' must be one of {', '.join(_SCHEDULE_CHOICES)}, "
                              f"got {self.lr_schedule!r}")
        if self.amp not in _AMP_CHOICES:
            raise ConfigError(f"training setting 'amp' must be one of {', '.join(_AMP_CHOICES)}, got {self.amp!r}")
        if self.device not in _DEVICE_CHOICES:
            raise ConfigError(
                f"training setting 'device' must be one of {', '.join(_DEVICE_CHOICES)}, got {self.device!r}")


@dataclass(frozen=True)
class StepContext:
    """What a step function may use besides the model and the batch."""

    step: int  # 0-based index of this optimiser step (= steps completed before it)
    epoch: int  # epoch the batch was drawn from
    rank: int
    world_size: int
    device: torch.device
    generator: torch.Generator  # on `device`, seeded by (seed, step, rank): use it for masks/noise
    module: nn.Module  # the unwrapped model: for reading attributes, not for the forward pass
    amp_dtype: torch.dtype | None  # autocast dtype active around the step function, None = fp32


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did."""

    steps: int  # optimiser steps completed in total (== settings.steps)
    resumed_from: int  # step the run resumed from; 0 for a fresh run
    final_loss: float  # mean loss of the last metrics interval (NaN if not known on this rank)
    model_path: Path  # final weights, loadable with torch.load(weights_only=True)
    metrics_path: Path
    checkpoint_path: Path | None  # newest checkpoint
    steps_per_s: float  # optimiser steps per second in this process (0 if none were run)
    amp_dtype: str  # "off", "bf16" or "fp16": what "auto" resolved to
    world_size: int
    device: str = "cpu"  # the device trained on, e.g. "cuda:0"


class TrainLog(Protocol):
    """Somewhere besides metrics.jsonl that the metrics lines go (e.g. :class:`pipeline.tblog.TensorBoardLog`).

    Called on rank 0 only: ``start(step)`` once before the first step (the step training starts or resumes
    from), ``scalars(step, values)`` at each metrics line (the line's values plus ``lr``), ``close()`` at the end,
    also after an exception."""

    def start(self, step: int) -> None: ...

    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class EpochDataset(Protocol):
    """A map-style dataset whose item depends only on (index, epoch) — never on hidden RNG state.

    Random augmentation must be seeded from ``(seed, epoch, index)``, e.g. with
    :func:`sample_generator`; then an item is the same in a resumed run, in any DataLoader worker
    and for any ``num_workers``. ``get`` returns tensors (or dicts/tuples of tensors) that the
    collate function stacks; the trainer moves them to the device.
    """

    def __len__(self) -> int: ...

    def get(self, index: int, epoch: int) -> Any: ...


StepFn = Callable[[nn.Module, Any, StepContext], "tuple[torch.Tensor, Mapping[str, float]]"]


# --------------------------------------------------------------------------------------------
# Seeds and sampling: pure functions of integers
# --------------------------------------------------------------------------------------------
def derive_seed(*parts: int) -> int:
    """A 64-bit seed that is a pure function of the integers ``parts`` (numpy ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed for the augmentation of sample ``index`` in ``epoch`` of a run seeded ``seed``."""
    return derive_seed(_TAG_SAMPLE, seed, epoch, index)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """CPU ``torch.Generator`` for one sample's augmentation (see :class:`EpochDataset`)."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


class StepBatchSampler(Sampler):
    """Yields, for each step in ``[start_step, end_step)``, this rank's slice of the global batch.

    Global batch of step ``s``: epoch ``e = s // steps_per_epoch``; positions
    ``[(s % steps_per_epoch) * B, ... + B)`` of a permutation of ``range(dataset_len)`` seeded by
    ``(seed, e)`` (shuffle, drop_last: the tail of each permutation is never used). Rank ``r`` of
    ``W`` takes entries ``[r * B/W, (r+1) * B/W)``. Items are ``(index, epoch)`` pairs, which the
    trainer's dataset adapter turns into ``dataset.get(index, epoch)``.
    Because the position is global, a run may resume with a different number of ranks and still
    see the same samples at every step.
    """

    def __init__(self, *, dataset_len: int, batch_size: int, seed: int, start_step: int, end_step: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ConfigError(f"batch_size {batch_size} is not divisible by the {world_size} ranks of this run; "
                              "use a global batch size that is a multiple of --nproc-per-node")
        if dataset_len < batch_size:
            raise ConfigError(f"the training set has {dataset_len} samples, fewer than batch_size {batch_size}; "
                              "lower batch_size or use more frames")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.end_step = end_step
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = dataset_len // batch_size
        self.local_batch = batch_size // world_size

    def permutation(self, epoch: int) -> np.ndarray:
        """Sample order of ``epoch``: int64 array of shape (dataset_len,)."""
        rng = np.random.default_rng(derive_seed(_TAG_SAMPLER, self.seed, epoch))
        return rng.permutation(self.dataset_len)

    def global_batch(self, step: int) -> np.ndarray:
        """Dataset indices of the global batch of ``step``: int64 array (batch_size,)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached_epoch, perm = -1, None
        for step in range(self.start_step, self.end_step):
            epoch, pos = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, perm = epoch, self.permutation(epoch)
            lo = pos * self.batch_size + self.rank * self.local_batch
            yield [(int(i), epoch) for i in perm[lo:lo + self.local_batch]]


class _ByEpochIndex(torch.utils.data.Dataset):
    """Adapts an :class:`EpochDataset` to DataLoader's ``dataset[key]`` with key = (index, epoch)."""

    def __init__(self, dataset: EpochDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        return self.dataset.get(index, epoch)


def _worker_init(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group and Slurm signals every process of a job step; the
    # main process turns those into a clean checkpoint, so workers must not die underneath it
    # (they still exit when the main process goes: DataLoader's watchdog sees the parent vanish).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _seed_global_rngs(seed: int, step: int, rank: int) -> None:
    s = derive_seed(_TAG_GLOBAL_RNG, seed, step, rank)
    random.seed(s)
    np.random.seed(s & 0xFFFF_FFFF)  # the legacy global RNG takes 32-bit seeds
    torch.manual_seed(s)  # also seeds every CUDA device


# --------------------------------------------------------------------------------------------
# Devices, precision, processes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Dist:
    rank: int
    world_size: int
    local_rank: int
    initialised_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` → ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("training setting device='cuda' but torch sees no CUDA device "
                              "(torch.cuda.is_available() is False); set device: auto or cpu, or install a CUDA build")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp`` on ``device``; ``None`` means full fp32."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":  # "auto"
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None  # "auto" on CPU: autocast there is slower than fp32 for convs on most CPUs


def lr_factor(settings: TrainSettings, step: int) -> float:
    """Multiplier of ``settings.lr`` at 0-based ``step``: linear warm-up over ``warmup_steps``, then constant or
    a cosine to 0 at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.lr_schedule == "constant":
        return 1.0
    span = max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - settings.warmup_steps) / span)))


def _amp_name(dtype: torch.dtype | None) -> str:
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _setup_distributed(device_setting: str) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        device = resolve_device(device_setting, local_rank)
        return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, False), device
    if world <= 1:
        return _Dist(0, 1, 0, False), resolve_device(device_setting, 0)
    device = resolve_device(device_setting, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, True), device


_DESTROY_REGISTERED = False


def _destroy_at_exit() -> None:
    global _DESTROY_REGISTERED
    if not _DESTROY_REGISTERED:
        import atexit

        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
        _DESTROY_REGISTERED = True


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``config`` (sorted keys, no whitespace)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(v, device) for v in batch]
        return type(batch)(moved) if isinstance(batch, list) else tuple(moved)
    return batch


# --------------------------------------------------------------------------------------------
# RNG state (saved as plain tensors/lists so checkpoints load with weights_only=True)
# --------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        # Only if CUDA is already in use: querying would otherwise initialise it in CPU runs.
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------------------------
# Metrics: interval means, metrics.jsonl
# --------------------------------------------------------------------------------------------
class _Accumulator:
    """Sums of the loss and the step function's metrics since the last metrics line."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[str, float] = {}

    def add(self, loss: float, metrics: Mapping[str, float]) -> None:
        if self.count and set(metrics) | {"loss"} != set(self.sums):
            raise ValueError(f"step function returned metrics {sorted(metrics)}, earlier steps returned "
                             f"{sorted(k for k in self.sums if k != 'loss')}; return the same keys every step")
        self.count += 1
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss
        for k, v in metrics.items():
            if k == "loss":
                raise ValueError("step function metrics may not be named 'loss' (the trainer logs the loss itself)")
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def means(self) -> dict[str, float]:
        """Means over the interval (values were already averaged over ranks step by step)."""
        return {k: v / self.count for k, v in sorted(self.sums.items())}

    def reset(self) -> None:
        self.count, self.sums = 0, {}

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "sums": dict(self.sums)}

    def load(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["count"])
        self.sums = {str(k): float(v) for k, v in state["sums"].items()}


def _read_metric_lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            kept.append((int(json.loads(line)["step"]), line))
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a kill: the resumed run rewrites it
    return kept


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines after ``last_step`` so the file continues exactly as an uninterrupted run's."""
    if not path.exists():
        return
    lines = [line for step, line in _read_metric_lines(path) if step <= last_step]
    new_text = "".join(line + "\n" for line in lines)
    if path.read_text() == new_text:
        return
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(new_text)
    os.replace(tmp, path)


def _append_metrics(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")  # one small write: a kill cannot leave half a line in practice


# --------------------------------------------------------------------------------------------
# Signals and progress
# --------------------------------------------------------------------------------------------
class _StopSignals:
    """Turns SIGTERM/SIGINT into "checkpoint after this step and stop"; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; the caller owns signals then
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # impatient second Ctrl-C: the last checkpoint stays valid
        self.signum = signum
        sys.stderr.write(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, "
                         "then stopping (Ctrl-C again to abort without saving)\n")

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class TrainingInterrupted(DkpError):
    """SIGTERM/SIGINT stopped training after a checkpoint; re-running resumes."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # shell convention: 143 for SIGTERM, 130 for SIGINT


class NonFiniteLossError(DkpError):
    """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


class _Progress:
    """rich progress bar on an interactive stderr; plain log lines at each metrics line otherwise."""

    def __init__(self, *, total: int, start: int, bar: bool, log_lines: bool) -> None:
        self.total, self.start, self.log_lines = total, start, log_lines and not bar
        self._bar = None
        self._t0 = time.perf_counter()
        if not bar:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
        from rich.text import Text

        class _StepsPerSecond(ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(f"{task.speed:.2f} steps/s" if task.speed else "- steps/s")

        self._bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("loss {task.fields[loss]}"), _StepsPerSecond(),
                             TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True))
        self._bar.start()
        self._task = self._bar.add_task("train", total=total, completed=start, loss="-")

    def step(self, done: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, loss=f"{loss:.4f}")

    def logged(self, done: int, loss: float) -> None:
        if not self.log_lines:
            return
        elapsed = time.perf_counter() - self._t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        if math.isfinite(eta):
            hours, rest = divmod(int(eta), 3600)
            eta_text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
        else:
            eta_text = "-"
        log.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %s", done, self.total, loss, rate, eta_text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
def train(*, run_dir: Path, model: nn.Module, dataset: EpochDataset, step_fn: StepFn, settings: TrainSettings,
          config: Mapping[str, Any], on_eval: Callable[[int, nn.Module], None] | None = None,
          params: Iterable[nn.Parameter] | None = None, config_hash: str | None = None,
          model_args: Mapping[str, Any] | None = None,
          collate_fn: Callable[[list[Any]], Any] | None = None, train_log: TrainLog | None = None) -> TrainResult:
    """Train ``model`` with AdamW for ``settings.steps`` steps, resuming from ``run_dir`` if possible.

    Args:
        run_dir: where ``checkpoints/``, ``metrics.jsonl`` and ``model.pt`` go; must be private to
            this run (hold the artifact lock) and, for multi-node DDP, shared by all nodes.
        model: trained in place (moved to the device; BatchNorm → SyncBatchNorm under DDP on CUDA).
        dataset: an :class:`EpochDataset`.
        step_fn: ``(model, batch, ctx) -> (loss, metrics)``: a scalar loss tensor to minimise and a
            dict of floats to log (same keys every step). Runs under autocast when AMP is on.
        settings: :class:`TrainSettings`.
        config: the resolved config; stored in every checkpoint and in ``model.pt`` (plain values only).
        on_eval: called on rank 0 as ``on_eval(step, model)`` every ``eval_every`` steps and at the
            end, with the unwrapped model in ``eval()`` mode under ``no_grad``.
        params: the parameters to optimise (default: every ``model`` parameter with
            ``requires_grad``); they must belong to ``model`` so checkpoints hold them.
        config_hash: identity of the semantic config (the artifact key); a checkpoint written
            under another hash is refused. Default: :func:`config_digest` of ``config``.
        model_args: constructor arguments of the model, stored in ``model.pt`` so it can be rebuilt.
        collate_fn: DataLoader collate function (default: torch's ``default_collate``).
        train_log: a :class:`TrainLog` that also receives every metrics line (TensorBoard); rank 0 only.

    Returns:
        :class:`TrainResult`. Raises :class:`TrainingInterrupted` after checkpointing on
        SIGTERM/SIGINT, :class:`NonFiniteLossError` on a NaN/Inf loss, and
        :class:`~pipeline.errors.CheckpointError` for a checkpoint that does not fit this run.
    """
    if not (hasattr(dataset, "get") and hasattr(dataset, "__len__")):
        raise TypeError(f"dataset {type(dataset).__name__} must implement __len__() and get(index, epoch)")
    check_plain(dict(config), "config")
    if model_args is not None:
        check_plain(dict(model_args), "model_args")
    dist_env, device = _setup_distributed(settings.device)
    try:
        return _train(run_dir=Path(run_dir), model=model, dataset=dataset, step_fn=step_fn, settings=settings,
                      config=dict(config), on_eval=on_eval, params=params,
                      config_hash=config_hash or config_digest(config),
                      model_args=dict(model_args or {}), collate_fn=collate_fn, dist_env=dist_env, device=device,
                      train_log=train_log if dist_env.is_main else None)
    finally:
        # The group lives as long as the process: `dkp-pipeline run` under torchrun trains teach and then
        # distill in one process, and re-initialising a destroyed group there hangs on the rendezvous.
        if dist_env.initialised_here and dist.is_initialized():
            _destroy_at_exit()


def _train(*, run_dir: Path, model: nn.Module, dataset: EpochDataset, step_fn: StepFn, settings: TrainSettings,
           config: dict[str, Any], on_eval: Callable[[int, nn.Module], None] | None,
           params: Iterable[nn.Parameter] | None, config_hash: str, model_args: dict[str, Any],
           collate_fn: Callable[[list[Any]], Any] | None, dist_env: _Dist, device: torch.device,
           train_log: TrainLog | None = None) -> TrainResult:
    rank, world = dist_env.rank, dist_env.world_size
    ckpt_dir = run_dir / CHECKPOINT_DIRNAME
    metrics_path = run_dir / METRICS_FILENAME
    model_path = run_dir / MODEL_FILENAME
    if dist_env.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temporaries(run_dir) + remove_stale_temporaries(ckpt_dir):
            log.info("removed %s left by an interrupted run", stale)

    amp_dtype = resolve_amp(settings.amp, device)
    sampler = StepBatchSampler(dataset_len=len(dataset), batch_size=settings.batch_size, seed=settings.seed,
                               start_step=0, end_step=settings.steps, rank=rank, world_size=world)

    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D parameters only; convolutions then run NHWC
    if world > 1 and settings.sync_batchnorm:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif dist_env.is_main and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            log.warning("SyncBatchNorm needs CUDA; on CPU each rank normalises over its own %d samples",
                        sampler.local_batch)
    owned = {id(p) for p in model.parameters()}
    trainable = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: pass params= or set requires_grad on the model's parameters")
    if any(id(p) not in owned for p in trainable):
        raise ValueError("params must be parameters of `model`, otherwise checkpoints would not contain them")
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    acc = _Accumulator()

    # ---- resume ----------------------------------------------------------------------------
    found = latest_checkpoint(ckpt_dir)
    start_step = found[0] if found else 0
    if world > 1:
        # Every rank must resume from the same step, else the collectives below deadlock.
        t = torch.tensor([start_step, -start_step], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise CheckpointError(f"ranks found different checkpoints in {ckpt_dir} (steps {-int(t[1])}..{int(t[0])}); "
                                  "run_dir must be on a file system shared by all nodes")
    last_ckpt: Path | None = None
    if found:
        step, last_ckpt, ckpt = found
        _check_resumable(ckpt, path=last_ckpt, settings=settings, config_hash=config_hash, sampler=sampler,
                         amp_dtype=amp_dtype, world=world)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        acc.load(ckpt["metrics"])
        if dist_env.is_main:
            log.info("resuming from %s (step %d/%d)", last_ckpt, step, settings.steps)
        del ckpt
    if dist_env.is_main:
        _truncate_metrics(metrics_path, start_step)

    wrapped: nn.Module = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler.start_step = start_step
    loader_iter: Iterator[Any] = iter(())
    if start_step < settings.steps:
        loader = DataLoader(_ByEpochIndex(dataset), batch_sampler=sampler, num_workers=settings.num_workers,
                            collate_fn=collate_fn, pin_memory=device.type == "cuda",
                            worker_init_fn=_worker_init if settings.num_workers > 0 else None)
        loader_iter = iter(loader)

    def save_checkpoint(done: int) -> Path:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "step": done,
            "config_hash": config_hash,
            "config": config,
            "settings": dataclasses.asdict(settings),
            "amp_dtype": _amp_name(amp_dtype),
            "world_size": world,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": _rng_state(),
            "sampler": {"seed": settings.seed, "batch_size": settings.batch_size, "dataset_len": sampler.dataset_len,
                        "steps_per_epoch": sampler.steps_per_epoch, "step": done,
                        "epoch": done // sampler.steps_per_epoch, "index_in_epoch": done % sampler.steps_per_epoch},
            "metrics": acc.state(),
            "versions": {"torch": str(torch.__version__), "numpy": str(np.__version__)},
        }
        path = save_atomic(payload, ckpt_dir / checkpoint_name(done))
        prune_checkpoints(ckpt_dir, settings.keep_checkpoints)
        return path

    stop = _StopSignals()
    stop.install()
    progress = _Progress(total=settings.steps, start=start_step,
                         bar=dist_env.is_main and sys.stderr.isatty(), log_lines=dist_env.is_main)
    last_record: dict[str, Any] | None = None
    t_loop = time.perf_counter()
    done = start_step
    if train_log is not None:
        train_log.start(start_step)
    try:
        for step in range(start_step, settings.steps):
            batch = next(loader_iter)
            epoch = step // sampler.steps_per_epoch
            _seed_global_rngs(settings.seed, step, rank)
            generator = torch.Generator(device=device).manual_seed(
                derive_seed(_TAG_STEP_GENERATOR, settings.seed, step, rank))
            ctx = StepContext(step=step, epoch=epoch, rank=rank, world_size=world, device=device,
                              generator=generator, module=model, amp_dtype=amp_dtype)
            batch = _to_device(batch, device)
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

            # One small collective per step carries the loss, the metrics and "has any rank been
            # signalled". Means over ranks are thus taken every step, so rank 0's running sums are
            # the run's (checkpointing them alone resumes exactly), and every rank finishes this step
            # and then stops (or raises) at the same step. The step is completed rather than
            # discarded because its forward pass already moved BatchNorm's running statistics.
            keys = sorted(metrics)
            packed = torch.cat([loss.detach().double().reshape(1),
                                torch.tensor([1.0 if stop.signum else 0.0, *(float(metrics[k]) for k in keys)],
                                             dtype=torch.float64, device=loss.device)])  # (2 + len(keys),)
            if world > 1:
                dist.all_reduce(packed)
            values = packed.tolist()
            loss_value = values[0] / world
            stop_after_this_step = values[1] > 0
            step_metrics = {k: v / world for k, v in zip(keys, values[2:])}
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(_nonfinite_message(loss_value, step, settings, sampler, run_dir, last_ckpt))

            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            done = step + 1
            acc.add(loss_value, step_metrics)
            progress.step(done, loss_value)

            # Order matters for resume: the metrics line for `done` is written before the checkpoint
            # of `done`, so a checkpoint never exists without the lines up to it.
            if done % settings.log_every == 0 or done == settings.steps:
                record = {"step": done, "epoch": epoch, **acc.means()}
                if scaler.is_enabled():
                    record["loss_scale"] = float(scaler.get_scale())
                acc.reset()
                last_record = record
                if dist_env.is_main:
                    _append_metrics(metrics_path, record)
                    progress.logged(done, record["loss"])
                    if train_log is not None:
                        train_log.scalars(done, {k: v for k, v in record.items() if k not in ("step", "epoch")}
                                          | {"lr": optimizer.param_groups[0]["lr"]})
            if on_eval is not None and dist_env.is_main and (
                    (settings.eval_every and done % settings.eval_every == 0) or done == settings.steps):
                _run_eval(on_eval, done, model)
            if (done % settings.checkpoint_every == 0 or done == settings.steps
                    or (stop_after_this_step and done < settings.steps)):
                last_ckpt = save_checkpoint(done) if dist_env.is_main else ckpt_dir / checkpoint_name(done)
            if stop_after_this_step and done < settings.steps:
                stop_signum = stop.signum or signal.SIGTERM  # another rank's signal: report SIGTERM
                if world > 1:
                    dist.barrier()  # let rank 0 finish writing before torchrun sees the others exit
                raise TrainingInterrupted(
                    f"training stopped by {signal.Signals(stop_signum).name} after step {done}/{settings.steps}; "
                    f"checkpoint {last_ckpt} saved. Re-run the same command to continue from it.", stop_signum)
    finally:
        progress.close()
        stop.restore()
        if train_log is not None:
            train_log.close()

    loop_s = time.perf_counter() - t_loop
    if last_record is None and dist_env.is_main:
        lines = _read_metric_lines(metrics_path)
        last_record = json.loads(lines[-1][1]) if lines else None
    if dist_env.is_main:
        state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_atomic({"format": MODEL_FORMAT, "state_dict": state_dict, "model_args": model_args, "config": config,
                     "config_hash": config_hash, "step": settings.steps}, model_path)
    if world > 1:
        dist.barrier()
    ran = done - start_step
    return TrainResult(steps=settings.steps, resumed_from=start_step,
                       final_loss=float(last_record["loss"]) if last_record else float("nan"),
                       model_path=model_path, metrics_path=metrics_path, checkpoint_path=last_ckpt,
                       steps_per_s=ran / loop_s if ran and loop_s > 0 else 0.0, amp_dtype=_amp_name(amp_dtype),
                       world_size=world, device=str(device))


def _run_eval(on_eval: Callable[[int, nn.Module], None], step: int, model: nn.Module) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            on_eval(step, model)
    finally:
        model.train(was_training)


def _check_resumable(ckpt: Mapping[str, Any], *, path: Path, settings: TrainSettings, config_hash: str,
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
             for k in TrainSettings._RESUME_MUST_MATCH
             if (tuple(saved.get(k)) if k == "betas" else saved.get(k)) != getattr(settings, k)]
    if ckpt["amp_dtype"] != _amp_name(amp_dtype):
        diffs.append(f"amp: checkpoint {ckpt['amp_dtype']!r} vs now {_amp_name(amp_dtype)!r}")
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
