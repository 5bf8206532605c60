"""The teacher-embedding cache of a distill artifact: the frozen teacher run once per (training frame, flip) into
``teacher_embeddings/`` (under torchrun each rank embeds its share into its own part), then read per batch by the
DataLoader's collate (:class:`WithTargets`) on CPU indices, so training runs no teacher forward at all. Used when
the teacher's input is deterministic per frame (``distill.teacher_cache``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from dkp_core.keypoints.teacher import FrozenTeacher

EMBEDDINGS_DIRNAME = "teacher_embeddings"
EMBEDDINGS_FORMAT = "dkp.teacher-embeddings/1"
_INDEX = "index.json"  # written last: the cache is complete when it exists
_POSITION = "position.npy"


def _part_name(part: int, parts: int) -> str:
    return f"part-{part:05d}-of-{parts:05d}.npy"


class EmbeddingCache:
    """Teacher embeddings per (training frame, flip), float32, read through memory maps.

    A folder (:data:`EMBEDDINGS_DIRNAME`): ``position.npy`` (N_manifest,) int64 = row of each manifest index or -1;
    ``part-RRRRR-of-WWWWW.npy`` (rows of part r, n_flip, *shape) float32, consecutive row ranges, one per rank that
    built it; ``index.json`` (format, layer, n_flip, shape, rows, parts with their row ranges), written last.
    ``.npy`` rather than HDF5: a batch is one fancy-indexed read of a memory map per part (~5 us a row here),
    where h5py reads chunked rows one at a time or fancy-indexes them hundreds of times slower
    (research/gpu.md section 6)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        from pipeline.errors import CheckpointError

        try:
            self.index = json.loads((self.path / _INDEX).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: no complete teacher-embedding cache here ({e}); delete the folder "
                                  "and re-run distill to rebuild it") from None
        if self.index.get("format") != EMBEDDINGS_FORMAT:
            raise CheckpointError(f"{self.path / _INDEX}: format {self.index.get('format')!r}, expected "
                                  f"{EMBEDDINGS_FORMAT!r}; delete the folder and re-run distill to rebuild it")
        self.layer, self.n_flip = self.index["layer"], int(self.index["n_flip"])
        self.shape = tuple(self.index["shape"])
        self._starts = np.array([p["start"] for p in self.index["parts"]], dtype=np.int64)
        self._maps: Optional[list[np.ndarray]] = None
        self._position: Optional[np.ndarray] = None

    def __getstate__(self) -> dict:  # DataLoader workers open their own maps
        return {**self.__dict__, "_maps": None, "_position": None}

    def _open(self) -> None:
        self._position = np.load(self.path / _POSITION)
        self._maps = [np.load(self.path / p["file"], mmap_mode="r") for p in self.index["parts"]]

    def lookup(self, index: Any, flip: Any) -> torch.Tensor:
        """Targets (B, *shape) float32 of manifest indices ``index`` (B,) with flip flags ``flip`` (B,): CPU tensors
        or arrays, as the DataLoader collates them. One vectorised read per part the batch touches."""
        if self._maps is None:
            self._open()
        if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in (index, flip)):
            raise ValueError("EmbeddingCache.lookup takes indices on the CPU (a CUDA index would make the host wait "
                             "for the GPU); look up before moving the batch to the device")
        rows = self._position[np.asarray(index, dtype=np.int64)]  # (B,)
        flips = np.asarray(flip).astype(np.int64)  # (B,) 0 or 1
        if (rows < 0).any():
            raise KeyError(f"manifest frames {np.asarray(index)[rows < 0][:5].tolist()} are not in the teacher "
                           f"embedding cache {self.path} (not training frames)")
        part = np.searchsorted(self._starts, rows, side="right") - 1  # (B,)
        out = np.empty((len(rows), *self.shape), dtype=np.float32)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self._maps[p][rows[sel] - self._starts[p], flips[sel]]
        return torch.from_numpy(out)

    def close(self) -> None:
        self._maps, self._position = None, None


class WithTargets:
    """A DataLoader ``collate_fn``: the batch as ``collate`` makes it (the default collation, or
    :func:`~pipeline.data.datasets.collate_frames` for a FrameDataset's ``loader_view``) plus ``target``, the cached
    teacher embeddings of the batch. It runs where the batch is assembled (a DataLoader worker, or the main process
    without workers), on the batch's CPU indices: one vectorised read per batch, pinned and copied to the device
    with the frames."""

    def __init__(self, cache: EmbeddingCache, collate: Optional[Callable[[list], dict]] = None) -> None:
        self.cache, self.collate = cache, collate

    def __call__(self, items: list) -> dict:
        if self.collate is None:
            from torch.utils.data import default_collate

            batch = default_collate(items)
        else:
            batch = self.collate(items)
        batch["target"] = self.cache.lookup(batch["index"], batch["flip"])
        return batch


class _DepthRows(torch.utils.data.Dataset):
    """Depth inputs (3, S, S) of dataset positions [lo, hi), unflipped: what the teacher embeds."""

    def __init__(self, ds, lo: int, hi: int) -> None:
        self.ds, self.lo, self.hi = ds, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.ds.load(self.lo + j, False)["depth"]


def build_embedding_cache(path: Path, teacher: FrozenTeacher, ds, layer: str, hflip: bool, device, console, *, rank: int = 0,
                          world: int = 1, barrier: Optional[Callable[[], None]] = None, num_workers: int = 0,
                          batch_size: int = 32) -> None:
    """Run the teacher once over every training frame of ``ds`` (and its mirror when ``hflip``) into the folder
    ``path`` (:class:`EmbeddingCache`). Under torchrun each of the ``world`` ranks embeds its own consecutive share
    of the frames into its own part file (so N ranks build it N times faster), ``barrier`` waits for all of them,
    then rank 0 writes the position table and the index. Resumable: a finished part (published by rename) is kept;
    nothing is complete before the index exists."""
    from torch.utils.data import DataLoader

    from pipeline.store.io import atomic_file, write_json_atomic

    path = Path(path)
    wait = barrier or (lambda: None)
    if (path / _INDEX).exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    n, n_flip = len(ds), 2 if hflip else 1
    lo, hi = rank * n // world, (rank + 1) * n // world
    part = path / _part_name(rank, world)
    teacher = teacher.to(device)
    shape = tuple(teacher.embedding(ds.load(0, False)["depth"][None].to(device), layer).shape[1:])
    if not part.exists():
        tmp = part.with_name(part.name + f".tmp-{os.getpid()}")  # the pattern a lock takeover cleans up
        rows_shape = (hi - lo, n_flip, *shape)
        from pipeline.data.workers import dies_with_this_process

        loader = DataLoader(_DepthRows(ds, lo, hi), batch_size=batch_size, num_workers=num_workers,
                            pin_memory=torch.device(device).type == "cuda",
                            worker_init_fn=dies_with_this_process() if num_workers else None)
        # Written in order as a plain file (an .npy header, then the rows), not through a writable memory map: a
        # full disk is then an OSError at the write (one StorageError naming the file), never a SIGBUS on a page
        # that cannot be allocated; atomic_file renames it into place only when complete.
        with atomic_file(part, tmp, what="the teacher-embedding cache",
                         needed=int(np.prod(rows_shape)) * 4) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                     "fortran_order": False, "shape": rows_shape})
            for depth in loader:  # (b, 3, S, S)
                depth = depth.to(device, non_blocking=True)
                outs = [teacher.embedding(depth, layer)]
                if hflip:
                    outs.append(teacher.embedding(depth.flip(-1), layer))
                f.write(np.ascontiguousarray(torch.stack(outs, dim=1).cpu().numpy(), np.float32))  # (b, n_flip, ...)
    wait()  # every part is written
    if rank == 0:
        n_total = int(ds.manifest.split("all").shape[0])
        position = np.full(n_total, -1, np.int64)
        position[ds.indices] = np.arange(n)
        with atomic_file(path / _POSITION) as f:
            np.save(f, position)
        parts = [{"file": _part_name(r, world), "start": r * n // world, "stop": (r + 1) * n // world}
                 for r in range(world)]
        write_json_atomic(path / _INDEX, {"format": EMBEDDINGS_FORMAT, "layer": layer, "n_flip": n_flip,
                                          "shape": list(shape), "rows": n, "dtype": "float32", "parts": parts})
        for stale in path.glob("part-*.npy"):  # parts of an interrupted build with another number of ranks
            if stale.name not in {p["file"] for p in parts}:
                stale.unlink(missing_ok=True)
        console.print(f"teacher embeddings cached: {n} frames x {n_flip} flip(s) -> {path.name}/"
                      + (f" ({world} ranks, one part each)" if world > 1 else ""))
    wait()  # the index exists for every rank
