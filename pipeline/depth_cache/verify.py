"""Re-check a finished depth cache end to end (:func:`verify`), reporting every defect by shard and frame."""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from pipeline.depth_cache.format import (INDEX_FILE, SCHEMA_VERSION, STORAGE_DTYPES, VALUES, frame_checksum,
                                         frame_hashes_digest, load_index)
from pipeline.errors import CacheError
from pipeline.store.io import canonical_json, sha256_file

@dataclasses.dataclass
class VerifyReport:
    """Outcome of :func:`verify`; ``problems`` name the shard file (and frame) of each defect."""

    cache_dir: str
    n_frames: int = 0
    n_shards: int = 0
    frames_checked: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    damaged: dict[str, str] = dataclasses.field(default_factory=dict)  # file (relative) -> its first problem

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, rel: str, problem: str) -> None:
        """Record a defect of file ``rel`` (relative to the cache directory)."""
        self.problems.append(f"{rel}: {problem}")
        self.damaged.setdefault(rel, problem)

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
        index = load_index(cache_dir)
    except CacheError as exc:
        report.problems.append(str(exc))
        report.damaged.setdefault(INDEX_FILE, "missing or unreadable")
        return report
    add = report.add
    n_frames, shard_size = index.get("n_frames"), index.get("shard_size")
    report.n_frames, report.n_shards = n_frames, len(index.get("shards", []))
    if index.get("values") != VALUES:
        add(INDEX_FILE, f"values {index.get('values')!r}, expected {VALUES!r}")
    if index.get("storage_dtype") not in STORAGE_DTYPES:
        add(INDEX_FILE, f"storage_dtype {index.get('storage_dtype')!r} not one of {STORAGE_DTYPES}")
    if not isinstance(index.get("spec"), dict):
        add(INDEX_FILE, "spec missing")
    expected_ranges = [[i * shard_size, min((i + 1) * shard_size, n_frames)]
                       for i in range(math.ceil(n_frames / shard_size))]
    if [e.get("frames") for e in index.get("shards", [])] != expected_ranges:
        add(INDEX_FILE, f"shard frame ranges do not cover frames 0..{n_frames} in shards of {shard_size}")
        return report
    if expected_frame_hashes is not None and len(expected_frame_hashes) != n_frames:
        report.problems.append(f"the manifest has {len(expected_frame_hashes)} frames, the cache {n_frames}")
        expected_frame_hashes = None
    digests = []
    for entry in index["shards"]:
        digests.append(entry.get("frame_hashes_digest", ""))
        _verify_shard(cache_dir, index, entry, expected_frame_hashes, report)
    if index.get("frames_digest") != frame_hashes_digest(digests):
        add(INDEX_FILE, "frames_digest does not match the shard entries (index edited?)")
    return report


def damage(cache_dir: str | os.PathLike, *, deep: bool = False) -> list[dict]:
    """What is damaged in a finished cache, as ``[{"file": relative path, "problem": ...}]``: every shard the
    index lists is there with its recorded size (one stat each, what `status` pays); ``deep``: all of
    :func:`verify` (shard sha256s, every chunk decoded and every frame checksum recomputed)."""
    cache_dir = Path(cache_dir)
    if deep:
        return [{"file": rel, "problem": problem} for rel, problem in verify(cache_dir).damaged.items()]
    try:
        shards = [(e["file"], int(e["bytes"])) for e in load_index(cache_dir)["shards"]]
    except (CacheError, KeyError, TypeError, ValueError):
        return [{"file": INDEX_FILE, "problem": "missing or unreadable"}]
    out = []
    for rel, want in shards:
        try:
            size = (cache_dir / rel).stat().st_size
        except FileNotFoundError:
            out.append({"file": rel, "problem": "missing"})
            continue
        if size != want:
            out.append({"file": rel, "problem": f"is {size} bytes, the index says {want} (truncated or replaced)"})
    return out


def _verify_shard(cache_dir: Path, index: dict, entry: dict, expected_frame_hashes: Sequence[str] | None,
                  report: VerifyReport) -> None:
    add = report.add
    rel = entry["file"]
    path = cache_dir / rel
    if not path.exists():
        add(rel, "missing")
        return
    size = path.stat().st_size
    if size != entry["bytes"]:
        add(rel, f"{size} bytes, index says {entry['bytes']} (truncated or replaced)")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        add(rel, f"{digest} differs from the index's {entry['sha256']} (file changed or corrupted)")
    start, stop = entry["frames"]
    try:
        f = h5py.File(path, "r", locking=False)
    except (OSError, ValueError) as exc:
        add(rel, f"cannot be opened as HDF5 ({exc}); frames {start}..{stop - 1} are lost")
        return
    with f:
        try:
            if f.attrs.get("spec_json") != canonical_json(index["spec"]):
                add(rel, f"spec attributes differ from {INDEX_FILE}")
            if int(f.attrs.get("schema_version", -1)) != SCHEMA_VERSION or f.attrs.get("values") != VALUES:
                add(rel, "schema_version/values attributes differ from this tool's")
            if f.attrs.get("storage_dtype") != index["storage_dtype"] or f["depth"].dtype != index["storage_dtype"]:
                add(rel, f"storage dtype differs from {INDEX_FILE}")
            if not np.array_equal(f["frame_index"][...], np.arange(start, stop)):
                add(rel, f"frame_index does not hold frames {start}..{stop - 1}")
            valid, shape, scale = f["valid"][...], f["shape"][...], f["scale"][...]
            ids = f["frame_id"].asstr()[...]
            hashes = f["frame_hash"].asstr()[...]
            checksums = f["checksum"].asstr()[...]
            depth = f["depth"]
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            add(rel, f"metadata unreadable ({exc})")
            return
        if frame_hashes_digest(hashes) != entry.get("frame_hashes_digest"):
            add(rel, "frame hashes differ from the index entry")
        for row in range(stop - start):
            i = start + row
            h, w = (int(v) for v in shape[row])
            try:
                stored = depth[row, :h, :w]
            except (OSError, RuntimeError, ValueError) as exc:
                add(rel, f"frame {i} ({ids[row]!r}) unreadable: {exc}")
                continue
            report.frames_checked += 1
            if frame_checksum(stored, float(scale[row])) != checksums[row]:
                add(rel, f"frame {i} ({ids[row]!r}) depth checksum mismatch (data corrupted)")
            elif valid[row] and (np.isinf(stored).any() or np.isnan(stored).all()):
                add(rel, f"frame {i} ({ids[row]!r}) holds Inf or no finite value")
            if expected_frame_hashes is not None and hashes[row] != expected_frame_hashes[i]:
                add(rel, f"frame {i} ({ids[row]!r}) was computed from input {hashes[row]}, the manifest has "
                         f"{expected_frame_hashes[i]} (the frame file differs)")
