"""What the trainer is told (:class:`TrainSettings`), what a step function sees and what it returns."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from pipeline.config import TrainConfig, choices_of
from pipeline.errors import ConfigError

_DEFAULTS = TrainConfig()
_AMP_CHOICES = choices_of(TrainConfig, "amp")
_SCHEDULE_CHOICES = choices_of(TrainConfig, "lr_schedule")
_DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainSettings:
    """How to optimise. Defaults are :class:`pipeline.config.TrainConfig`'s (AutoLink's, research/paper_autolink.md
    §2.8): one source, so a stage and a direct caller of :func:`pipeline.training.train` agree."""

    steps: int = _DEFAULTS.steps  # optimiser steps in total (AutoLink: max_steps=20001)
    batch_size: int = _DEFAULTS.batch_size  # *global* batch: split evenly over the ranks of a torchrun
    lr: float = _DEFAULTS.lr
    weight_decay: float = _DEFAULTS.weight_decay  # AdamW's decoupled decay
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = _DEFAULTS.seed
    # "auto": bf16 on CUDA if the card supports it, else fp16 with a GradScaler; off on CPU.
    amp: str = _DEFAULTS.amp
    checkpoint_every: int = _DEFAULTS.checkpoint_every  # steps; also on SIGTERM/SIGINT and at the end
    log_every: int = _DEFAULTS.log_every  # steps per metrics.jsonl line (values are means over the interval)
    eval_every: int = _DEFAULTS.eval_every  # steps between on_eval calls; 0 = only at the end
    # DataLoader processes per rank; None: default_num_workers(device), resolved when the settings are made
    num_workers: int | None = _DEFAULTS.num_workers
    device: str = _DEFAULTS.device  # "auto" | "cpu" | "cuda" (under torchrun: cuda:LOCAL_RANK)
    sync_batchnorm: bool = True  # convert BatchNorm to SyncBatchNorm under DDP on CUDA, as AutoLink
    keep_checkpoints: int = 2  # newest checkpoints kept; >1 so a damaged newest one has a fallback
    # Learning rate as a pure function of the step (so resuming needs no scheduler state): "constant"
    # (AutoLink) or "cosine" (to 0 at the last step); both after a linear warm-up of warmup_steps.
    lr_schedule: str = _DEFAULTS.lr_schedule
    warmup_steps: int = _DEFAULTS.warmup_steps
    # NHWC weights and activations: the same maths, faster convolution kernels (oneDNN on CPU, cuDNN).
    channels_last: bool = _DEFAULTS.channels_last
    # Train in an autocast dtype this device only emulates (fp16 on a CPU: many times slower than fp32) instead of
    # refusing it (runtime.check_amp). Not a config field, so never in a key; for tests and deliberate experiments.
    allow_slow_amp: bool = False

    # The fields that cannot change the trained weights: TrainConfig's non-semantic ones (pipeline/config.py, the
    # one description the artifact keys use; keep_checkpoints is no config field, so it never reaches a key).
    NON_SEMANTIC: ClassVar[frozenset[str]] = frozenset(f.name for f in dataclasses.fields(TrainConfig)
                                                       if not f.metadata.get("semantic", True))
    # Fields a checkpoint must agree on to be resumed (steps may grow: that extends a run).
    RESUME_MUST_MATCH: ClassVar[tuple[str, ...]] = ("batch_size", "lr", "weight_decay", "betas", "seed",
                                                     "lr_schedule", "warmup_steps")

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.num_workers is None:
            object.__setattr__(self, "num_workers",
                               default_num_workers(self.device if self.device in _DEVICE_CHOICES else "cpu"))
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


    @classmethod
    def from_config(cls, section: TrainConfig) -> "TrainSettings":
        """The settings of a teach/distill config section (the fields both have; the rest keep their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(section)}
        return cls(**{n: getattr(section, n) for n in sorted(names)})


def default_num_workers(device: str = "auto") -> int:
    """DataLoader processes per rank when the config leaves ``num_workers`` unset, from the cores.

    CUDA: the cores of this rank's share of the node (``LOCAL_WORLD_SIZE`` ranks under torchrun) less one for
    the process that drives the GPU, at most 8: a worker reading the training-frame cache supplies thousands of
    samples a second (docs/benchmarks.md) and each worker is a copy of the process. CPU: 0, the training
    step is then the consumer of every core, and a sample from the frame cache costs ~0.1 ms in the main process.
    """
    import os

    from pipeline.process import this_process

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    per_rank = cpus // max(1, this_process().local_world)
    return max(0, min(8, per_rank - 1))


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


def lr_factor(settings: TrainSettings, step: int) -> float:
    """Multiplier of ``settings.lr`` at 0-based ``step``: linear warm-up over ``warmup_steps``, then constant or
    a cosine to 0 at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.lr_schedule == "constant":
        return 1.0
    span = max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - settings.warmup_steps) / span)))


