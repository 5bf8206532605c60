"""Write a depth cache shard by shard, safe to kill at any instant and to re-run (resume); :func:`finalize`
merges the finished shards into ``index.json``. The format is described in :mod:`pipeline.depth_cache.format`.

A shard file is only trusted after close -> fsync -> rename, and only counts as done once its entry exists.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from pipeline.depth_cache.format import (COMPRESSION, INDEX_FILE, LAYOUT_FILE, SCHEMA_VERSION, SHARD_DIR,
                                         STORAGE_DTYPES, VALUES, frame_checksum, frame_hashes_digest, load_layout,
                                         normalize_spec, pow2_scale, read_entry, read_json, shard_name, spec_diff,
                                         tmp_name, write_json)
from pipeline.errors import CacheError, CacheStorageError, printable
from pipeline.store.io import (GuardedFile, canonical_json, fsync_path, human_bytes, is_storage_error, pretty_json,
                               replace_durably, sha256_file, storage_error)

_TMP_RE = re.compile(r"^shard-(\d+)\.(h5|json)\.tmp-")


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
        return shard_name(self.index)


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
        self.spec = normalize_spec(spec)
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
            tmp = tmp_name(path)
            try:
                tmp.write_text(pretty_json(self.layout, indent=1, default=None), encoding="utf-8")
                fsync_path(tmp)
                os.link(tmp, path)
                fsync_path(path.parent)
            except FileExistsError:
                pass
            except OSError as e:
                if is_storage_error(e):
                    raise storage_error(e, path, what="depth cache layout", cls=CacheStorageError) from None
                raise
            finally:
                tmp.unlink(missing_ok=True)
        have = read_json(path, "depth cache layout")
        if canonical_json(have) == canonical_json(self.layout):
            return
        diffs = spec_diff(have.get("spec", {}), self.spec)
        diffs += [f"{k}: cache {have.get(k)!r}, expected {self.layout[k]!r}" for k in self.layout
                  if k != "spec" and canonical_json(have.get(k)) != canonical_json(self.layout[k])]
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
        entry = read_entry(self.cache_dir, plan.index)
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
        self._tmp = tmp_name(self._final)
        self._filled = np.zeros(n, dtype=bool)
        self._frame_id: list[str] = [""] * n
        self._frame_hash: list[str] = [""] * n
        self._checksum: list[str] = [""] * n
        self._shape = np.zeros((n, 2), dtype=np.int32)  # (h, w) of each frame; (0, 0) for invalid frames
        self._scale = np.ones(n, dtype=np.float32)
        self._valid = np.zeros(n, dtype=bool)
        self._buffer: dict[int, np.ndarray] = {}
        self._guard: GuardedFile | None = None
        self._file: h5py.File | None = None
        self._depth: h5py.Dataset | None = None
        self._max_shape = None if max_shape is None else (max(1, int(max_shape[0])), max(1, int(max_shape[1])))
        if self._max_shape is not None:
            self._create_file(self._max_shape)

    def _create_file(self, max_shape: tuple[int, int]) -> None:
        w = self._writer
        # Default libver, no SWMR: after a crash these need h5clear (research/pipeline.md §2.4). The temp file
        # is never trusted anyway; it is either renamed after close+fsync or deleted on resume. HDF5 writes
        # through a GuardedFile, so a full disk never reaches HDF5 (h5py cannot close such a file safely).
        self._guard = GuardedFile(self._tmp)
        f = h5py.File(self._guard, "w")
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
        f.attrs["spec_json"] = canonical_json(w.spec)
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
            valid: bool = True, prepared: "PreparedFrame | None" = None) -> None:
        """Add manifest frame ``frame_index`` (float (h, w) relative inverse depth; ignored when not valid).

        ``prepared``: the frame already converted (and its chunk encoded) by :func:`prepare_frame`, on another
        thread; ``depth`` is then not read."""
        row = frame_index - self.plan.start
        if not 0 <= row < self.plan.n:
            raise ValueError(f"frame {frame_index} is not in {self.plan.name} [{self.plan.start}, {self.plan.stop})")
        if self._filled[row]:
            raise ValueError(f"frame {frame_index} was already added to {self.plan.name}")
        if prepared is None:
            prepared = prepare_frame(depth, valid=valid, storage_dtype=self._writer.storage_dtype,
                                     frame_index=frame_index, frame_id=frame_id,
                                     chunk_shape=self._max_shape if self._depth is not None else None)
        h, w = prepared.shape
        if self._max_shape is not None and (h > self._max_shape[0] or w > self._max_shape[1]):
            raise ValueError(f"frame {frame_index} has shape {(h, w)}, larger than max_shape {self._max_shape}")
        self._frame_id[row] = printable(str(frame_id))  # HDF5 strings are UTF-8; ids are for people
        self._frame_hash[row] = str(frame_hash)
        self._shape[row] = (h, w)
        self._scale[row] = prepared.scale
        self._valid[row] = bool(valid)
        self._checksum[row] = prepared.checksum
        self._filled[row] = True
        if h and w:
            if self._depth is not None:
                if prepared.chunk is not None and prepared.chunk_shape == self._max_shape:
                    self._depth.id.write_direct_chunk((row, 0, 0), prepared.chunk)  # encoded already: no filter work
                else:
                    self._write(row, prepared.stored)
                self._guard.check()  # a full disk stops the shard now, not at its commit
            else:
                self._buffer[row] = prepared.stored

    def _write(self, row: int, stored: np.ndarray) -> None:
        """Frame ``row``'s stored (h, w) values into its chunk. Encoded here and written as a finished chunk, as
        the pool's frames are: HDF5 places a chunk it compresses itself only when its chunk cache flushes, so
        mixing the two ways would give the same frames at other offsets, and a shard's bytes must not depend on
        how its frames arrived."""
        h, w = stored.shape
        if not DIRECT_CHUNKS:
            self._depth[row, :h, :w] = stored
            return
        from pipeline.depth_cache.chunks import encode_chunk

        chunk = np.zeros((1, *self._depth.chunks[1:]), dtype=stored.dtype)
        chunk[0, :h, :w] = stored
        self._depth.id.write_direct_chunk((row, 0, 0), encode_chunk(chunk, COMPRESSION["level"]))

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
                self._write(row, self._buffer.pop(row))
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
        self._guard.sync()
        self._guard.close()
        digest = sha256_file(self._tmp)
        size = self._tmp.stat().st_size
        replace_durably(self._tmp, self._final)
        entry = {
            "schema_version": SCHEMA_VERSION,
            "shard": self.plan.index,
            "file": f"{SHARD_DIR}/{self._final.name}",
            "frames": [self.plan.start, self.plan.stop],
            "n_frames": self.plan.n,
            "n_valid": int(self._valid.sum()),
            "bytes": size,
            "sha256": digest,
            "frame_hashes_digest": frame_hashes_digest(self._frame_hash),
        }
        # The entry is the shard's "done" marker, so it is written last (atomically).
        write_json(self._final.with_suffix(".json"), entry)
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
        if self._guard is not None:
            self._guard.close()
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
        # Disk full, quota, read-only, I/O errors: the user's to fix; published shards are untouched by design.
        if self._guard is not None and self._guard.error is not None and not is_storage_error(exc):
            exc = self._guard.error  # the write that failed, not what HDF5 made of it
        if is_storage_error(exc):
            frames = f"{self.plan.start}..{self.plan.stop - 1}"
            raise storage_error(exc, self._final, what=f"depth cache shard, frames {frames}", needed=self._needed(),
                                cls=CacheStorageError) from None
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise CacheError(f"writing depth cache shard {self._final} failed ({exc}); free disk space (or fix the "
                             f"file system) and re-run `dkp-pipeline depth`: finished shards are kept and it "
                             f"resumes from there") from exc


    def _needed(self) -> str | None:
        """What the shard needs on disk at most: its frames uncompressed (gzip makes them smaller)."""
        if self._max_shape is None and not self._valid.any():
            return None
        h, w = self._max_shape or (int(self._shape[:, 0].max()), int(self._shape[:, 1].max()))
        raw = self.plan.n * h * w * np.dtype(self._writer.storage_dtype).itemsize
        return f"up to {human_bytes(raw)} for its {self.plan.n} frames before compression, plus the file's metadata"


@dataclasses.dataclass(frozen=True)
class PreparedFrame:
    """A frame as a shard stores it: (h, w), scale, checksum, and either the stored values or, where the chunk
    shape was known, the whole chunk encoded as HDF5 would (``chunks.encode_chunk``)."""

    shape: tuple[int, int]
    scale: float
    checksum: str
    stored: np.ndarray | None  # (h, w) storage dtype; None once encoded into ``chunk``
    chunk: bytes | None = None
    chunk_shape: tuple[int, int] | None = None


# the chunk encoder reproduces exactly this filter pipeline; any other COMPRESSION falls back to HDF5's filters
DIRECT_CHUNKS = (COMPRESSION["filter"] == "gzip" and COMPRESSION["shuffle"] and COMPRESSION["fletcher32"])


def prepare_frame(depth: np.ndarray | None, *, valid: bool, storage_dtype: str, frame_index: int, frame_id: str,
                  chunk_shape: tuple[int, int] | None = None) -> PreparedFrame:
    """Everything a shard does to a frame before HDF5 sees it, pure (so any thread may run it): check it, store
    float16 with a power-of-two scale (or float32), checksum it, and with ``chunk_shape`` (the shard's (H, W))
    encode its zero-padded chunk. The CPU-heavy part of writing the cache; the depth stage runs it on a pool."""
    stored = np.zeros((0, 0), dtype=storage_dtype)
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
        if storage_dtype == "float16":
            scale = pow2_scale(d)
            stored = (d / np.float32(scale)).astype(np.float16)
        else:
            stored = d
    h, w = stored.shape
    checksum = frame_checksum(stored, scale)
    if not (DIRECT_CHUNKS and chunk_shape is not None and h and w and h <= chunk_shape[0] and w <= chunk_shape[1]):
        return PreparedFrame((h, w), scale, checksum, stored)
    from pipeline.depth_cache.chunks import encode_chunk

    chunk = np.zeros((1, *chunk_shape), dtype=stored.dtype)  # the dataset's fill value outside the frame
    chunk[0, :h, :w] = stored
    return PreparedFrame((h, w), scale, checksum, None, encode_chunk(chunk, COMPRESSION["level"]), tuple(chunk_shape))


def forget_damaged(cache_dir: str | os.PathLike, files: Sequence[str]) -> None:
    """Prepare a finished cache with damaged ``files`` (relative paths) for a resumed ``depth`` run: a damaged
    shard loses its entry (first) and its file, so it is computed again and only it; a damaged index, layout,
    preview or part file is deleted (the resumed run writes it again). Shards not named are kept."""
    cache_dir = Path(cache_dir)
    shard_re = re.compile(rf"^{SHARD_DIR}/(shard-\d+)\.(h5|json)$")
    for rel in files:
        m = shard_re.match(rel)
        if m:
            (cache_dir / SHARD_DIR / f"{m.group(1)}.json").unlink(missing_ok=True)  # entry first: never a stale one
            (cache_dir / SHARD_DIR / f"{m.group(1)}.h5").unlink(missing_ok=True)
        elif "/" not in rel and rel and (cache_dir / rel).is_file():
            (cache_dir / rel).unlink(missing_ok=True)
    (cache_dir / INDEX_FILE).unlink(missing_ok=True)  # finalize writes it again from the shards' entries


def finalize(cache_dir: str | os.PathLike) -> dict:
    """Check every shard is present and write ``index.json`` (layout + all entries) atomically; returns it.

    This is also the merge step of a distributed run: call it from ONE process (e.g. rank 0 after a
    barrier) once all ranks finished; it also removes temp files a killed finalize left behind.
    """
    cache_dir = Path(cache_dir)
    layout = load_layout(cache_dir)
    # Temps of layout.json/index.json left by a killed process. Only safe because finalize runs once, after
    # every rank is past its CacheWriter construction (the only other writer of these files).
    for path in cache_dir.iterdir():
        if path.name.startswith((f"{LAYOUT_FILE}.tmp-", f"{INDEX_FILE}.tmp-")):
            path.unlink(missing_ok=True)
    entries, missing = [], []
    shard_size, n_frames = layout["shard_size"], layout["n_frames"]
    for i in range(layout["n_shards"]):
        entry = read_entry(cache_dir, i)
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
        shown = ", ".join(shard_name(i) for i in missing[:10]) + (" …" if len(missing) > 10 else "")
        raise CacheError(f"depth cache {cache_dir} is incomplete: {len(missing)} of {layout['n_shards']} shards "
                         f"missing ({shown}); re-run `dkp-pipeline depth` (every rank / --shard job) to write them")
    index = dict(layout)
    index["shards"] = entries
    index["frames_digest"] = frame_hashes_digest(e["frame_hashes_digest"] for e in entries)
    write_json(cache_dir / INDEX_FILE, index)
    return index
