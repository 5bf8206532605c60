"""The depth cache's on-disk format: constants, layout/index/entry files, spec checks, shard names.

A cache is a directory (the artifact directory the caller owns)::

    layout.json                 spec + geometry of the cache (n_frames, shard_size, storage dtype), written first
    shards/shard-00000.h5       frames [0, shard_size), one self-describing HDF5 file, immutable once in place
    shards/shard-00000.json     its index entry (frame range, sha256, sizes), written LAST for that shard
    index.json                  all entries + layout, written by ``writer.finalize`` when every shard exists

The shard is the unit of work, atomicity and resume (research/pipeline.md §2.4: a SIGKILLed HDF5 file is
usually unreadable, so a file is only trusted after close -> fsync -> rename, and only counts as done
once its entry exists). See docs/cache-format.md for the full format, the measurements behind the
storage choices, and how to read a cache with plain h5py.

Stored values are what MiDaS outputs: relative inverse depth (larger = nearer), float32 (H, W) at the
frame's original size, stored either as float16 ``value / scale`` with a per-frame power-of-two ``scale``
or as float32 (``storage_dtype``).
"""
from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import xxhash

from pipeline.errors import CacheError
from pipeline.store.io import canonical_json, sha256_text, write_json_atomic

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
# Files whose sha256 the index holds: an artifact's file list records only their size (store.artifacts.list_files).
CHECKSUMMED_IN_INDEX = (f"{SHARD_DIR}/*.h5",)


def normalize_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as plain JSON types (tuples -> lists), refusing nested dicts and non-JSON values."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec must be a flat dict of JSON values, got {type(spec).__name__}")
    out = json.loads(canonical_json(dict(spec)))
    for key, value in out.items():
        if isinstance(value, dict):
            raise TypeError(f"spec field {key!r} is a dict; the spec must be flat (use 'a.b' keys)")
    return out


def tmp_name(path: Path) -> Path:
    """A temporary name beside ``path``, unique per process and call (ranks of a distributed run share the
    directory); the writer and finalize recognise and remove these on resume."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_json(path: Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON atomically (:func:`pipeline.store.io.write_json_atomic`, this
    package's temp names, which :class:`~pipeline.depth_cache.writer.CacheWriter` cleans up on resume)."""
    write_json_atomic(path, obj, indent=1, default=None, tmp=tmp_name(path))


def read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise CacheError(f"{what} {path} is unreadable ({exc}); delete it and re-run `dkp-pipeline depth`") from exc


def frame_hashes_digest(frame_hashes: Iterable[str]) -> str:
    return "sha256:" + sha256_text("\n".join(frame_hashes))


def frame_checksum(stored: np.ndarray, scale: float) -> str:
    """Checksum of one stored frame: xxh3-64 of its (h, w) stored-dtype little-endian bytes + float32 scale."""
    h = xxhash.xxh3_64()
    h.update(np.ascontiguousarray(stored, dtype=stored.dtype.newbyteorder("<")).tobytes())
    h.update(np.float32(scale).tobytes())
    return "xxh3_64:" + h.hexdigest()


def pow2_scale(depth: np.ndarray) -> float:
    """Smallest power of two >= max |depth| (1.0 for an all-zero map).

    A power of two makes ``depth / scale`` and ``stored * scale`` exact in float32, so float16 rounding is
    the only error, and puts the largest value in (0.5, 1] — far from float16's overflow at 65504.
    """
    finite = depth[np.isfinite(depth)]  # NaN holes carry no value
    peak = float(np.max(np.abs(finite))) if finite.size else 0.0
    if peak == 0.0:
        return 1.0
    return float(2.0 ** math.ceil(math.log2(peak)))


def spec_diff(have: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """Human-readable differences 'field: cache X, expected Y' (sorted by field)."""
    diffs = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key, "<absent>"), want.get(key, "<absent>")
        if key not in have or key not in want or canonical_json(a) != canonical_json(b):
            diffs.append(f"{key}: cache {a!r}, expected {b!r}")
    return diffs


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def load_layout(cache_dir: Path) -> dict:
    path = cache_dir / LAYOUT_FILE
    try:
        return read_json(path, "depth cache layout")
    except FileNotFoundError:
        raise CacheError(f"{cache_dir} is not a depth cache (no {LAYOUT_FILE}); run `dkp-pipeline depth` to build "
                         f"it or `dkp-pipeline cache import` to install one") from None


def load_index(cache_dir: Path) -> dict:
    path = cache_dir / INDEX_FILE
    try:
        index = read_json(path, "depth cache index")
    except FileNotFoundError:
        done, total = progress(cache_dir) if (cache_dir / LAYOUT_FILE).exists() else (0, 0)
        todo = "to finalize it" if done == total else "(every rank / --shard job) to complete it"
        raise CacheError(f"depth cache {cache_dir} is not finished (no {INDEX_FILE}; {done}/{total} frames written); "
                         f"re-run `dkp-pipeline depth` {todo}") from None
    if index.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{path}: schema_version {index.get('schema_version')!r}, this tool reads "
                         f"{SCHEMA_VERSION}; rebuild the cache with this version of dkp-pipeline")
    return index


def read_entry(cache_dir: Path, index: int) -> dict | None:
    path = cache_dir / SHARD_DIR / f"{shard_name(index)}.json"
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # Written atomically, so this means outside damage; treat the shard as not done (it is rewritten).
        return None


# ---------------------------------------------------------------------------------------------- status
def progress(cache_dir: str | os.PathLike) -> tuple[int, int]:
    """(frames in finished shards, n_frames) — cheap (no hashing), for ``status``; (0, 0) if nothing started."""
    cache_dir = Path(cache_dir)
    if not (cache_dir / LAYOUT_FILE).exists():
        return (0, 0)
    layout = load_layout(cache_dir)
    done = 0
    for i in range(layout["n_shards"]):
        entry = read_entry(cache_dir, i)
        if entry is None:
            continue
        try:
            if (cache_dir / entry["file"]).stat().st_size == entry["bytes"]:
                done += entry["n_frames"]
        except (FileNotFoundError, KeyError):
            pass
    return (done, layout["n_frames"])


def read_index(cache_dir: str | os.PathLike) -> dict:
    """The finished cache's ``index.json`` (layout, spec, per-shard entries), for ``cache info``."""
    return load_index(Path(cache_dir))


def check_spec(cache_dir: str | os.PathLike, expected_spec: Mapping[str, Any]) -> None:
    """Raise :class:`CacheError` naming every field where the cache's spec differs from ``expected_spec``."""
    cache_dir = Path(cache_dir)
    source = cache_dir / INDEX_FILE if (cache_dir / INDEX_FILE).exists() else cache_dir / LAYOUT_FILE
    spec = (load_index(cache_dir) if source.name == INDEX_FILE else load_layout(cache_dir))["spec"]
    diffs = spec_diff(spec, normalize_spec(expected_spec))
    if diffs:
        raise CacheError(f"depth cache {cache_dir} was built with another spec: {'; '.join(diffs)}. Use a cache "
                         f"built with this config (or re-run `dkp-pipeline depth`) instead of reusing this one")
