"""TensorBoard event files for `teach` and `distill`, when the optional ``tensorboard`` package is installed.

Each training artifact gets ``tensorboard/<experiment>-<entry>/events.out.tfevents.*`` beside its
``metrics.jsonl``, so ``tensorboard --logdir dkp-store`` lists every run as
``teach/<key16>/tensorboard/synthetic-teach`` (the experiment and the stage, not the hash alone). Scalars: every
metrics line's losses (``loss/total``, ``loss/recon_loss``, ``loss/kd_loss``), ``train/lr``,
``train/steps_per_s`` (wall clock between two lines) and, with fp16, ``train/loss_scale``; images: the keypoint
grid of every eval step (``keypoints``).

Event files are outside every artifact key (nothing reads them back) and are flushed after each write, so a
run killed at any instant leaves them readable up to the last line logged. They are a log, not an output: when
they cannot be written (a full disk, issue 24) the run warns once and trains on without them. A resumed run appends to the same
run directory and tells TensorBoard to drop the events the killed run had logged after the checkpoint it
resumes from (``purge_step``), as :func:`pipeline.training.log.truncate_metrics` does for metrics.jsonl.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

TB_DIRNAME = "tensorboard"
log = logging.getLogger(__name__)


def available() -> bool:
    """True when ``tensorboard`` (and so ``torch.utils.tensorboard``) can be imported."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def run_dir(artifact_dir: Path, run_name: str) -> Path:
    """Where the events of the training artifact ``artifact_dir`` go: the directory an earlier (interrupted) run
    of this artifact used, whatever experiment started it, else ``tensorboard/<run_name>``."""
    root = Path(artifact_dir) / TB_DIRNAME
    existing = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return existing[0] if existing else root / (re.sub(r"[^A-Za-z0-9._-]+", "_", run_name).strip("_") or "run")


def _tag(name: str) -> str:
    if name == "loss":
        return "loss/total"
    if "loss" in name and name != "loss_scale":
        return f"loss/{name}"
    return f"train/{name}"


class TensorBoardLog:
    """A :class:`pipeline.training.TrainLog` writing TensorBoard events; the writer opens at :meth:`start` (rank 0
    only: the trainer calls it there), so creating one on every rank costs nothing."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer: Any = None
        self._last: Optional[tuple[int, float]] = None  # (step, wall time) of the previous scalars line
        self.failed: Optional[str] = None  # why events are no longer written (a full disk), once it happened

    def start(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        if self.failed:
            return
        _quiet_event_writer_threads()
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # Resumed at `step`: its metrics line and eval picture were logged before its checkpoint; everything
            # the killed run logged after it is replaced by this run's.
            self._writer = SummaryWriter(str(self.log_dir), purge_step=step + 1 if step > 0 else None)
        except OSError as e:
            self._give_up(e)
        self._last = (step, time.perf_counter())

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is None:
            self.start(0)
        if self._writer is None:
            return
        now = time.perf_counter()
        try:
            for name, value in values.items():
                self._writer.add_scalar(_tag(name), float(value), step)
            if self._last is not None and step > self._last[0] and now > self._last[1]:
                self._writer.add_scalar("train/steps_per_s", (step - self._last[0]) / (now - self._last[1]), step)
            self._writer.flush()
        except OSError as e:
            self._give_up(e)
        self._last = (step, now)

    def image(self, tag: str, step: int, rgb: np.ndarray) -> None:
        """``rgb``: (H, W, 3) uint8."""
        if self._writer is None:
            self.start(0)
        if self._writer is None:
            return
        try:
            self._writer.add_image(tag, np.ascontiguousarray(rgb), step, dataformats="HWC")
            self._writer.flush()
        except OSError as e:
            self._give_up(e)

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except OSError as e:
                self._give_up(e)

    def _give_up(self, e: OSError) -> None:
        """A log, not an output: say once that events stop here, and train on."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - its file is what failed; nothing more to save
                pass
        if self.failed is None:
            self.failed = f"{e.strerror or e}"
            log.warning("warning: TensorBoard events in %s are not written from here on (%s); training goes on "
                        "(metrics.jsonl keeps every logged value)", self.log_dir, self.failed)


def _quiet_event_writer_threads() -> None:
    """tensorboard writes events on a thread of its own, which dies with a traceback on stderr when the disk is
    full; :class:`TensorBoardLog` reports that once, as a warning, when it next writes. Installed once, only
    for OSErrors of tensorboard's threads (every other thread error is printed as before)."""
    previous = threading.excepthook
    if getattr(previous, "_dkp_quiet_tensorboard", False):
        return

    def hook(args) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    hook._dkp_quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def open_log(artifact_dir: Path, run_name: str) -> Optional[TensorBoardLog]:
    """A :class:`TensorBoardLog` for a training artifact, or None when ``tensorboard`` is not installed."""
    return TensorBoardLog(run_dir(artifact_dir, run_name)) if available() else None


def entry_name(ctx) -> str:
    """The plan entry a stage context is building ("teach", "distill", "baseline")."""
    return next((name for name, sp in ctx.plan.stages.items() if sp is ctx.stage), ctx.stage.stage)
