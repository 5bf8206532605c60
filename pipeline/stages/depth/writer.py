"""Writing the cache from the depth stage: one background thread for every HDF5 operation with a pool that
prepares (converts, compresses, checksums) the frames before it, and the small JSON files (``stats.part*.json``,
``skipped.part*.json``) each part appends to."""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from pipeline.store.artifacts import write_atomic


def encode_threads() -> int:
    """Threads that convert and compress frames for the writer: half the cores, 1 to 8 (the other half feeds
    the model: DataLoader workers, the main thread)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class BackgroundWriter:
    """Runs every HDF5 operation of this process (open shard, add frames, commit) on one thread, and the work
    before HDF5 (checks, float16 + scale, checksum, the chunk's shuffle + deflate + fletcher32:
    :func:`~pipeline.depth_cache.writer.prepare_frame`) on a pool of ``threads``, so compression no longer runs
    one frame at a time under h5py's lock: the writer thread only writes finished chunks, in order.

    The main thread queues work and returns at once unless ``max_pending`` messages are waiting (then it
    waits: the writer sets the pace only when it is the bottleneck). An error on the writer thread (or in a
    frame's preparation) is re-raised in the main thread at its next call; leaving with an error aborts the open
    shard (its temp file is deleted, finished shards are untouched).
    """

    def __init__(self, cw, max_pending: int = 16, threads: Optional[int] = None) -> None:
        self.cw = cw
        self.q: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: Optional[BaseException] = None
        self.seconds_blocked = 0.0  # main thread waiting on a full queue
        self.seconds_writing = 0.0  # writer thread busy (waiting for its frames' preparation included)
        self.seconds_encoding = 0.0  # the pool's work, summed over its threads
        self.threads = threads or encode_threads()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="depth-cache-encode")
        self._chunk_shape: Optional[tuple[int, int]] = None  # (H, W) of the open shard's chunks, when known
        self._lock = threading.Lock()
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
                    for i, fid, fhash, valid, prepared in arg:
                        sw.add(i, frame_id=fid, frame_hash=fhash, depth=None, valid=valid, prepared=prepared.result())
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

    def _prepare(self, depth, valid: bool, i: int, fid: str, chunk_shape):
        from pipeline.depth_cache.writer import prepare_frame

        t0 = time.perf_counter()
        try:
            return prepare_frame(depth, valid=valid, storage_dtype=self.cw.storage_dtype, frame_index=i, frame_id=fid,
                                 chunk_shape=chunk_shape)
        finally:
            with self._lock:
                self.seconds_encoding += time.perf_counter() - t0

    def open(self, plan, max_shape) -> None:
        # the shard writer's own chunk shape (ShardWriter normalises max_shape the same way)
        self._chunk_shape = None if max_shape is None else (max(1, int(max_shape[0])), max(1, int(max_shape[1])))
        self._put("open", (plan, max_shape))

    def add(self, rows: list[tuple]) -> None:
        """``rows``: (frame index, id, hash, (h, w) depth or None, valid); prepared on the pool from now on."""
        self._raise()
        self._put("add", [(i, fid, fhash, valid, self.pool.submit(self._prepare, depth, valid, i, fid,
                                                                    self._chunk_shape))
                          for i, fid, fhash, depth, valid in rows])

    def commit(self) -> None:
        self._put("commit")

    def close(self, *, abort: bool) -> None:
        """Stop the thread after the queued work (``abort``: drop the open shard); re-raise a writer error."""
        self.q.put(("stop", None))
        self.thread.join()
        self.pool.shutdown(wait=True, cancel_futures=True)
        if not abort:
            self._raise()


def largest_frame(m, plan) -> Optional[tuple[int, int]]:
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


