"""The depth stage's run: this process's part of the cache (``--shard i/n`` or a torchrun rank), then the
merge and publish by whichever process finishes last."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.store.artifacts import LOCK, ArtifactWriter, Lock, cpu_seconds
from pipeline.errors import ConfigError, LockError, ManifestError
from pipeline.stages.depth import compute
from pipeline.stages.depth.identity import check_midas_config, check_transformers_config
from pipeline.stages.depth.writer import append_part_file, read_part_files


def _parse_shard(text: Optional[str]) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4") from None
    if not (0 <= i < n):
        raise ConfigError(f"--shard {text!r}: expected 0 <= I < N")
    return i, n


def run_managed(ctx) -> bool:
    """Build (or resume) this process's part of the depth cache; merge and publish when every part is done.

    Returns True when the artifact is published (by this process), False when this process only wrote
    its part (``--shard i/n`` with parts left, or a torchrun rank other than 0): the runner then neither
    records the key as built nor says so.
    """
    from pipeline.depth_cache import CacheWriter

    started = (time.time(), cpu_seconds())  # the published record's wall and CPU time count from here
    s, m, sp = ctx.settings, ctx.plan.manifest, ctx.stage
    d = s.config
    shard_i, shard_n = _parse_shard(ctx.options.get("shard"))
    rank, world = ctx.process.rank, ctx.process.world
    if world > 1 and shard_n > 1:
        raise ConfigError("use either torchrun or --shard i/n, not both")
    part, parts = (rank, world) if world > 1 else (shard_i, shard_n)
    path: Path = ctx.path
    skip_bad = bool(ctx.options.get("skip_bad_frames"))

    if d.provider == "midas":
        check_midas_config(d)
    elif d.provider == "transformers":
        check_transformers_config(d)
    weights_sha, spec = s.weights_sha256, s.identity.spec

    barrier_group = _init_distributed(world)
    try:
        model = None
        if d.provider in ("midas", "transformers") and not (path / "layout.json").exists():
            # Load (and so check) the weights before the artifact directory exists: a wrong file leaves nothing.
            model = compute.load_model(d, weights_sha, local_rank=ctx.process.local_rank)
        path.mkdir(parents=True, exist_ok=True)
        lock_name = LOCK if parts == 1 else f"{LOCK}.part{part}of{parts}"
        with Lock(path / lock_name):
            _refuse_concurrent_parts(path, parts)
            writer = ArtifactWriter(stage="depth", key=sp.key, path=path, inputs=sp.inputs, config=sp.config)
            if part == 0:
                writer.write_record(status="in_progress")
            cw = CacheWriter(path, spec=spec, n_frames=len(m), shard_size=d.shard_size, storage_dtype=d.storage_dtype)
            todo = cw.shards_todo(part, parts)
            if todo:
                if model is None and d.provider in ("midas", "transformers"):
                    model = compute.load_model(d, weights_sha, local_rank=ctx.process.local_rank)  # resuming: only when this part has shards left
                stats = compute.compute_part(ctx, cw, todo, skip_bad, model, part, lane_kind=ctx.options.get("lane"))
                append_part_file(path, f"stats.part{part}.json", [stats])
        if world > 1:
            import torch.distributed as dist

            dist.barrier(group=barrier_group)
            if rank != 0:
                return False
    finally:
        if barrier_group is not None:  # only the barrier's group; the process's group stays for training
            import torch.distributed as dist

            dist.destroy_process_group(barrier_group)
    return _merge_and_publish(ctx, spec, part, parts, started)


def _merge_and_publish(ctx, spec: dict, part: int, parts: int, started: tuple[float, float]) -> bool:
    from pipeline.depth_cache import finalize, progress
    from pipeline.depth_cache.format import CHECKSUMMED_IN_INDEX

    path, sp, m = ctx.path, ctx.stage, ctx.plan.manifest
    done, total = progress(path)
    if done < total:
        ctx.console.print(f"depth part {part}/{parts} saved; {total - done} of {total} frames belong to other parts. "
                          f"When every part is done, the last one (or a re-run without --shard) merges and publishes.")
        return False
    try:
        lock = Lock(path / LOCK)
        lock.acquire()
    except LockError:
        ctx.console.print("depth: every part is done; another process is merging and publishing the cache")
        return False
    try:
        if (path / "COMPLETE").exists():
            return True
        index = finalize(path)
        _write_preview(path, m)
        skipped = _skipped_frames(path)
        stats = read_part_files(path, "stats.part*.json")
        w = ArtifactWriter(stage="depth", key=sp.key, path=path, inputs=sp.inputs, config=sp.config,
                           started=started[0], cpu_started=started[1], unhashed=CHECKSUMMED_IN_INDEX)
        w.publish(n_frames=len(m), cache_spec=spec, skipped_frames=skipped, n_shards=len(index["shards"]),
                  n_valid=sum(e["n_valid"] for e in index["shards"]), compute=_sum_stats(stats))
    finally:
        lock.release()
    if skipped:
        ctx.console.print(f"[yellow]note:[/] {len(skipped)} unreadable frame(s) marked invalid: "
                          + ", ".join(s["frame"] for s in skipped[:5]) + (" …" if len(skipped) > 5 else ""),
                          markup=True)
    return True


PREVIEW = "preview.png"


def _write_preview(path: Path, m, n: int = 8, size: int = 128) -> None:
    """``preview.png`` beside the cache: up to ``n`` valid frames spread over the manifest, each as
    (RGB, inverse depth min-max normalised, inferno: bright = near), ``size`` px squares."""
    import cv2

    from pipeline.depth_cache import DepthCacheReader
    from pipeline.data.images import resize_square
    from pipeline.data.video import read_frame
    from pipeline.viz import grid, save_png

    with DepthCacheReader(path) as r:
        valid = r.valid_indices()
        if len(valid) == 0:
            return
        tiles = []
        for i in valid[np.linspace(0, len(valid) - 1, min(n, len(valid))).round().astype(int)]:
            d = r.read(int(i))
            lo, hi = float(np.nanmin(d)), float(np.nanmax(d))  # NaN: holes, drawn as far (black)
            g = np.zeros(d.shape, np.uint8) if hi <= lo else np.nan_to_num((d - lo) / (hi - lo) * 255).round().astype(np.uint8)
            heat = cv2.applyColorMap(g, cv2.COLORMAP_INFERNO)[:, :, ::-1]  # (H, W, 3) RGB
            try:
                rgb = read_frame(m, int(i))
            except ManifestError:  # the frame changed since; show the depth beside a blank
                rgb = np.zeros_like(heat)
            tiles += [resize_square(rgb, size), resize_square(np.ascontiguousarray(heat), size)]
    save_png(path / PREVIEW, grid(tiles, cols=8))


def _init_distributed(world: int):
    """Under torchrun: join the process's group (training's later: NCCL for CUDA tensors, an ordinary timeout;
    :func:`pipeline.training.runtime.init_default_group`) and return a gloo group of every rank with a 48-hour
    timeout, for the one barrier before the merge. None for one process. The caller destroys that group after
    the barrier, so training never runs over it."""
    if world <= 1:
        return None
    import datetime

    import torch.distributed as dist

    from pipeline.training.runtime import init_default_group

    init_default_group()
    # Ranks finish their shards at different times; the barrier before the merge must outwait the slowest.
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=48))


def _refuse_concurrent_parts(path: Path, parts: int) -> None:
    """A plain run and a live ``--shard`` part must not write the same shards (and vice versa)."""
    names = [p.name for p in path.glob(f"{LOCK}.part*")] if parts == 1 else ([LOCK] if (path / LOCK).exists() else [])
    for name in names:
        probe = Lock(path / name)
        probe.acquire()  # raises LockError naming pid/host when that process is alive; breaks stale locks
        probe.release()


def _skipped_frames(path: Path) -> list[dict]:
    """The frames invalid in the finished cache, with the reason recorded when each was skipped.

    Records are written the moment a frame is skipped (before its shard is committed), so a run killed
    later keeps them; a shard rewritten on resume may record a frame twice: the last record wins, and
    only frames that really are invalid in the final cache are listed.
    """
    from pipeline.depth_cache import DepthCacheReader

    latest = {int(s["index"]): s for s in read_part_files(path, "skipped.part*.json")}
    with DepthCacheReader(path) as r:
        invalid = sorted(set(range(len(r))) - set(r.valid_indices().tolist()))
        return [latest.get(i, {"frame": r.frame_id(i), "index": i, "reason": "unreadable (reason not recorded)"})
                for i in invalid]


def _sum_stats(stats: list[dict]) -> dict:
    """The parts' (and resumed runs') compute stats as one: times and counts summed, settings (batch, workers,
    lane, what limited the run) as their one value, or the list of values where runs differed."""
    keys = ("frames", "seconds", "seconds_model", "seconds_waiting_for_data", "seconds_waiting_for_device",
            "seconds_waiting_for_writer", "seconds_writing", "fp32_fallbacks", "frames_with_holes", "batches",
            "fetches", "frames_after_first_batch", "seconds_after_first_batch", "seconds_encoding")
    out: dict = {k: round(sum(s.get(k, 0) for s in stats), 3) for k in keys}
    for k in ("batch_size", "num_workers", "lane", "in_flight", "limit", "encode_threads"):
        values = list(dict.fromkeys(s[k] for s in stats if k in s))
        if values:
            out[k] = values[0] if len(values) == 1 else values
    out["runs"] = len(stats)
    return out


