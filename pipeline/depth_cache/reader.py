"""Random access to a finished depth cache by manifest frame index (lazy, fork-safe, LRU of open shards)."""
from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.depth_cache.format import load_index
from pipeline.errors import CacheError

class DepthCacheReader:
    """Random access to a finished cache by manifest frame index.

    Opens shard files lazily in the process that reads (and again after a fork), so one instance can be
    handed to DataLoader workers under fork, spawn or forkserver: it pickles without open handles.
    Finished shards are immutable, so they are opened with ``locking=False`` (works on NFS/Lustre).
    """

    def __init__(self, cache_dir: str | os.PathLike, *, max_open_files: int = 16) -> None:
        self.cache_dir = Path(cache_dir)
        self.index = load_index(self.cache_dir)
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
