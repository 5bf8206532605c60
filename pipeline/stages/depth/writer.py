"""Writing the cache from the depth stage: one background thread for every HDF5 operation, and the small
JSON files (``stats.part*.json``, ``skipped.part*.json``) each part appends to."""
from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Optional

from pipeline.store.artifacts import write_atomic


class _BackgroundWriter:
    """Runs every HDF5 operation of this process (open shard, add frames, commit) on one thread.

    The main thread queues work and returns at once unless ``max_pending`` messages are waiting (then it
    waits: the writer sets the pace only when it is the bottleneck). An error on the writer thread is
    re-raised in the main thread at its next call; leaving with an error aborts the open shard (its temp
    file is deleted, finished shards are untouched).
    """

    def __init__(self, cw, max_pending: int = 16) -> None:
        self.cw = cw
        self.q: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: Optional[BaseException] = None
        self.seconds_blocked = 0.0  # main thread waiting on a full queue
        self.seconds_writing = 0.0  # writer thread busy
        self.thread = threading.Thread(target=self._run, name="depth-cache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sw = None
        while True:
            op, arg = self.q.get()
            if op == "stop":
                if sw is not None:
                    sw.abort()
                return
            if self.error is not None:
                continue  # drain until stop
            t0 = time.perf_counter()
            try:
                if op == "open":
                    plan, max_shape = arg
                    sw = self.cw.open_shard(plan, max_shape=max_shape)
                elif op == "add":
                    for i, fid, fhash, depth, valid in arg:
                        sw.add(i, frame_id=fid, frame_hash=fhash, depth=depth, valid=valid)
                elif op == "commit":
                    s, sw = sw, None
                    s.__exit__(None, None, None)  # commit; on failure aborts and names disk errors
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                if sw is not None:
                    try:
                        sw.__exit__(type(e), e, e.__traceback__)  # abort; OSError -> CacheError
                    except BaseException as translated:  # noqa: BLE001
                        e = translated
                    sw = None
                self.error = e
            self.seconds_writing += time.perf_counter() - t0

    def _put(self, op: str, arg=None) -> None:
        self._raise()
        t0 = time.perf_counter()
        while True:
            try:
                self.q.put((op, arg), timeout=0.5)
                break
            except queue.Full:
                self._raise()
        self.seconds_blocked += time.perf_counter() - t0

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def open(self, plan, max_shape) -> None:
        self._put("open", (plan, max_shape))

    def add(self, rows: list[tuple]) -> None:
        self._put("add", rows)

    def commit(self) -> None:
        self._put("commit")

    def close(self, *, abort: bool) -> None:
        """Stop the thread after the queued work (``abort``: drop the open shard); re-raise a writer error."""
        self.q.put(("stop", None))
        self.thread.join()
        if not abort:
            self._raise()


def _max_shape(m, plan) -> Optional[tuple[int, int]]:
    """(H, W) of the largest frame of the shard from the manifest, so frames are written as they come."""
    wh = m.sizes[plan.start:plan.stop]  # (n, 2) (W, H)
    if len(wh) == 0 or (wh <= 0).any():
        return None  # unknown sizes: the shard writer buffers and sizes the file at commit
    return int(wh[:, 1].max()), int(wh[:, 0].max())




def append_part_file(path: Path, name: str, rows: list) -> None:
    if not rows:
        return
    f = path / name
    prev = json.loads(f.read_text()) if f.exists() else []
    write_atomic(f, json.dumps(prev + rows, indent=1))


def read_part_files(path: Path, pattern: str) -> list:
    out: list = []
    for f in sorted(path.glob(pattern)):
        out += json.loads(f.read_text())
    return out


