"""Where the depth model's batches run: copy in, compute, copy out, each on its own queue (a *lane*).

The loop in :mod:`.compute` launches batch k (three steps, each handed to ``lane.run``) and only then fetches
batch k - depth (``lane.fetch``, the one host wait per batch), so that on CUDA the copy of batch k+1, the forward
of batch k and the copy back of batch k-1 overlap, and the host prepares the next launch while the GPU works.

- :class:`CudaLane`: a copy-in stream, the current stream for compute, a copy-out stream; events order them
  (``wait_event``), and ``fetch`` is ``Event.synchronize`` on the copy-out event. No ``torch.cuda.synchronize``.
  Tensors made on one stream and read on another are kept alive by the caller until their batch is fetched
  (the copy-out event comes after the compute that read them), so the caching allocator cannot hand their
  memory to a new batch too early (research/gpu.md §1.2).
- :class:`HostLane`: the CPU: each step runs when launched; ``fetch`` returns at once.
- :class:`ThreadLane`: the stand-in for a GPU on a CPU machine: each stream is a FIFO thread, so a step
  (a stand-in model that sleeps T ms) runs while the host goes on, and ``fetch`` waits as an event would.
  ``dkp-pipeline bench depth-overlap`` and the tests run the stage's own loop on it.

Every lane counts its host waits (``fetches``), which the overlap test compares with the number of batches.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

STREAMS = ("in", "compute", "out")


class Handle:
    """What ``lane.run`` gives back: the step's value (a tensor still being computed, on CUDA) and its completion."""

    __slots__ = ("_value", "event", "start", "future", "host_seconds")

    def __init__(self, value: Any = None, *, event=None, start=None, future: Optional[Future] = None,
                 host_seconds: float = 0.0) -> None:
        self._value, self.event, self.start, self.future, self.host_seconds = value, event, start, future, host_seconds


class HostLane:
    """Every step runs at once in the calling thread (a CPU device)."""

    name = "host"

    def __init__(self) -> None:
        self.fetches = 0

    def run(self, stream: str, fn: Callable[[], Any], after: Optional[Handle] = None) -> Handle:
        t0 = time.perf_counter()
        v = fn()
        return Handle(v, host_seconds=time.perf_counter() - t0)

    def value(self, h: Handle) -> Any:
        return h._value

    def fetch(self, h: Handle) -> Any:
        self.fetches += 1
        return h._value

    def seconds(self, h: Handle) -> float:
        """Device seconds of step ``h`` (after its batch was fetched)."""
        return h.host_seconds

    def close(self) -> None:
        pass


class CudaLane:
    """Copy-in and copy-out streams around the current (compute) stream of ``device``, ordered by events."""

    name = "cuda"

    def __init__(self, device) -> None:
        import torch

        self.torch = torch
        self.streams = {"in": torch.cuda.Stream(device), "compute": torch.cuda.current_stream(device),
                        "out": torch.cuda.Stream(device)}
        self.fetches = 0

    def run(self, stream: str, fn: Callable[[], Any], after: Optional[Handle] = None) -> Handle:
        torch = self.torch
        s = self.streams[stream]
        with torch.cuda.stream(s):
            if after is not None:
                s.wait_event(after.event)  # queued on the stream: the host does not wait
            start = torch.cuda.Event(enable_timing=True)
            start.record(s)
            v = fn()
            end = torch.cuda.Event(enable_timing=True)
            end.record(s)
        return Handle(v, event=end, start=start)

    def value(self, h: Handle) -> Any:
        return h._value

    def fetch(self, h: Handle) -> Any:
        self.fetches += 1
        h.event.synchronize()  # the one host wait per batch: its copy back is done (and so all before it)
        return h._value

    def seconds(self, h: Handle) -> float:
        return h.start.elapsed_time(h.event) / 1e3  # both events are complete once the batch is fetched

    def close(self) -> None:
        pass


class ThreadLane:
    """A GPU stand-in on the CPU: each stream a FIFO worker thread; ``after`` makes a step wait (on its
    stream's thread, not the host) for another step, as ``wait_event`` does."""

    name = "threads"

    def __init__(self) -> None:
        self.pools = {s: ThreadPoolExecutor(1, thread_name_prefix=f"lane-{s}") for s in STREAMS}
        self.fetches = 0

    def run(self, stream: str, fn: Callable[[], Any], after: Optional[Handle] = None) -> Handle:
        h = Handle()

        def step():
            if after is not None:
                after.future.result()
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                h.host_seconds = time.perf_counter() - t0

        h.future = self.pools[stream].submit(step)
        return h

    def value(self, h: Handle) -> Any:
        return h.future.result()  # called inside a later step of the same batch: already done

    def fetch(self, h: Handle) -> Any:
        self.fetches += 1
        return h.future.result()

    def seconds(self, h: Handle) -> float:
        return h.host_seconds

    def close(self) -> None:
        for p in self.pools.values():
            p.shutdown(wait=True, cancel_futures=True)


def lane_for(device, stand_in: Optional[str] = None):
    """The lane for ``device``: CUDA streams on a GPU, the host otherwise; ``stand_in="threads"`` forces the
    GPU stand-in (benches and tests)."""
    if stand_in == "threads":
        return ThreadLane()
    if device.type == "cuda":
        return CudaLane(device)
    return HostLane()
