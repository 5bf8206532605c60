"""What every DataLoader worker of the pipeline does first (``worker_init_fn``).

A worker must die with its process. DataLoader's own watchdog notices a vanished parent (``kill -9``) and ends the
worker's loop, but the worker then waits at exit for multiprocessing's queue feeder to flush the batches it
already made into a pipe that nobody reads any more: forever, once the pipe is full (a depth batch of decoded
frames fills it). Such orphans held ~450 MB each after the kill tests. A thread that polls the parent ends the
worker with ``os._exit`` instead, which waits for nothing.
"""
from __future__ import annotations

import functools
import os
import threading
import time
from typing import Callable

POLL_S = 0.5  # how soon an orphaned worker notices


def exit_with_parent(parent: int, _worker_id: int = 0) -> None:
    """End this process (``os._exit``) as soon as ``parent`` is no longer its parent: now, or from a daemon thread
    that polls. ``parent`` is the pid of the process that made the loader, taken there: read in the worker, a
    parent killed before the worker got this far would go unnoticed."""
    if os.getppid() != parent:
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="dkp-exit-with-parent", daemon=True).start()


def dies_with_this_process() -> Callable[[int], None]:
    """A ``worker_init_fn`` for a DataLoader made here: its workers end when this process does (picklable, so it
    also works with the spawn start method)."""
    return functools.partial(exit_with_parent, os.getpid())
