"""Where and how a run executes: device, autocast dtype, the torchrun process group, stop signals.

Everything here reads the process (environment, CUDA, signals), nothing reads the run's files.
"""
from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError, DkpError
from pipeline.training.log import log

# How long a collective of training (DDP's all-reduces, the metrics line's, a barrier between stages) waits for
# a missing rank before the job fails: torch's default for gloo (NCCL's own is 10 min). The depth stage's ranks
# wait for each other far longer before its merge, on a gloo group of their own (stages/depth/stage.py).
TRAIN_TIMEOUT = datetime.timedelta(minutes=30)
# Set to 1 to train in an autocast dtype that this device only emulates (slow_amp_reason), e.g. to reproduce a
# GPU recipe's fp16 numerics on a laptop. Without it such a run is refused before it starts.
ALLOW_SLOW_AMP_ENV = "DKP_ALLOW_SLOW_AMP"

@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    initialised_here: bool
    # The process group every collective of training uses (DDP, SyncBatchNorm, metrics, barriers); None for
    # one process. On CUDA it always has NCCL (training_group); never the depth stage's barrier group.
    group: Any = None

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


def resolve_amp(amp: str, device: torch.device, *, allow_slow: bool = False,
                section: str | None = None) -> torch.dtype | None:
    """Autocast dtype for ``amp`` on ``device``; ``None`` means full fp32.

    A dtype this device only emulates (:func:`slow_amp_reason`) is refused: see :func:`check_amp`."""
    if amp == "off":
        return None
    if amp in ("bf16", "fp16"):
        check_amp(amp, device, section=section, allow_slow=allow_slow)
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cuda":  # "auto"
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None  # "auto" on CPU: autocast there is slower than fp32 for convs on most CPUs


def slow_amp_reason(amp: str, device: torch.device) -> str | None:
    """Why autocast in ``amp`` ("bf16" | "fp16") would crawl on ``device`` because the device only emulates that
    dtype, or None. Measured on the development VM (docs/benchmarks.md, `bench precision`)."""
    if device.type == "cpu":
        if amp == "fp16":
            return ("fp16 autocast on a CPU is emulated (measured 16x slower than fp32 for the paper presets' "
                    "step)")
        if amp == "bf16" and not cpu_has_bf16():
            return ("this CPU has no bf16 units (AVX-512 BF16 or AMX), so bf16 autocast is emulated (measured 9x "
                    "slower than fp32 for the synthetic preset's step on a CPU limited to AVX2)")
    elif device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"{torch.cuda.get_device_name(device)} has no bf16 tensor cores, so bf16 autocast is emulated"
    return None


def check_amp(amp: str, device: torch.device, *, section: str | None = None, allow_slow: bool = False) -> None:
    """Refuse (:class:`ConfigError`) an autocast dtype that ``device`` only emulates, naming the field (``section``
    .amp of the config; None: the :class:`TrainSettings` field) and the fixes; with ``allow_slow`` or
    ``DKP_ALLOW_SLOW_AMP=1`` only warn.

    Why refuse rather than fall back to what is fast: precision changes the weights, so a fallback would have to
    enter the artifact key, and the key would then depend on the machine that computes it: ``status`` on a CPU
    login node would call a GPU-trained fp16 teacher missing, and ``run`` there would retrain it on the CPU.
    Refusing keeps every key what it was and the same on every machine (docs/training.md, "Mixed precision")."""
    reason = slow_amp_reason(amp, device) if amp in ("bf16", "fp16") else None
    if reason is None:
        return
    what = f"config field {section}.amp" if section else "training setting 'amp'"
    if allow_slow or os.environ.get(ALLOW_SLOW_AMP_ENV) == "1":
        log.warning("%s: %s on %s although %s", what, amp, device, reason)
        return
    native_bf16 = device.type == "cpu" and amp == "fp16" and cpu_has_bf16()
    if section:  # the presets pin both trainings' precision: name both overrides
        fix = "--set teach.amp=off --set distill.amp=off"
        fix += " (or =bf16, which this CPU computes natively)" if native_bf16 else ""
    else:
        fix = "amp='off'" + (" (or 'bf16', which this CPU computes natively)" if native_bf16 else "")
    key = " (another artifact key: precision changes the weights)" if section else ""
    raise ConfigError(
        f"{what}: {amp!r} on {device} would train many times slower than fp32: {reason}. Train in fp32 here "
        f"with {fix}{key}, run on a GPU, or set {ALLOW_SLOW_AMP_ENV}=1 to run it anyway")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast speeds training up."""
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(p() for p in probes if p is not None)


def make_optimizer(params: Iterable[torch.nn.Parameter], settings: Any, device: torch.device) -> torch.optim.AdamW:
    """The trainer's AdamW (lr, betas, weight decay of ``settings``). Fused on CUDA: one kernel for all parameters,
    and under a GradScaler the inf check and the skipped step stay on the device (the non-fused step reads the
    scaler's ``found_inf`` with ``.item()``: a host sync every step). CPU runs keep torch's default implementation,
    so their weights stay bit-identical to earlier versions."""
    return torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay,
                             fused=True if device.type == "cuda" else None)


def amp_name(dtype: torch.dtype | None) -> str:
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def default_backend(cuda: bool) -> str:
    """The backend of the process group this package initialises: CPU tensors over gloo and, with CUDA, CUDA
    tensors over NCCL in the same group, so barriers and object collectives need no GPU while DDP and SyncBatchNorm
    all-reduce over NCCL (gloo also registers for CUDA and would copy every gradient through host memory)."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def init_default_group(cuda: bool | None = None) -> bool:
    """Join torchrun's process group (env://) if this process has none yet, with :data:`TRAIN_TIMEOUT` and
    :func:`default_backend` (``cuda``: whether CUDA tensors will be reduced; default: CUDA is available). It lives
    as long as the process: `run` trains teach and then distill in one process, and re-initialising a destroyed
    group there hangs on the rendezvous. True if initialised here."""
    if dist.is_initialized():
        return False
    dist.init_process_group(backend=default_backend(torch.cuda.is_available() if cuda is None else cuda),
                            timeout=TRAIN_TIMEOUT)
    destroy_at_exit()
    return True


_NCCL_GROUP: Any = None


def training_group(device: torch.device) -> Any:
    """The group training reduces over: the default group, unless training runs on CUDA and the default group has
    no NCCL (made by other code, e.g. plain gloo): then an NCCL group of the same ranks, made once per process."""
    global _NCCL_GROUP
    if device.type != "cuda" or "nccl" in str(dist.get_backend()):
        return dist.group.WORLD
    if _NCCL_GROUP is None:
        log.info("the process group has backend %r; training on CUDA makes an NCCL group for its collectives",
                 dist.get_backend())
        _NCCL_GROUP = dist.new_group(backend="nccl", timeout=TRAIN_TIMEOUT)
    return _NCCL_GROUP


def check_training_group(group: Any, device: torch.device) -> None:
    """Refuse to wrap DDP over a group without NCCL on CUDA (gloo would all-reduce every gradient through host
    memory over TCP, with whatever timeout that group was made with)."""
    backend = str(dist.get_backend(group))
    if device.type == "cuda" and "nccl" not in backend:
        raise DkpError(f"training on {device} over a process group with backend {backend!r}: CUDA training needs "
                       "NCCL (pipeline.training.runtime.training_group makes one)")


def setup_distributed(device_setting: str) -> tuple[Dist, torch.device]:
    """This process's rank, the training group and the device (``cuda:LOCAL_RANK`` under torchrun on CUDA).

    Under torchrun (``WORLD_SIZE`` > 1) joins the process group if no stage did yet (:func:`init_default_group`);
    a group that already exists is reused only if it fits the device (:func:`training_group`)."""
    from pipeline.process import this_process

    process = this_process()
    world, local_rank = process.world, process.local_rank
    if not (dist.is_available() and (dist.is_initialized() or world > 1)):
        return Dist(0, 1, 0, False), resolve_device(device_setting, 0)
    device = resolve_device(device_setting, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    here = init_default_group(cuda=device.type == "cuda")
    group = training_group(device)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, here, group), device


def barrier(env: Dist, device: torch.device) -> None:
    """Wait for every rank of ``env``'s training group (nothing for one process). On a group with a CPU backend
    this runs on the CPU; an NCCL-only group needs the device named."""
    if env.world_size <= 1:
        return
    if device.type == "cuda" and str(dist.get_backend(env.group)) == "nccl":
        dist.barrier(group=env.group, device_ids=[device.index])
    else:
        dist.barrier(group=env.group)


_DESTROY_REGISTERED = False


def destroy_at_exit() -> None:
    global _DESTROY_REGISTERED
    if not _DESTROY_REGISTERED:
        import atexit

        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
        _DESTROY_REGISTERED = True


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(moved) if isinstance(batch, list) else tuple(moved)
    return batch


class StopSignals:
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

