"""Where and how a run executes: device, autocast dtype, the torchrun process group, stop signals.

Everything here reads the process (environment, CUDA, signals), nothing reads the run's files.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError, DkpError
from pipeline.training.log import log


@dataclass(frozen=True)
class Dist:
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
        if device.type == "cpu" and not cpu_has_bf16():
            log.warning("amp: bf16 on a CPU without bf16 instructions (AMX / AVX-512 BF16) is slower than fp32; "
                        "--set teach.amp=off --set distill.amp=off trains in fp32 (other artifacts: amp is in the key)")
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":  # "auto"
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None  # "auto" on CPU: autocast there is slower than fp32 for convs on most CPUs


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast speeds training up."""
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(p() for p in probes if p is not None)


def amp_name(dtype: torch.dtype | None) -> str:
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def setup_distributed(device_setting: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        device = resolve_device(device_setting, local_rank)
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank, False), device
    if world <= 1:
        return Dist(0, 1, 0, False), resolve_device(device_setting, 0)
    device = resolve_device(device_setting, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, True), device


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

