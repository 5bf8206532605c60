"""`dkp-pipeline bench depth-writer`: the depth stage's writer alone, old way against new.

``hdf5_filters`` (the baseline, the writer before issue 22's last step): the float16 conversion on the pool, then
HDF5's own shuffle + gzip + fletcher32 on the one writer thread, under h5py's lock, a frame at a time.
``threads_N``: the frames converted *and* their chunks encoded (``depth_cache.chunks``, the same bytes) on N pool
threads; the writer thread only hands HDF5 finished chunks. Each case stores ``--steps`` x 8 smooth ``--size``²
maps (float32 in, float16 + scale stored) into one shard, through the stage's own ``BackgroundWriter``; the cases
alternate twice (ABAB...) so each sees the same load; frames/s is the median of the two.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def _store(root: Path, maps, n: int, threads: int, direct: bool) -> float:
    from pipeline.depth_cache import CacheWriter
    from pipeline.depth_cache import writer as W
    from pipeline.stages.depth.writer import BackgroundWriter

    size = maps[0].shape[0]
    old, W.DIRECT_CHUNKS = W.DIRECT_CHUNKS, direct
    try:
        cw = CacheWriter(root, spec={"bench": "depth-writer"}, n_frames=n, shard_size=n, storage_dtype="float16")
        (plan,) = cw.shards_todo()
        bw = BackgroundWriter(cw, threads=threads)
        t0 = time.perf_counter()
        bw.open(plan, (size, size))
        for j in range(0, n, 8):
            bw.add([(k, f"f{k}", "h", maps[k % len(maps)], True) for k in range(j, min(n, j + 8))])
        bw.commit()
        bw.close(abort=False)
        return n / (time.perf_counter() - t0)
    finally:
        W.DIRECT_CHUNKS = old


def bench_depth_writer(*, batch: int, size: int, steps: int, device, isolate: bool = True, threads=None) -> dict:
    """The bench (module docstring); ``batch`` is unused."""
    import os

    import numpy as np

    from pipeline.bench.harness import ratio

    n = max(8, steps * 8)
    threads = list(threads or sorted({1, 2, max(1, min(8, (os.cpu_count() or 2) // 2))}))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rng = np.random.default_rng(0)
    maps = [(np.sin(xx / 17 + j) + np.cos(yy / 23) + 3 + 0.01 * rng.standard_normal((size, size)))
            .astype(np.float32) for j in range(4)]
    names = ["hdf5_filters"] + [f"threads_{t}" for t in threads]
    rates: dict[str, list[float]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory(prefix="dkp-bench-writer-") as tmp:
        for rnd in range(2):
            for k in (names if rnd == 0 else names[::-1]):
                root = Path(tmp) / f"{k}-{rnd}"
                t = 1 if k == "hdf5_filters" else int(k.split("_")[1])
                rates[k].append(_store(root, maps, n, t, direct=k != "hdf5_filters"))
        sizes = {k: sum(f.stat().st_size for f in (Path(tmp) / f"{k}-0").rglob("*.h5")) for k in names}
    cases = {k: {"frames_per_s": statistics.median(v), "runs_frames_per_s": [round(x, 2) for x in v], "frames": n,
                 "frame_size": size, "bytes": sizes[k]} for k, v in rates.items()}
    return {"baseline": "hdf5_filters (HDF5 compresses on the writer thread)", "cases": cases,
            "ratios": {f"frames_per_s {k}/hdf5_filters": ratio(cases[k]["frames_per_s"],
                                                               cases["hdf5_filters"]["frames_per_s"])
                       for k in names[1:]},
            "setup": {"frames": n, "frame_size": size, "storage_dtype": "float16", "threads": threads,
                      "order": "two rounds, the second reversed"}}
