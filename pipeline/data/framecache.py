"""The training-frame cache: every training frame decoded, resized (and its depth normalised) once, so that a
training sample costs a row copy instead of a decode.

Why: :class:`~pipeline.data.datasets.FrameDataset` decodes the full frame, resizes it, reads the full-resolution
depth map and normalises it for every sample of every epoch: 1.1-2.5 ms of one core per sample (docs/benchmarks.md),
slower than a GPU consumes them. The cache holds, per dataset item, exactly what that path computes before the
tensor conversion, in a plain ``.npy`` read through ``mmap``:

- ``rgb``   (N, 3, S, S) uint8: ``resize_square(read_rgb(frame), S)``, channels first;
- ``depth`` (N, S, S) float32: ``normalise_inverse_depth(resize_square(depth map, S), norm)``;
- ``mask``  (N, C, S, S) float32: the foreground factor, ``resize_square(read_mask(mask), S)`` (``apply_masks``).

The flip, the float conversion and the mask product then run on these rows through the same code as without a
cache (:func:`pipeline.data.datasets.finish`), so a cached sample is bit-identical to a decoded one
(tests/test_framecache.py). Channels first, so that a sample is a plain copy of its row (mirrored or not), not a
strided transpose. Depth is kept in float32, not float16: the resized, normalised map is not a float16 value,
and the teacher's input must not change.

**Identity.** Each cache is content-addressed like an artifact: ``STORE/frame-cache/<kind>-<key[:16]>/`` with
``data.npy``, ``artifact.json`` (key, what it hashed) and ``COMPLETE``, written under the store's lock. Its key
hashes what its rows are a function of: the frames' content fingerprints (and EXIF orientation) of the rows
in order, the size and the decode rule (``rgb``); the depth artifact's key, the rows and the normalisation
(``depth``); the masks' fingerprints (``mask``). All of these are already in the key of every stage that reads a
cache (teach, distill), so the cache is an accelerator that enters no artifact key: turning it on or off
(``teach.frame_cache``) changes no key and no result. Caches are shared between the stages, the student and its
baseline, and the runs of a sweep over the same data.

**Building.** Once, by whichever process takes its lock first (other processes, torchrun ranks or a side-by-side
job, wait for ``COMPLETE``), decoding in DataLoader workers. It writes ``data.npy.partial`` in row order and records
the rows done after each flushed chunk, so a killed build resumes there. Skipped (training decodes as before)
when the disk lacks room for it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from pipeline.errors import CacheError, LockError
from pipeline.store.io import is_storage_error

log = logging.getLogger(__name__)

SCHEMA = 1  # bump when the meaning of a cache's rows changes
# The decode rule of the rows: change the text when read_rgb, read_mask, resize_square or normalise_inverse_depth
# change what they return, so caches built under the old rule are not reused.
DECODE_RULE = "read_rgb/resize_square(INTER_AREA down, INTER_LINEAR up)/normalise_inverse_depth/read_mask, v1"
DIRNAME = "frame-cache"
CHUNK_ROWS = 256  # rows decoded per worker task and written per flush
MARGIN_BYTES = 1 << 30  # free space left on the disk after a cache is built
PROGRESS_EVERY_S = 5.0  # how often a build records the rows it has on disk (what a killed build resumes from)


@dataclass(frozen=True)
class CacheSpec:
    """One cache: what it holds (``kind``), its key and what the key hashed, the shape of one row."""

    kind: str  # rgb | depth | mask
    key: str
    identity: dict
    row_shape: tuple[int, ...]
    dtype: str

    def directory(self, store_root: Path) -> Path:
        return Path(store_root) / DIRNAME / f"{self.kind}-{self.key[:16]}"

    def nbytes(self, n_rows: int) -> int:
        return int(n_rows * np.prod(self.row_shape) * np.dtype(self.dtype).itemsize)


def _key(identity: dict) -> str:
    from pipeline.store.io import json_digest

    return json_digest({"cache": DIRNAME, "schema": SCHEMA, **identity})


def specs_for(ds, *, depth_key: Optional[str]) -> list[CacheSpec]:
    """The caches :class:`~pipeline.data.datasets.FrameDataset` ``ds`` reads from: rgb and/or depth as it uses
    them, and mask when its manifest applies masks."""
    from pipeline.data.reads import digest, frames_of

    m, idx, S = ds.manifest, np.asarray(ds.indices, dtype=np.int64), int(ds.image_size)
    out = []
    if ds.use_rgb:
        ident = {"kind": "rgb", "size": S, "decode": DECODE_RULE, "frames": frames_of(m, idx)}
        out.append(CacheSpec("rgb", _key(ident), ident, (3, S, S), "uint8"))
    if ds.use_depth:
        if not depth_key:
            raise ValueError("a depth frame cache needs the key of the depth artifact it is read from")
        ident = {"kind": "depth", "size": S, "decode": DECODE_RULE, "depth": depth_key, "norm": ds.depth_norm,
                 "rows": digest(idx)}
        degrade = getattr(ds.reader, "degrade", None)  # depth.degrade: the teacher reads other maps
        if degrade is not None:  # (absent otherwise: the caches built before degrade existed keep their keys)
            import dataclasses

            ident["degrade"] = dataclasses.asdict(degrade)
        out.append(CacheSpec("depth", _key(ident), ident, (S, S), "float32"))
    if m.apply_masks and (ds.use_rgb or ds.use_depth):
        from pipeline.store.fingerprint import combine

        ident = {"kind": "mask", "size": S, "decode": DECODE_RULE,
                 "masks": combine([m.mask_fingerprints[i] or "-" for i in idx.tolist()])}
        channels = ds.mask_chw(0).shape[0] if len(idx) else 1  # 1 (gray mask) or 3 (RGB mask)
        out.append(CacheSpec("mask", _key(ident), ident, (channels, S, S), "float32"))
    return out


class FrameCache:
    """Rows of the caches of one dataset, by kind. Opens its files lazily in the process that reads (DataLoader
    workers included) and pickles without them.

    A row is read with one ``pread`` into a fresh array (a copy from the page cache: 20-30 us for a 128 px RGB row
    in a profile on the loaded 2-core VM), cheaper than touching a memory map's pages one fault at a time, and the
    array is the sample's own."""

    def __init__(self, files: dict[str, Path], n_rows: int) -> None:
        self.files, self.n_rows = dict(files), n_rows
        self._open: dict[str, tuple] = {}  # kind -> (fd, data offset, row shape, dtype, row bytes)
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"files": self.files, "n_rows": self.n_rows, "_open": {}, "_pid": None}

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd, *_ in self._open.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._open = {}

    def has(self, kind: str) -> bool:
        return kind in self.files

    def _file(self, kind: str) -> tuple:
        if self._pid != os.getpid():  # inherited through fork: this process's own descriptors
            self._open, self._pid = {}, os.getpid()
        f = self._open.get(kind)
        if f is None:
            path = self.files[kind]
            try:
                a = np.load(path, mmap_mode="r", allow_pickle=False)  # reads the header: shape, dtype, offset
                shape, dtype, offset = a.shape, a.dtype, a.offset
                del a
                fd = os.open(path, os.O_RDONLY)
            except (OSError, ValueError) as e:
                raise CacheError(f"frame cache {path} is unreadable ({e}); delete {path.parent} and re-run (it is "
                                 "rebuilt from the frames)") from None
            if shape[0] != self.n_rows:
                os.close(fd)
                raise CacheError(f"frame cache {path} holds {shape[0]} rows, the dataset has {self.n_rows}; "
                                 f"delete {path.parent} and re-run (it is rebuilt from the frames)")
            row = int(np.prod(shape[1:])) * dtype.itemsize
            f = self._open[kind] = (fd, offset, shape[1:], dtype, row)
        return f

    def read(self, kind: str, i: int) -> np.ndarray:
        """Row ``i`` of cache ``kind``: a new, writable array of the row's shape."""
        fd, offset, shape, dtype, nbytes = self._file(kind)
        out = np.empty(shape, dtype=dtype)
        if os.preadv(fd, [memoryview(out).cast("B")], offset + i * nbytes) != nbytes:
            raise CacheError(f"frame cache {self.files[kind]}: row {i} is cut short (the file was truncated?); delete "
                             f"{self.files[kind].parent} and re-run")
        return out


# --------------------------------------------------------------------------------------------------
# building


class _Chunks:
    """DataLoader dataset: chunk ``c`` = the rows [c * CHUNK_ROWS, ...) of one cache, decoded by ``ds`` (a
    FrameDataset without cache) as a tensor (shared memory back to the writer, not a pickle)."""

    def __init__(self, ds, kind: str, start: int, n: int) -> None:
        self.ds, self.kind, self.start, self.n = ds, kind, start, n

    def __len__(self) -> int:
        return (self.n - self.start + CHUNK_ROWS - 1) // CHUNK_ROWS

    def __getitem__(self, c: int):
        import torch

        lo = self.start + c * CHUNK_ROWS
        rows = [ROW_OF[self.kind](self.ds, i) for i in range(lo, min(lo + CHUNK_ROWS, self.n))]
        if self.kind == "mask":  # a gray mask in a cache of colour ones: its factor once per channel (same products)
            c = max(r.shape[0] for r in rows)
            rows = [np.repeat(r, c, axis=0) if r.shape[0] < c else r for r in rows]
        return lo, torch.from_numpy(np.stack(rows))


ROW_OF: dict[str, Callable[[Any, int], np.ndarray]] = {
    "rgb": lambda ds, i: ds.rgb_chw(i),
    "depth": lambda ds, i: ds.depth_map(i),
    "mask": lambda ds, i: ds.mask_chw(i),
}


def _identity(batch):
    return batch


def build_workers() -> int:
    """Decoding processes for a cache build: the cores this process may use, less one for the writer, at most 16
    (the build runs before training, so it may use them all)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(16, cpus - 1))


def _progress_file(d: Path) -> Path:
    return d / "progress.json"


def _rows_done(d: Path, spec: CacheSpec, n: int) -> int:
    """Rows a killed build finished (0 when there is nothing usable to resume)."""
    partial = d / "data.npy.partial"
    try:
        done = int(json.loads(_progress_file(d).read_text())["rows"])
        mm = np.load(partial, mmap_mode="r", allow_pickle=False)
        ok = mm.shape == (n, *spec.row_shape) and mm.dtype == np.dtype(spec.dtype) and 0 <= done <= n
        del mm
        return done if ok else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _write(d: Path, spec: CacheSpec, ds, n: int, workers: int, console) -> None:
    """Decode rows [done, n) into ``data.npy.partial`` and publish it as ``data.npy`` (the lock is held).

    Plain positioned writes, not a writable memory map: on a full disk a write() fails with ENOSPC (a warning, then
    training decodes as before), where a store into a mapped page of a sparse file is a SIGBUS that kills the
    process."""
    from torch.utils.data import DataLoader

    from pipeline.store.io import fsync_path, write_atomic, write_json_atomic

    partial = d / "data.npy.partial"
    done = _rows_done(d, spec, n)
    dtype = np.dtype(spec.dtype)
    row_bytes = int(np.prod(spec.row_shape)) * dtype.itemsize
    t0, last_save = time.time(), time.time()
    if console is not None:
        console.print(f"frame cache: {spec.kind} {'x'.join(map(str, spec.row_shape))} {spec.dtype} for {n} frames "
                      f"({spec.nbytes(n) / 2**20:.0f} MiB){f', resuming at row {done}' if done else ''} -> {d}",
                      markup=False, soft_wrap=True)
    from pipeline.data.workers import dies_with_this_process

    loader = DataLoader(_Chunks(ds, spec.kind, done, n), batch_size=None, num_workers=workers,
                        collate_fn=_identity, prefetch_factor=4 if workers else None,
                        worker_init_fn=dies_with_this_process() if workers else None)
    with open(partial, "r+b" if done else "w+b") as f:
        if done:  # the header as the killed build wrote it
            version = np.lib.format.read_magic(f)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
        else:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                     "fortran_order": False, "shape": (n, *spec.row_shape)})
        offset = f.tell()
        if not done:
            f.truncate(offset + n * row_bytes)  # the whole file's size (sparse): what a resume checks it by
        for lo, rows in loader:
            if tuple(rows.shape[1:]) != tuple(spec.row_shape):  # a colour mask in a cache begun with gray ones
                f.close()
                partial.unlink()
                raise _Wider(rows.shape[1])
            f.seek(offset + lo * row_bytes)
            f.write(np.ascontiguousarray(rows.numpy(), dtype=dtype).data)
            done = lo + len(rows)
            if time.time() - last_save >= PROGRESS_EVERY_S or done == n:  # rows before `done` on disk, then say so
                f.flush()
                os.fsync(f.fileno())
                write_atomic(_progress_file(d), json.dumps({"rows": done}), what="the frame cache's progress")
                last_save = time.time()
    fsync_path(partial)
    os.replace(partial, d / "data.npy")
    write_json_atomic(d / "artifact.json", {"key": spec.key, "kind": spec.kind, "schema": SCHEMA,
                                            "identity": spec.identity, "rows": n, "row_shape": list(spec.row_shape),
                                            "dtype": spec.dtype, "seconds": round(time.time() - t0, 2),
                                            "workers": workers}, what="the frame cache's record")
    write_atomic(d / "COMPLETE", spec.key + "\n", what="the frame cache's marker")
    _progress_file(d).unlink(missing_ok=True)


class _Wider(Exception):
    """A row has more channels than the cache was begun with (masks: gray first, a colour one later)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.channels = channels


def _complete(d: Path, spec: CacheSpec) -> bool:
    try:
        return (d / "COMPLETE").read_text().strip() == spec.key
    except OSError:
        return False


def ensure(store_root: Path, spec: CacheSpec, ds, *, workers: Optional[int] = None, console=None,
           build: bool = True, poll_s: float = 2.0) -> Optional[Path]:
    """The ``data.npy`` of cache ``spec`` for dataset ``ds``, built if missing and ``build``; None when it is
    missing and not to be built, or the disk lacks room (training then decodes every sample, as without a cache).

    Another process building the same cache (its lock held) is waited for; a killed build is resumed."""
    from pipeline.store.artifacts import Lock

    d = spec.directory(store_root)
    if _complete(d, spec):
        return d / "data.npy"
    if not build:
        return None
    n = len(ds)
    need = spec.nbytes(n)
    try:
        d.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(d).free
    except OSError as e:
        _warn(console, f"frame cache {d} cannot be created ({_cause(e)}); training decodes every sample")
        return None
    partial = d / "data.npy.partial"
    have = partial.stat().st_size if partial.exists() else 0  # a resumed build already holds its file
    if need - have + MARGIN_BYTES > free:
        msg = (f"frame cache {d}: {need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free; training decodes every "
               f"sample instead (free space, or set frame_cache: false to silence this)")
        _warn(console, msg)
        return None
    if spec.kind == "mask" and partial.exists():  # a killed build that had widened to colour masks: resume that
        with contextlib.suppress(OSError, ValueError):
            shape = np.load(partial, mmap_mode="r", allow_pickle=False).shape
            if shape[2:] == spec.row_shape[1:]:
                spec = dataclasses.replace(spec, row_shape=tuple(shape[1:]))
    said = False
    while True:
        lock = Lock(d / "LOCK")
        try:
            lock.acquire()
        except OSError as e:  # the lock itself cannot be written
            if not is_storage_error(e):
                raise
            _warn(console, f"frame cache {d} could not be written ({_cause(e)}); training decodes every sample")
            return None
        except LockError as e:
            if _complete(d, spec):
                return d / "data.npy"
            if not said and console is not None:
                console.print(f"frame cache: waiting for another process to build {d.name} ({e})", markup=False,
                              soft_wrap=True)
                said = True
            time.sleep(poll_s)
            continue
        try:
            while not _complete(d, spec):
                try:
                    _write(d, spec, ds, n, build_workers() if workers is None else workers, console)
                except _Wider as w:
                    spec = dataclasses.replace(spec, row_shape=(w.channels, *spec.row_shape[1:]))
            return d / "data.npy"
        except OSError as e:
            if not is_storage_error(e):
                raise
            # an accelerator: a full disk (quota, read-only, failing) is a warning, and the space it took is given
            # back to the artifacts that need it
            with contextlib.suppress(OSError):
                (d / "data.npy.partial").unlink()
            _warn(console, f"frame cache {d} could not be written ({_cause(e)}); training decodes every sample")
            return None
        finally:
            lock.release()


def _warn(console, msg: str) -> None:
    log.warning(msg)
    if console is not None:
        console.print(f"warning: {msg}", markup=False, soft_wrap=True)


def _cause(e: OSError) -> str:
    """What failed, in the system's words (a StorageError's own text is a whole message with its fix)."""
    return e.strerror or str(e)


def attach(ds, store_root: Path, *, depth_key: Optional[str] = None, build: bool = True, workers: Optional[int] = None,
           console=None) -> bool:
    """Give ``ds`` (a FrameDataset) the caches of everything it reads, building those missing when ``build``.
    Returns whether every one was available (otherwise ``ds`` decodes what is not cached)."""
    files = {}
    for spec in specs_for(ds, depth_key=depth_key):
        path = ensure(store_root, spec, ds, workers=workers, console=console, build=build)
        if path is not None:
            files[spec.kind] = path
    from pipeline.data.datasets import FrameDataset

    assert isinstance(ds, FrameDataset)
    ds.cache = FrameCache(files, len(ds)) if files else None
    needed = int(ds.use_rgb) + int(ds.use_depth) + int(ds.manifest.apply_masks and (ds.use_rgb or ds.use_depth))
    return len(files) == needed
