"""Counting host reads of tensors: the calls that, on a GPU, make the host wait for the device (a sync).

``.item()``, ``.tolist()``, ``float(t)``, ``int(t)``, ``bool(t)`` (and ``if t:``) copy a value to the host; on CUDA
each waits for all work queued before it, so in a training step it stalls the host until the GPU drains and the
next step cannot be queued behind the current one. ``torch.cuda.set_sync_debug_mode`` reports these only on a GPU;
this counter finds the same calls on a CPU by replacing those methods of ``torch.Tensor`` for the duration of a
``with`` block and attributing each call to the file that made it, so a test or a bench can say "the project's
code read the device N times in these steps" (research/gpu.md section 2). Reads that torch makes itself (AdamW's
CPU step counter, GradScaler's ``found_inf`` without a fused optimiser) are counted apart: on a CPU they cannot
be told from device reads, on CUDA only some of them are syncs.

It misses function forms that never reach those methods (``torch.nonzero``, boolean-mask indexing) and C++
internals; ``tolist`` of a CPU tensor counts although it is free there (the counter cannot know the device the
code will run on, which is the point: the same code runs on CUDA).
"""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

METHODS = ("item", "tolist", "__float__", "__int__", "__index__", "__bool__")
_PACKAGE = Path(__file__).resolve().parents[1]  # pipeline/
PROJECT_ROOTS = (str(_PACKAGE) + os.sep, str(_PACKAGE.parent / "dkp_core") + os.sep)


@dataclass
class Read:
    method: str
    file: str
    line: int
    tag: Any  # what the counter's ``tag`` was at the call (e.g. the training step)


@dataclass
class HostReadCounter:
    """``with HostReadCounter() as c: ...`` then ``c.project`` (calls from ``roots``: pipeline/ and dkp_core/),
    ``c.reads`` (all). Set ``c.tag`` to attribute reads (the trainer's step, say). Not re-entrant; counts every
    thread (DataLoader's pin-memory thread included)."""

    roots: tuple[str, ...] = PROJECT_ROOTS
    reads: list[Read] = field(default_factory=list)
    tag: Any = None
    _saved: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> "HostReadCounter":
        for name in METHODS:
            self._saved[name] = torch.Tensor.__dict__.get(name)  # None: inherited from torch._C.TensorBase
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, own in self._saved.items():
            if own is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, own)
        self._saved.clear()

    def _wrap(self, name: str, real: Callable) -> Callable:
        counter = self

        def wrapper(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            with counter._lock:
                counter.reads.append(Read(name, caller.f_code.co_filename, caller.f_lineno, counter.tag))
            return real(tensor, *args, **kwargs)

        wrapper.__name__ = name
        return wrapper

    @property
    def project(self) -> list[Read]:
        return [r for r in self.reads if r.file.startswith(self.roots)]

    def by_tag(self, reads: Optional[Iterable[Read]] = None) -> dict[Any, int]:
        out: dict[Any, int] = {}
        for r in self.project if reads is None else reads:
            out[r.tag] = out.get(r.tag, 0) + 1
        return out


def counting_step(step_fn: Callable, counter: HostReadCounter) -> Callable:
    """``step_fn`` that first sets ``counter.tag`` to the trainer's step (``ctx.step``), so that every read until
    the next step is attributed to this one (the sync point after a step belongs to it)."""
    def wrapped(model, batch, ctx):
        counter.tag = ctx.step
        return step_fn(model, batch, ctx)

    return wrapped
