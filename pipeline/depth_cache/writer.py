"""The HDF5 depth cache: sharded writer with kill -9 safe resume, lazy reader, verify, export/import.

A cache is a directory (the artifact directory the caller owns)::

    layout.json                 spec + geometry of the cache (n_frames, shard_size, storage dtype), written first
    shards/shard-00000.h5       frames [0, shard_size), one self-describing HDF5 file, immutable once in place
    shards/shard-00000.json     its index entry (frame range, sha256, sizes), written LAST for that shard
    index.json                  all entries + layout, written by :func:`finalize` when every shard exists

The shard is the unit of work, atomicity and resume (research/pipeline.md §2.4: a SIGKILLed HDF5 file is
usually unreadable, so a file is only trusted after close -> fsync -> rename, and only counts as done
once its entry exists). See docs/cache-format.md for the full format, the measurements behind the
storage choices, and how to read a cache with plain h5py.

Stored values are what MiDaS outputs: relative inverse depth (larger = nearer), float32 (H, W) at the
frame's original size, stored either as float16 ``value / scale`` with a per-frame power-of-two ``scale``
or as float32 (``storage_dtype``).
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np
import xxhash

from pipeline.artifacts import atomic_file
from pipeline.errors import CacheError, printable

SCHEMA_VERSION = 1
VALUES = "relative inverse depth (larger = nearer)"
STORAGE_DTYPES = ("float16", "float32")
# shuffle + gzip: built into every HDF5 build (no plugin needed by whoever receives a cache); level 1 is
# as small as level 4 on 256^2 maps and writes ~35 % faster (docs/cache-format.md). fletcher32 gives every
# chunk its own checksum, so a flipped byte is an error on read instead of silently wrong depth.
COMPRESSION = {"filter": "gzip", "level": 1, "shuffle": True, "fletcher32": True}
LAYOUT_FILE = "layout.json"
INDEX_FILE = "index.json"
SHARD_DIR = "shards"
EXPORT_FORMAT = "dkp-depth-cache-export"
_TMP_RE = re.compile(r"^shard-(\d+)\.(h5|json)\.tmp-")
_HASH_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------- helpers
def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _normalize_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as plain JSON types (tuples -> lists), refusing nested dicts and non-JSON values."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec must be a flat dict of JSON values, got {type(spec).__name__}")
    out = json.loads(_canonical_json(dict(spec)))
    for key, value in out.items():
        if isinstance(value, dict):
            raise TypeError(f"spec field {key!r} is a dict; the spec must be flat (use 'a.b' keys)")
    return out


def _fsync(path: Path) -> None:
    """fsync a file or a directory by path (so a rename or a closed file's data survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON atomically (pipeline.artifacts.atomic_file, this module's temp names)."""
    with atomic_file(path, _tmp_name(path)) as fh:
        fh.write((json.dumps(obj, sort_keys=True, indent=1) + "\n").encode("utf-8"))


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise CacheError(f"{what} {path} is unreadable ({exc}); delete it and re-run `dkp-pipeline depth`") from exc


def sha256_file(path: str | os.PathLike) -> str:
    """``'sha256:<hex>'`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_CHUNK):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _frame_hashes_digest(frame_hashes: Iterable[str]) -> str:
    return "sha256:" + hashlib.sha256("\n".join(frame_hashes).encode("utf-8")).hexdigest()


def _frame_checksum(stored: np.ndarray, scale: float) -> str:
    """Checksum of one stored frame: xxh3-64 of its (h, w) stored-dtype little-endian bytes + float32 scale."""
    h = xxhash.xxh3_64()
    h.update(np.ascontiguousarray(stored, dtype=stored.dtype.newbyteorder("<")).tobytes())
    h.update(np.float32(scale).tobytes())
    return "xxh3_64:" + h.hexdigest()


def _pow2_scale(depth: np.ndarray) -> float:
    """Smallest power of two >= max |depth| (1.0 for an all-zero map).

    A power of two makes ``depth / scale`` and ``stored * scale`` exact in float32, so float16 rounding is
    the only error, and puts the largest value in (0.5, 1] — far from float16's overflow at 65504.
    """
    finite = depth[np.isfinite(depth)]  # NaN holes carry no value
    peak = float(np.max(np.abs(finite))) if finite.size else 0.0
    if peak == 0.0:
        return 1.0
    return float(2.0 ** math.ceil(math.log2(peak)))


def _spec_diff(have: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """Human-readable differences 'field: cache X, expected Y' (sorted by field)."""
    diffs = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key, "<absent>"), want.get(key, "<absent>")
        if key not in have or key not in want or _canonical_json(a) != _canonical_json(b):
            diffs.append(f"{key}: cache {a!r}, expected {b!r}")
    return diffs


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _load_layout(cache_dir: Path) -> dict:
    path = cache_dir / LAYOUT_FILE
    try:
        return _read_json(path, "depth cache layout")
    except FileNotFoundError:
        raise CacheError(f"{cache_dir} is not a depth cache (no {LAYOUT_FILE}); run `dkp-pipeline depth` to build "
                         f"it or `dkp-pipeline cache import` to install one") from None


def _load_index(cache_dir: Path) -> dict:
    path = cache_dir / INDEX_FILE
    try:
        index = _read_json(path, "depth cache index")
    except FileNotFoundError:
        done, total = progress(cache_dir) if (cache_dir / LAYOUT_FILE).exists() else (0, 0)
        todo = "to finalize it" if done == total else "(every rank / --shard job) to complete it"
        raise CacheError(f"depth cache {cache_dir} is not finished (no {INDEX_FILE}; {done}/{total} frames written); "
                         f"re-run `dkp-pipeline depth` {todo}") from None
    if index.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{path}: schema_version {index.get('schema_version')!r}, this tool reads "
                         f"{SCHEMA_VERSION}; rebuild the cache with this version of dkp-pipeline")
    return index


# ---------------------------------------------------------------------------------------------- writer
@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """One shard's share of the manifest: frames ``start <= i < stop``."""

    index: int
    start: int
    stop: int

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return _shard_name(self.index)


class CacheWriter:
    """Writes a depth cache shard by shard; safe to kill at any instant and to re-run (resume).

    Every process of a distributed run (or every ``--shard i/n`` job) builds its own ``CacheWriter`` on
    the same directory with the same arguments and writes only ``shards_todo(rank, world)``; any process
    then calls :func:`finalize` once all shards exist.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, spec: Mapping[str, Any], n_frames: int, shard_size: int,
                 storage_dtype: str = "float16") -> None:
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype {storage_dtype!r} is not one of {STORAGE_DTYPES}")
        if n_frames < 0 or shard_size < 1:
            raise ValueError(f"need n_frames >= 0 and shard_size >= 1, got {n_frames}, {shard_size}")
        self.cache_dir = Path(cache_dir)
        self.spec = _normalize_spec(spec)
        self.n_frames = int(n_frames)
        self.shard_size = int(shard_size)
        self.storage_dtype = storage_dtype
        self.layout = {
            "format": "dkp-depth-cache",
            "schema_version": SCHEMA_VERSION,
            "values": VALUES,
            "spec": self.spec,
            "n_frames": self.n_frames,
            "shard_size": self.shard_size,
            "n_shards": self.n_shards,
            "storage_dtype": self.storage_dtype,
            "compression": dict(COMPRESSION),
        }
        (self.cache_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._ensure_layout()

    def _ensure_layout(self) -> None:
        path = self.cache_dir / LAYOUT_FILE
        if not path.exists():
            # Ranks race here: link() publishes the complete temp file only if no layout exists yet, so the
            # first rank's layout wins atomically and every rank then checks its own settings against it.
            tmp = _tmp_name(path)
            tmp.write_text(json.dumps(self.layout, sort_keys=True, indent=1) + "\n", encoding="utf-8")
            _fsync(tmp)
            try:
                os.link(tmp, path)
                _fsync(path.parent)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        have = _read_json(path, "depth cache layout")
        if _canonical_json(have) == _canonical_json(self.layout):
            return
        diffs = _spec_diff(have.get("spec", {}), self.spec)
        diffs += [f"{k}: cache {have.get(k)!r}, expected {self.layout[k]!r}" for k in self.layout
                  if k != "spec" and _canonical_json(have.get(k)) != _canonical_json(self.layout[k])]
        raise CacheError(f"depth cache {self.cache_dir} was started with other settings ({'; '.join(diffs)}); "
                         f"resume with the same settings, or delete the directory to start over")

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_frames / self.shard_size)

    def plan(self, index: int) -> ShardPlan:
        if not 0 <= index < self.n_shards:
            raise IndexError(f"shard {index} out of range [0, {self.n_shards})")
        start = index * self.shard_size
        return ShardPlan(index=index, start=start, stop=min(start + self.shard_size, self.n_frames))

    def is_done(self, plan: ShardPlan, *, rehash: bool = False) -> bool:
        """True when the shard's entry exists and its file has the recorded size (and sha256 if ``rehash``)."""
        entry = _read_entry(self.cache_dir, plan.index)
        if entry is None or entry.get("frames") != [plan.start, plan.stop]:
            return False
        path = self.cache_dir / entry["file"]
        try:
            if path.stat().st_size != entry["bytes"]:
                return False
        except FileNotFoundError:
            return False
        return not rehash or sha256_file(path) == entry["sha256"]

    def shards_todo(self, rank: int = 0, world: int = 1, *, rehash: bool = False) -> list[ShardPlan]:
        """Shards owned by ``rank`` (index % world == rank) that are not done; deletes their leftover temp files.

        Round-robin ownership balances ranks and keeps them on disjoint files, so no two processes ever
        write the same path; temp files of shards owned by other ranks are left alone (they may be live).
        """
        if not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        owned = [self.plan(i) for i in range(rank, self.n_shards, world)]
        self._remove_temps({p.index for p in owned})
        return [p for p in owned if not self.is_done(p, rehash=rehash)]

    def _remove_temps(self, shard_indices: set[int]) -> None:
        shard_dir = self.cache_dir / SHARD_DIR
        for path in shard_dir.iterdir():
            m = _TMP_RE.match(path.name)
            if m and int(m.group(1)) in shard_indices:
                path.unlink(missing_ok=True)

    def open_shard(self, plan: ShardPlan, *, max_shape: tuple[int, int] | None = None) -> "ShardWriter":
        """Start (or restart) writing one shard; frames are then added in any order with ``ShardWriter.add``.

        ``max_shape`` = (H, W) of the largest frame in the shard, when known up front (e.g. from the manifest):
        frames are then compressed and written as they come. Without it they are buffered (as stored dtype)
        until ``commit`` because the padded chunk shape must be known before the dataset is created.
        """
        if plan != self.plan(plan.index):
            raise ValueError(f"{plan} does not belong to this cache's layout")
        # Forget any earlier attempt first, entry before file, so no entry ever points at a stale file.
        (self.cache_dir / SHARD_DIR / f"{plan.name}.json").unlink(missing_ok=True)
        self._remove_temps({plan.index})
        return ShardWriter(self, plan, max_shape=max_shape)

    def write_shard(self, plan: ShardPlan, frame_ids: Sequence[str], frame_hashes: Sequence[str],
                    depths: Sequence[np.ndarray | None], valid: Sequence[bool]) -> dict:
        """Write one whole shard from lists (one item per frame of ``plan``, in frame order); returns its entry.

        ``depths[k]`` is float (h, w) relative inverse depth for frame ``plan.start + k``; for an invalid
        frame it may be ``None`` and is not stored either way.
        """
        n = plan.n
        if not (len(frame_ids) == len(frame_hashes) == len(depths) == len(valid) == n):
            raise ValueError(f"{plan.name}: need {n} frame ids/hashes/depths/valid flags, got {len(frame_ids)}, "
                             f"{len(frame_hashes)}, {len(depths)}, {len(valid)}")
        shapes = [np.shape(d) for d, v in zip(depths, valid) if v and d is not None]
        max_shape = (max([s[0] for s in shapes if len(s) == 2], default=1),
                     max([s[1] for s in shapes if len(s) == 2], default=1))
        with self.open_shard(plan, max_shape=max_shape) as sw:
            for k in range(n):
                sw.add(plan.start + k, frame_id=frame_ids[k], frame_hash=frame_hashes[k], depth=depths[k],
                       valid=bool(valid[k]))
        return sw.entry


class ShardWriter:
    """One shard being written to a temporary file; ``commit`` publishes it, leaving the context aborts on error."""

    def __init__(self, writer: CacheWriter, plan: ShardPlan, *, max_shape: tuple[int, int] | None) -> None:
        self._writer = writer
        self.plan = plan
        self.entry: dict | None = None
        n = plan.n
        self._final = writer.cache_dir / SHARD_DIR / f"{plan.name}.h5"
        self._tmp = _tmp_name(self._final)
        self._filled = np.zeros(n, dtype=bool)
        self._frame_id: list[str] = [""] * n
        self._frame_hash: list[str] = [""] * n
        self._checksum: list[str] = [""] * n
        self._shape = np.zeros((n, 2), dtype=np.int32)  # (h, w) of each frame; (0, 0) for invalid frames
        self._scale = np.ones(n, dtype=np.float32)
        self._valid = np.zeros(n, dtype=bool)
        self._buffer: dict[int, np.ndarray] = {}
        self._file: h5py.File | None = None
        self._depth: h5py.Dataset | None = None
        self._max_shape = None if max_shape is None else (max(1, int(max_shape[0])), max(1, int(max_shape[1])))
        if self._max_shape is not None:
            self._create_file(self._max_shape)

    def _create_file(self, max_shape: tuple[int, int]) -> None:
        w = self._writer
        # Default libver, no SWMR: after a crash these need h5clear (research/pipeline.md §2.4). The temp file
        # is never trusted anyway; it is either renamed after close+fsync or deleted on resume.
        f = h5py.File(self._tmp, "w")
        self._file = f
        f.attrs["format"] = "dkp-depth-cache-shard"
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["values"] = VALUES
        f.attrs["storage_dtype"] = w.storage_dtype
        f.attrs["shard_index"] = self.plan.index
        f.attrs["frame_start"] = self.plan.start
        f.attrs["frame_stop"] = self.plan.stop
        f.attrs["n_frames_total"] = w.n_frames
        f.attrs["shard_size"] = w.shard_size
        f.attrs["spec_json"] = _canonical_json(w.spec)
        for key in sorted(w.spec):
            value = w.spec[key]
            # Scalars become attributes a plain-h5py user can read directly; None/lists only live in spec_json.
            if isinstance(value, (str, bool, int, float)):
                f.attrs[f"spec.{key}"] = value
        n = self.plan.n
        self._depth = f.create_dataset(
            "depth", shape=(n, *max_shape), dtype=w.storage_dtype, chunks=(1, *max_shape), fillvalue=0,
            compression=COMPRESSION["filter"], compression_opts=COMPRESSION["level"],
            shuffle=COMPRESSION["shuffle"], fletcher32=COMPRESSION["fletcher32"], track_times=False)

    def add(self, frame_index: int, *, frame_id: str, frame_hash: str, depth: np.ndarray | None,
            valid: bool = True) -> None:
        """Add manifest frame ``frame_index`` (float (h, w) relative inverse depth; ignored when not valid)."""
        row = frame_index - self.plan.start
        if not 0 <= row < self.plan.n:
            raise ValueError(f"frame {frame_index} is not in {self.plan.name} [{self.plan.start}, {self.plan.stop})")
        if self._filled[row]:
            raise ValueError(f"frame {frame_index} was already added to {self.plan.name}")
        stored = np.zeros((0, 0), dtype=self._writer.storage_dtype)
        scale = 1.0
        if valid:
            if depth is None or np.ndim(depth) != 2 or 0 in np.shape(depth):
                raise CacheError(f"depth for frame {frame_index} ({frame_id!r}) must be a non-empty (h, w) array, "
                                 f"got shape {None if depth is None else np.shape(depth)}; mark the frame invalid "
                                 f"or fix the depth provider")
            d = np.asarray(depth, dtype=np.float32)
            # NaN = a pixel with no reading (depth files' holes); Inf, or nothing but holes, is a broken map.
            if np.isinf(d).any() or np.isnan(d).all():
                raise CacheError(f"depth for frame {frame_index} ({frame_id!r}) has {int(np.isinf(d).sum())} Inf "
                                 f"values and {int(np.isnan(d).sum())} of {d.size} pixels NaN; fix the depth source "
                                 f"(or mark the frame invalid)")
            if self._writer.storage_dtype == "float16":
                scale = _pow2_scale(d)
                stored = (d / np.float32(scale)).astype(np.float16)
            else:
                stored = d
        h, w = stored.shape
        if self._max_shape is not None and (h > self._max_shape[0] or w > self._max_shape[1]):
            raise ValueError(f"frame {frame_index} has shape {(h, w)}, larger than max_shape {self._max_shape}")
        self._frame_id[row] = printable(str(frame_id))  # HDF5 strings are UTF-8; ids are for people
        self._frame_hash[row] = str(frame_hash)
        self._shape[row] = (h, w)
        self._scale[row] = scale
        self._valid[row] = bool(valid)
        self._checksum[row] = _frame_checksum(stored, scale)
        self._filled[row] = True
        if h and w:
            if self._depth is not None:
                self._depth[row, :h, :w] = stored
            else:
                self._buffer[row] = stored

    def commit(self) -> dict:
        """Publish the shard: flush, fsync, close, rename into place, then write its entry. Returns the entry."""
        if self.entry is not None:
            return self.entry
        missing = np.flatnonzero(~self._filled)
        if missing.size:
            raise ValueError(f"{self.plan.name}: {missing.size} frames were never added "
                             f"(first: {self.plan.start + int(missing[0])})")
        if self._file is None:
            shapes = self._shape[self._valid]  # (n_valid, 2)
            self._create_file((max(1, int(shapes[:, 0].max(initial=0))), max(1, int(shapes[:, 1].max(initial=0)))))
            for row in sorted(self._buffer):
                h, w = self._shape[row]
                self._depth[row, :h, :w] = self._buffer.pop(row)
        f = self._file
        str_dt = h5py.string_dtype("utf-8")
        f.create_dataset("frame_index", data=np.arange(self.plan.start, self.plan.stop, dtype=np.int64),
                         track_times=False)
        f.create_dataset("frame_id", data=self._frame_id, dtype=str_dt, track_times=False)
        f.create_dataset("frame_hash", data=self._frame_hash, dtype=str_dt, track_times=False)
        f.create_dataset("valid", data=self._valid, track_times=False)
        f.create_dataset("shape", data=self._shape, track_times=False)
        f.create_dataset("scale", data=self._scale, track_times=False)
        f.create_dataset("checksum", data=self._checksum, dtype=str_dt, track_times=False)
        f.flush()
        f.close()
        self._file = self._depth = None
        _fsync(self._tmp)
        digest = sha256_file(self._tmp)
        size = self._tmp.stat().st_size
        os.replace(self._tmp, self._final)
        _fsync(self._final.parent)
        entry = {
            "schema_version": SCHEMA_VERSION,
            "shard": self.plan.index,
            "file": f"{SHARD_DIR}/{self._final.name}",
            "frames": [self.plan.start, self.plan.stop],
            "n_frames": self.plan.n,
            "n_valid": int(self._valid.sum()),
            "bytes": size,
            "sha256": digest,
            "frame_hashes_digest": _frame_hashes_digest(self._frame_hash),
        }
        # The entry is the shard's "done" marker, so it is written last (atomically).
        _write_json_atomic(self._final.with_suffix(".json"), entry)
        self.entry = entry
        return entry

    def abort(self) -> None:
        """Drop the temporary file (the published shard, if any, is untouched)."""
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - closing a half-written temp file; it is deleted next anyway
                pass
            self._file = self._depth = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException as commit_exc:
                self.abort()
                self._raise_os_error(commit_exc)
                raise
        else:
            self.abort()
            self._raise_os_error(exc)

    def _raise_os_error(self, exc: BaseException) -> None:
        # Disk full, quota, I/O errors: the user's to fix; published shards are untouched by design.
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise CacheError(f"writing depth cache shard {self._final} failed ({exc}); free disk space (or fix the "
                             f"file system) and re-run `dkp-pipeline depth`: finished shards are kept and it "
                             f"resumes from there") from exc


def _read_entry(cache_dir: Path, index: int) -> dict | None:
    path = cache_dir / SHARD_DIR / f"{_shard_name(index)}.json"
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # Written atomically, so this means outside damage; treat the shard as not done (it is rewritten).
        return None


# ---------------------------------------------------------------------------------------------- finalize / status
def progress(cache_dir: str | os.PathLike) -> tuple[int, int]:
    """(frames in finished shards, n_frames) — cheap (no hashing), for ``status``; (0, 0) if nothing started."""
    cache_dir = Path(cache_dir)
    if not (cache_dir / LAYOUT_FILE).exists():
        return (0, 0)
    layout = _load_layout(cache_dir)
    done = 0
    for i in range(layout["n_shards"]):
        entry = _read_entry(cache_dir, i)
        if entry is None:
            continue
        try:
            if (cache_dir / entry["file"]).stat().st_size == entry["bytes"]:
                done += entry["n_frames"]
        except (FileNotFoundError, KeyError):
            pass
    return (done, layout["n_frames"])


def finalize(cache_dir: str | os.PathLike) -> dict:
    """Check every shard is present and write ``index.json`` (layout + all entries) atomically; returns it.

    This is also the merge step of a distributed run: call it from ONE process (e.g. rank 0 after a
    barrier) once all ranks finished; it also removes temp files a killed finalize left behind.
    """
    cache_dir = Path(cache_dir)
    layout = _load_layout(cache_dir)
    # Temps of layout.json/index.json left by a killed process. Only safe because finalize runs once, after
    # every rank is past its CacheWriter construction (the only other writer of these files).
    for path in cache_dir.iterdir():
        if path.name.startswith((f"{LAYOUT_FILE}.tmp-", f"{INDEX_FILE}.tmp-")):
            path.unlink(missing_ok=True)
    entries, missing = [], []
    shard_size, n_frames = layout["shard_size"], layout["n_frames"]
    for i in range(layout["n_shards"]):
        entry = _read_entry(cache_dir, i)
        expected = [i * shard_size, min((i + 1) * shard_size, n_frames)]
        ok = entry is not None and entry.get("frames") == expected
        if ok:
            try:
                ok = (cache_dir / entry["file"]).stat().st_size == entry["bytes"]
            except FileNotFoundError:
                ok = False
        if ok:
            entries.append(entry)
        else:
            missing.append(i)
    if missing:
        shown = ", ".join(_shard_name(i) for i in missing[:10]) + (" …" if len(missing) > 10 else "")
        raise CacheError(f"depth cache {cache_dir} is incomplete: {len(missing)} of {layout['n_shards']} shards "
                         f"missing ({shown}); re-run `dkp-pipeline depth` (every rank / --shard job) to write them")
    index = dict(layout)
    index["shards"] = entries
    index["frames_digest"] = _frame_hashes_digest(e["frame_hashes_digest"] for e in entries)
    _write_json_atomic(cache_dir / INDEX_FILE, index)
    return index


def read_index(cache_dir: str | os.PathLike) -> dict:
    """The finished cache's ``index.json`` (layout, spec, per-shard entries), for ``cache info``."""
    return _load_index(Path(cache_dir))


def check_spec(cache_dir: str | os.PathLike, expected_spec: Mapping[str, Any]) -> None:
    """Raise :class:`CacheError` naming every field where the cache's spec differs from ``expected_spec``."""
    cache_dir = Path(cache_dir)
    source = cache_dir / INDEX_FILE if (cache_dir / INDEX_FILE).exists() else cache_dir / LAYOUT_FILE
    spec = (_load_index(cache_dir) if source.name == INDEX_FILE else _load_layout(cache_dir))["spec"]
    diffs = _spec_diff(spec, _normalize_spec(expected_spec))
    if diffs:
        raise CacheError(f"depth cache {cache_dir} was built with another spec: {'; '.join(diffs)}. Use a cache "
                         f"built with this config (or re-run `dkp-pipeline depth`) instead of reusing this one")


# ---------------------------------------------------------------------------------------------- reader
class DepthCacheReader:
    """Random access to a finished cache by manifest frame index.

    Opens shard files lazily in the process that reads (and again after a fork), so one instance can be
    handed to DataLoader workers under fork, spawn or forkserver: it pickles without open handles.
    Finished shards are immutable, so they are opened with ``locking=False`` (works on NFS/Lustre).
    """

    def __init__(self, cache_dir: str | os.PathLike, *, max_open_files: int = 16) -> None:
        self.cache_dir = Path(cache_dir)
        self.index = _load_index(self.cache_dir)
        self.max_open_files = max_open_files
        self._starts = [e["frames"][0] for e in self.index["shards"]]
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._files: OrderedDict[int, h5py.File] = OrderedDict()
        self._meta: dict[int, dict[str, Any]] = {}
        self._id_to_index: dict[str, int] | None = None

    def __getstate__(self) -> dict:
        return {"cache_dir": self.cache_dir, "index": self.index, "max_open_files": self.max_open_files,
                "_starts": self._starts}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def spec(self) -> dict:
        return self.index["spec"]

    @property
    def storage_dtype(self) -> str:
        return self.index["storage_dtype"]

    def __len__(self) -> int:
        return self.index["n_frames"]

    def _locate(self, frame_index: int) -> tuple[int, int]:
        if not 0 <= frame_index < len(self):
            raise IndexError(f"frame {frame_index} out of range [0, {len(self)}) of depth cache {self.cache_dir}")
        shard = bisect.bisect_right(self._starts, frame_index) - 1
        return shard, frame_index - self._starts[shard]

    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():
            # Inherited through fork: never use the parent's handles (h5py state is not fork-safe).
            self._reset()
        f = self._files.get(shard)
        if f is not None:
            self._files.move_to_end(shard)
            return f
        path = self.cache_dir / self.index["shards"][shard]["file"]
        try:
            f = h5py.File(path, "r", locking=False)
        except (OSError, ValueError) as exc:
            raise CacheError(f"depth cache shard {path} cannot be opened ({exc}); run `dkp-pipeline cache verify "
                             f"{self.cache_dir}` to see the damage, then delete {self.cache_dir} and re-run "
                             f"`dkp-pipeline depth` (or re-import a good copy)") from exc
        self._files[shard] = f
        while len(self._files) > self.max_open_files:
            self._files.popitem(last=False)[1].close()
        return f

    def _shard_meta(self, shard: int) -> dict[str, Any]:
        meta = self._meta.get(shard)
        if meta is None or self._pid != os.getpid():
            f = self._file(shard)
            meta = {"valid": f["valid"][...], "shape": f["shape"][...], "scale": f["scale"][...],
                    "frame_id": list(f["frame_id"].asstr()[...]), "frame_hash": list(f["frame_hash"].asstr()[...])}
            self._meta[shard] = meta
        return meta

    def read(self, frame_index: int) -> np.ndarray:
        """Relative inverse depth of one frame: float32 (h, w) at the frame's original size (larger = nearer)."""
        shard, row = self._locate(frame_index)
        meta = self._shard_meta(shard)
        if not meta["valid"][row]:
            raise CacheError(f"frame {frame_index} ({meta['frame_id'][row]!r}) is marked invalid in depth cache "
                             f"{self.cache_dir} (it could not be read when the cache was built); skip frames for "
                             f"which is_valid() is False")
        h, w = (int(v) for v in meta["shape"][row])
        depth = meta.get("depth")
        if depth is None or not depth.id.valid:  # the file was closed by the LRU since
            depth = meta["depth"] = self._file(shard)["depth"]
        try:
            stored = depth[row, :h, :w]
        except (OSError, RuntimeError, ValueError) as exc:
            raise CacheError(f"depth cache shard {depth.file.filename}: frame {frame_index} cannot be read ({exc}); "
                             f"run `dkp-pipeline cache verify {self.cache_dir}` to see the damage, then delete "
                             f"{self.cache_dir} and re-run `dkp-pipeline depth` (or re-import a good copy)") from exc
        return stored.astype(np.float32) * np.float32(meta["scale"][row])

    def is_valid(self, frame_index: int) -> bool:
        shard, row = self._locate(frame_index)
        return bool(self._shard_meta(shard)["valid"][row])

    def frame_id(self, frame_index: int) -> str:
        shard, row = self._locate(frame_index)
        return self._shard_meta(shard)["frame_id"][row]

    def frame_hash(self, frame_index: int) -> str:
        shard, row = self._locate(frame_index)
        return self._shard_meta(shard)["frame_hash"][row]

    def index_of(self, frame_id: str) -> int:
        """Manifest index of a frame id (builds an id -> index map over all shards on first use)."""
        if self._id_to_index is None or self._pid != os.getpid():
            ids: dict[str, int] = {}
            for shard, start in enumerate(self._starts):
                for k, fid in enumerate(self._shard_meta(shard)["frame_id"]):
                    ids[fid] = start + k
            self._id_to_index = ids
        try:
            return self._id_to_index[frame_id]
        except KeyError:
            raise KeyError(f"frame id {frame_id!r} is not in depth cache {self.cache_dir}") from None

    def valid_indices(self) -> np.ndarray:
        """int64 (n_valid,) manifest indices of the frames that have depth."""
        parts = [start + np.flatnonzero(self._shard_meta(s)["valid"]) for s, start in enumerate(self._starts)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._reset()

    def __enter__(self) -> "DepthCacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- verify
@dataclasses.dataclass
class VerifyReport:
    """Outcome of :func:`verify`; ``problems`` name the shard file (and frame) of each defect."""

    cache_dir: str
    n_frames: int = 0
    n_shards: int = 0
    frames_checked: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_failed(self) -> None:
        if self.problems:
            shown = "\n  ".join(self.problems[:20])
            more = f"\n  … and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
            raise CacheError(f"depth cache {self.cache_dir} failed verification ({len(self.problems)} problems):\n  "
                             f"{shown}{more}\ndelete {self.cache_dir} and re-run `dkp-pipeline depth` to rebuild "
                             f"it, or re-import a good copy")


def verify(cache_dir: str | os.PathLike, expected_frame_hashes: Sequence[str] | None = None) -> VerifyReport:
    """Re-check a finished cache end to end: shard sha256s against the index, every frame's chunk decoded
    and its checksum recomputed, frame hashes against the manifest's (when given), spec/layout consistency."""
    cache_dir = Path(cache_dir)
    report = VerifyReport(cache_dir=str(cache_dir))
    try:
        index = _load_index(cache_dir)
    except CacheError as exc:
        report.problems.append(str(exc))
        return report
    p = report.problems
    n_frames, shard_size = index.get("n_frames"), index.get("shard_size")
    report.n_frames, report.n_shards = n_frames, len(index.get("shards", []))
    if index.get("values") != VALUES:
        p.append(f"{INDEX_FILE}: values {index.get('values')!r}, expected {VALUES!r}")
    if index.get("storage_dtype") not in STORAGE_DTYPES:
        p.append(f"{INDEX_FILE}: storage_dtype {index.get('storage_dtype')!r} not one of {STORAGE_DTYPES}")
    if not isinstance(index.get("spec"), dict):
        p.append(f"{INDEX_FILE}: spec missing")
    expected_ranges = [[i * shard_size, min((i + 1) * shard_size, n_frames)]
                       for i in range(math.ceil(n_frames / shard_size))]
    if [e.get("frames") for e in index.get("shards", [])] != expected_ranges:
        p.append(f"{INDEX_FILE}: shard frame ranges do not cover frames 0..{n_frames} in shards of {shard_size}")
        return report
    if expected_frame_hashes is not None and len(expected_frame_hashes) != n_frames:
        p.append(f"the manifest has {len(expected_frame_hashes)} frames, the cache {n_frames}")
        expected_frame_hashes = None
    digests = []
    for entry in index["shards"]:
        digests.append(entry.get("frame_hashes_digest", ""))
        _verify_shard(cache_dir, index, entry, expected_frame_hashes, report)
    if index.get("frames_digest") != _frame_hashes_digest(digests):
        p.append(f"{INDEX_FILE}: frames_digest does not match the shard entries (index edited?)")
    return report


def _verify_shard(cache_dir: Path, index: dict, entry: dict, expected_frame_hashes: Sequence[str] | None,
                  report: VerifyReport) -> None:
    p = report.problems
    rel = entry["file"]
    path = cache_dir / rel
    if not path.exists():
        p.append(f"{rel}: missing")
        return
    size = path.stat().st_size
    if size != entry["bytes"]:
        p.append(f"{rel}: {size} bytes, index says {entry['bytes']} (truncated or replaced)")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        p.append(f"{rel}: {digest} differs from the index's {entry['sha256']} (file changed or corrupted)")
    start, stop = entry["frames"]
    try:
        f = h5py.File(path, "r", locking=False)
    except (OSError, ValueError) as exc:
        p.append(f"{rel}: cannot be opened as HDF5 ({exc}); frames {start}..{stop - 1} are lost")
        return
    with f:
        try:
            if f.attrs.get("spec_json") != _canonical_json(index["spec"]):
                p.append(f"{rel}: spec attributes differ from {INDEX_FILE}")
            if int(f.attrs.get("schema_version", -1)) != SCHEMA_VERSION or f.attrs.get("values") != VALUES:
                p.append(f"{rel}: schema_version/values attributes differ from this tool's")
            if f.attrs.get("storage_dtype") != index["storage_dtype"] or f["depth"].dtype != index["storage_dtype"]:
                p.append(f"{rel}: storage dtype differs from {INDEX_FILE}")
            if not np.array_equal(f["frame_index"][...], np.arange(start, stop)):
                p.append(f"{rel}: frame_index does not hold frames {start}..{stop - 1}")
            valid, shape, scale = f["valid"][...], f["shape"][...], f["scale"][...]
            ids = f["frame_id"].asstr()[...]
            hashes = f["frame_hash"].asstr()[...]
            checksums = f["checksum"].asstr()[...]
            depth = f["depth"]
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            p.append(f"{rel}: metadata unreadable ({exc})")
            return
        if _frame_hashes_digest(hashes) != entry.get("frame_hashes_digest"):
            p.append(f"{rel}: frame hashes differ from the index entry")
        for row in range(stop - start):
            i = start + row
            h, w = (int(v) for v in shape[row])
            try:
                stored = depth[row, :h, :w]
            except (OSError, RuntimeError, ValueError) as exc:
                p.append(f"{rel}: frame {i} ({ids[row]!r}) unreadable: {exc}")
                continue
            report.frames_checked += 1
            if _frame_checksum(stored, float(scale[row])) != checksums[row]:
                p.append(f"{rel}: frame {i} ({ids[row]!r}) depth checksum mismatch (data corrupted)")
            elif valid[row] and (np.isinf(stored).any() or np.isnan(stored).all()):
                p.append(f"{rel}: frame {i} ({ids[row]!r}) holds Inf or no finite value")
            if expected_frame_hashes is not None and hashes[row] != expected_frame_hashes[i]:
                p.append(f"{rel}: frame {i} ({ids[row]!r}) was computed from input {hashes[row]}, the manifest has "
                         f"{expected_frame_hashes[i]} (the frame file differs)")


# ---------------------------------------------------------------------------------------------- export / import
def export_cache(cache_dir: str | os.PathLike, out_file: str | os.PathLike) -> str:
    """Write the whole (verified) cache as ONE HDF5 file plus ``<out_file>.sha256``; returns ``'sha256:<hex>'``.

    Layout of the file: root attrs ``format``, ``schema_version``, ``values``, ``index_json`` (the cache's
    index.json), ``spec_json`` and ``spec.*``; one group ``shards/shard-NNNNN`` per shard holding its
    datasets (compressed chunks copied as they are) and attributes.
    """
    cache_dir, out_file = Path(cache_dir), Path(out_file)
    report = verify(cache_dir)
    report.raise_if_failed()
    index = _load_index(cache_dir)
    tmp = _tmp_name(out_file)
    try:
        with h5py.File(tmp, "w") as dst:
            dst.attrs["format"] = EXPORT_FORMAT
            dst.attrs["schema_version"] = SCHEMA_VERSION
            dst.attrs["values"] = VALUES
            dst.attrs["index_json"] = _canonical_json(index)
            dst.attrs["spec_json"] = _canonical_json(index["spec"])
            for key, value in sorted(index["spec"].items()):
                if isinstance(value, (str, bool, int, float)):
                    dst.attrs[f"spec.{key}"] = value
            shards = dst.create_group("shards")
            for entry in index["shards"]:
                with h5py.File(cache_dir / entry["file"], "r", locking=False) as src:
                    group = shards.create_group(_shard_name(entry["shard"]))
                    for key, value in src.attrs.items():
                        group.attrs[key] = value
                    group.attrs["entry_json"] = _canonical_json(entry)
                    for name in src:
                        src.copy(src[name], group, name=name)
        _fsync(tmp)
        digest = sha256_file(tmp)
        os.replace(tmp, out_file)
        _fsync(out_file.parent)
    finally:
        tmp.unlink(missing_ok=True)
    side = out_file.with_name(out_file.name + ".sha256")
    with atomic_file(side, _tmp_name(side)) as fh:
        fh.write(f"{digest.split(':', 1)[1]}  {out_file.name}\n".encode("utf-8"))
    return digest


def import_cache(file: str | os.PathLike, dest_dir: str | os.PathLike, *,
                 expected_spec: Mapping[str, Any] | None = None,
                 expected_frame_hashes: Sequence[str] | None = None) -> dict:
    """Rebuild a cache directory from an exported file and verify it; returns the cache's spec.

    Checks, before anything is trusted: the ``.sha256`` file beside ``file`` (when present), the export
    format, ``expected_spec`` (field by field) and, after rebuilding, a full :func:`verify` including
    ``expected_frame_hashes`` (the local manifest's). On any failure nothing is left in ``dest_dir``.
    """
    file, dest_dir = Path(file), Path(dest_dir)
    side = file.with_name(file.name + ".sha256")
    if side.exists():
        want = "sha256:" + side.read_text(encoding="utf-8").split()[0]
        have = sha256_file(file)
        if have != want:
            raise CacheError(f"{file}: {have} does not match {side} ({want}); the download is damaged, "
                             f"fetch the export again")
    try:
        src = h5py.File(file, "r", locking=False)
    except (OSError, ValueError) as exc:
        raise CacheError(f"{file} cannot be opened as HDF5 ({exc}); it is not a depth cache export or it is "
                         f"truncated, fetch it again") from exc
    with src:
        if src.attrs.get("format") != EXPORT_FORMAT:
            raise CacheError(f"{file} is not a depth cache export (format attribute {src.attrs.get('format')!r}); "
                             f"create one with `dkp-pipeline cache export`")
        index = json.loads(src.attrs["index_json"])
        if index.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(f"{file}: schema_version {index.get('schema_version')!r}, this tool reads "
                             f"{SCHEMA_VERSION}; export it again with this version of dkp-pipeline")
        if expected_spec is not None:
            diffs = _spec_diff(index["spec"], _normalize_spec(expected_spec))
            if diffs:
                raise CacheError(f"{file} was built with another spec: {'; '.join(diffs)}; it cannot stand in for "
                                 f"this config's depth cache")
        if (dest_dir / INDEX_FILE).exists() or (dest_dir / LAYOUT_FILE).exists() or (
                (dest_dir / SHARD_DIR).is_dir() and any((dest_dir / SHARD_DIR).iterdir())):
            raise CacheError(f"{dest_dir} already holds a depth cache; delete it first or import elsewhere")
        created = [dest_dir / LAYOUT_FILE, dest_dir / INDEX_FILE, dest_dir / SHARD_DIR]
        try:
            writer = CacheWriter(dest_dir, spec=index["spec"], n_frames=index["n_frames"],
                                 shard_size=index["shard_size"], storage_dtype=index["storage_dtype"])
            for entry in index["shards"]:
                _import_shard(src, writer, entry)
            finalize(dest_dir)
            report = verify(dest_dir, expected_frame_hashes)
            report.raise_if_failed()
        except BaseException:
            for path in created:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            raise
    return index["spec"]


def _import_shard(src: h5py.File, writer: CacheWriter, entry: dict) -> None:
    plan = writer.plan(entry["shard"])
    name = f"shards/{plan.name}"
    if name not in src or entry.get("frames") != [plan.start, plan.stop]:
        raise CacheError(f"{src.filename}: group {name} missing or its frame range differs from the index; "
                         f"the export is damaged, export it again")
    group = src[name]
    final = writer.cache_dir / SHARD_DIR / f"{plan.name}.h5"
    tmp = _tmp_name(final)
    with h5py.File(tmp, "w") as dst:
        for key, value in group.attrs.items():
            if key != "entry_json":
                dst.attrs[key] = value
        for ds_name in group:
            src.copy(group[ds_name], dst, name=ds_name)
    _fsync(tmp)
    size, digest = tmp.stat().st_size, sha256_file(tmp)
    os.replace(tmp, final)
    _fsync(final.parent)
    # Copied files are not byte-identical to the sender's, so sha256/bytes are this file's own; the data
    # itself is checked frame by frame (checksums + frame hashes digest) by verify() afterwards.
    new_entry = dict(entry, bytes=size, sha256=digest)
    _write_json_atomic(final.with_suffix(".json"), new_entry)
