"""What a run tells: interval means of the loss and metrics, ``metrics.jsonl``, the progress bar or lines.

One logger, named ``pipeline.train`` (the name users and :func:`pipeline.stages.common.training_progress`
configure; it predates this package), carries every line the trainer logs.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from pipeline.store.io import write_atomic

log = logging.getLogger("pipeline.train")

METRICS_FILENAME = "metrics.jsonl"


class Accumulator:
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


class StepMeter:
    """The loss and the step function's metrics of every step, kept on the device until a sync point.

    Each step writes one row (loss, then the metrics in sorted key order) into a float64 buffer on the device:
    no host read, so the CPU can queue the next step while the GPU computes this one. At a sync point (a metrics
    line, a checkpoint, an eval, a stop) :meth:`sync` reduces the rows since the last one over the ranks and reads
    them, with the stop flag and the loss scale, in **one** ``.tolist()``: the trainer's only host read between two
    sync points. The rows then feed :class:`Accumulator` in step order, so the logged means are what averaging
    each step over the ranks, as before, gives (and a resumed run logs the same bytes)."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device, self.capacity = device, capacity
        self.keys: list[str] | None = None
        self.rows: torch.Tensor | None = None  # (capacity, 1 + len(keys)) float64 on the device
        self.first_step = 0  # the step of row 0
        self.count = 0

    def add(self, step: int, loss: torch.Tensor, metrics: Mapping[str, Any]) -> None:
        """Record ``step``'s loss (0-d tensor) and metrics (0-d tensors or numbers) without reading them."""
        keys = sorted(metrics)
        if self.keys is None:
            if "loss" in metrics:
                raise ValueError("step function metrics may not be named 'loss' (the trainer logs the loss itself)")
            self.keys = keys
            self.rows = torch.zeros(self.capacity, 1 + len(keys), dtype=torch.float64, device=self.device)
        elif keys != self.keys:
            raise ValueError(f"step function returned metrics {keys}, earlier steps returned {self.keys}; "
                             "return the same keys every step")
        if self.count == 0:
            self.first_step = step
        if self.count >= self.capacity:
            raise RuntimeError(f"StepMeter holds {self.capacity} steps between sync points; sync first")
        row = self.rows[self.count]
        row[0] = loss.detach().reshape(())  # a device copy (cast to float64), no host read
        for j, k in enumerate(keys, start=1):
            v = metrics[k]
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise TypeError(f"step function metric {k!r} must be a number or a one-element tensor, "
                                    f"got shape {tuple(v.shape)}")
                row[j] = v.detach().reshape(())
            else:
                row[j] = float(v)  # a python number: fill_ with a scalar argument, no copy from the host
        self.count += 1

    def sync(self, *, world: int, group: Any = None, stop: bool = False,
             scale: torch.Tensor | None = None) -> tuple[list[tuple[int, float, dict[str, float]]], bool, float | None]:
        """``(rows, stop, scale)``: per step since the last sync ``(step, loss, metrics)`` averaged over the ranks,
        whether any rank asked to stop, and the loss scale (None without ``scale``). One collective (with
        ``world`` > 1) and one host read."""
        import torch.distributed as dist

        n = self.count
        width = 1 + len(self.keys or [])
        flag = torch.full((1,), 1.0 if stop else 0.0, dtype=torch.float64, device=self.device)
        packed = torch.cat([self.rows[:n].reshape(-1) if n else flag[:0], flag])  # (n * width + 1,)
        if world > 1:
            dist.all_reduce(packed, group=group)
        if scale is not None:
            packed = torch.cat([packed, scale.detach().double().reshape(1).to(self.device)])
        values = packed.tolist()  # the host read of this interval
        out = []
        for i in range(n):
            r = values[i * width:(i + 1) * width]
            out.append((self.first_step + i, r[0] / world, {k: v / world for k, v in zip(self.keys or [], r[1:])}))
        self.count = 0
        return out, values[n * width] > 0, (values[-1] if scale is not None else None)


def read_metric_lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            kept.append((int(json.loads(line)["step"]), line))
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a kill: the resumed run rewrites it
    return kept


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines after ``last_step`` so the file continues exactly as an uninterrupted run's."""
    if not path.exists():
        return
    lines = [line for step, line in read_metric_lines(path) if step <= last_step]
    new_text = "".join(line + "\n" for line in lines)
    if path.read_text() == new_text:
        return
    write_atomic(path, new_text, tmp=path.with_name(f".{path.name}.tmp.{os.getpid()}"), durable=False)


def append_metrics(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")  # one small write: a kill cannot leave half a line in practice


class Progress:
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

    def step(self, done: int, loss: float | None = None) -> None:
        """``done`` steps; ``loss``: the newest metrics line's (None: keep showing the last one)."""
        if self._bar is not None:
            self._bar.update(self._task, completed=done, **({} if loss is None else {"loss": f"{loss:.4f}"}))

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

