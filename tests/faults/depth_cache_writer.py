"""Fault-test helper: writes a depth cache of deterministic synthetic maps, resuming whatever is there.

Usage: python tests/faults/depth_cache_writer.py CACHE_DIR N_FRAMES SHARD_SIZE [RANK WORLD]
Prints "ready" once imports are done (the test starts its kill timer then) and "done" after finalize.
"""
from __future__ import annotations

import sys

import numpy as np

from pipeline import depth_cache as dc

SPEC = {"model_type": "synthetic", "weights_sha256": "sha256:" + "0" * 64, "net_size": 64}


def frame(i: int) -> tuple[str, str, np.ndarray | None, bool]:
    """Frame i: id, input hash, float32 (h, w) inverse depth (None when invalid), validity — a pure function of i."""
    if i % 7 == 3:
        return f"f{i:05d}", f"xxh3:{i:032x}", None, False
    rng = np.random.default_rng(i)
    h, w = 48 + (i % 5) * 8, 64 - (i % 3) * 8  # mixed, non-square sizes
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = 100 + 50 * np.sin(xx / 7 + i) + 30 * yy / h + rng.standard_normal((h, w)).astype(np.float32)
    d[h // 4: h // 2, w // 3: w // 2] += 400  # a near object with sharp edges
    return f"f{i:05d}", f"xxh3:{i:032x}", d.astype(np.float32), True


def main(cache_dir: str, n_frames: int, shard_size: int, rank: int = 0, world: int = 1) -> None:
    print("ready", flush=True)
    writer = dc.CacheWriter(cache_dir, spec=SPEC, n_frames=n_frames, shard_size=shard_size)
    for plan in writer.shards_todo(rank, world):
        with writer.open_shard(plan) as shard:
            for i in range(plan.start, plan.stop):
                fid, fhash, depth, valid = frame(i)
                shard.add(i, frame_id=fid, frame_hash=fhash, depth=depth, valid=valid)
    if world == 1:
        dc.finalize(cache_dir)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
