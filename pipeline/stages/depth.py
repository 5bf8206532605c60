"""Stage 1 `depth`: every frame of the manifest -> relative inverse depth in the HDF5 depth cache.

Providers:
- ``midas``: MiDaS 3.1 from the official checkpoint the user names; frames decoded and preprocessed
  (run.py-identical) in DataLoader workers, batched by resized shape, ``inference_mode``, autocast on
  CUDA (bf16/fp16; a batch with non-finite fp16 output is recomputed in fp32 — Swin's known overflow);
- ``files``: depth maps named by a ``folder``/``synthetic`` manifest, converted to inverse depth.

The artifact directory *is* the cache directory (pipeline/depth_cache.py). A shard is the unit of
work and atomicity: a crash loses at most the shard being written. Distributed: under torchrun each
rank writes the shards it owns (index % world == rank); with ``--shard i/n`` a scheduler array does the
same across machines, and the last finisher (or a plain re-run) merges and publishes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.artifacts import Lock, RECORD, ArtifactWriter, write_atomic
from pipeline.errors import ConfigError, DkpError, ManifestError

STORAGE = {"float16": "float16", "float32": "float32"}


def cache_spec(ctx_cfg, manifest, weights_sha256: Optional[str]) -> dict:
    """Everything that determines the cached values (stored in the cache, checked on reuse/import)."""
    d = ctx_cfg.depth
    spec: dict[str, Any] = {"provider": d.provider, "manifest_fingerprint": manifest.fingerprint,
                            "storage_dtype": d.storage_dtype}
    if d.provider == "midas":
        from dkp_core.midas import get_spec

        ms = get_spec(d.model_type)
        spec.update(model_type=d.model_type, weights_sha256=weights_sha256, precision=d.precision,
                    net_w=ms.net_w, net_h=ms.net_h, resize_mode=ms.resize_mode,
                    ensure_multiple_of=ms.ensure_multiple_of, interpolation=ms.interpolation,
                    mean=list(ms.mean), std=list(ms.std), output_resize="bicubic to frame size")
    else:
        opts = manifest.depth_options or {}
        spec.update(depth_fingerprint=manifest.depth_fingerprint,
                    **{f"depth_options.{k}": v for k, v in sorted(opts.items())})
    return spec


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


def run_managed(ctx) -> None:
    from pipeline.depth_cache import CacheWriter, finalize

    cfg, m, sp = ctx.cfg, ctx.plan.manifest, ctx.stage
    shard_i, shard_n = _parse_shard(ctx.options.get("shard"))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and shard_n > 1:
        raise ConfigError("use either torchrun or --shard i/n, not both")
    part, parts = (rank, world) if world > 1 else (shard_i, shard_n)
    path = ctx.path
    path.mkdir(parents=True, exist_ok=True)
    skip_bad = bool(ctx.options.get("skip_bad_frames"))

    weights_sha = sp.inputs["config"].get("weights_sha256")
    if cfg.depth.provider == "midas":
        if not cfg.depth.weights:
            from dkp_core.midas import get_spec, list_models

            try:
                ms = get_spec(cfg.depth.model_type)
            except ValueError:
                raise ConfigError(f"depth.model_type {cfg.depth.model_type!r} is not a MiDaS 3.1 model; valid: "
                                  f"{', '.join(list_models())}") from None
            raise ConfigError(f"depth.weights is not set: pass the official checkpoint for {cfg.depth.model_type} "
                              f"with --set depth.weights=/path/to/{ms.weights_file} (download: {ms.weights_url})")
        weights_sha = weights_sha.split(":", 1)[-1] if weights_sha else None
    spec = cache_spec(cfg, m, weights_sha)

    lock_name = "LOCK" if parts == 1 else f"LOCK.part{part}of{parts}"
    with Lock(path / lock_name):
        writer = ArtifactWriter(stage="depth", key=sp.key, path=path, inputs=sp.inputs, config=sp.config)
        if part == 0:
            writer.write_record(status="in_progress")
        cw = CacheWriter(path, spec=spec, n_frames=len(m), shard_size=cfg.depth.shard_size,
                         storage_dtype=cfg.depth.storage_dtype)
        todo = cw.shards_todo(part, parts)
        skipped = _compute(ctx, cw, todo, skip_bad, part)
        if skipped:
            _record_skipped(path, part, skipped)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()
        if rank != 0:
            return
    from pipeline.depth_cache import progress

    done, total = progress(path)
    if done < total:
        ctx.console.print(f"depth part {part}/{parts} finished; {total - done} of {total} frames belong to other "
                          f"parts. When all parts are done, re-run without --shard to merge and publish.")
        raise DkpError("depth cache incomplete: waiting for the other --shard parts (this part is saved)")
    with Lock(path / "LOCK"):
        if (path / "COMPLETE").exists():
            return
        index = finalize(path)
        skipped_all = _read_skipped(path)
        w = ArtifactWriter(stage="depth", key=sp.key, path=path, inputs=sp.inputs, config=sp.config)
        w.publish(n_frames=len(m), cache_spec=spec, skipped_frames=skipped_all,
                  n_shards=len(index.get("shards", [])) if isinstance(index, dict) else None)


def _record_skipped(path: Path, part: int, skipped: list[dict]) -> None:
    import json

    f = path / f"skipped.part{part}.json"
    prev = json.loads(f.read_text()) if f.exists() else []
    write_atomic(f, json.dumps(prev + skipped, indent=1))


def _read_skipped(path: Path) -> list[dict]:
    import json

    out: list[dict] = []
    for f in sorted(path.glob("skipped.part*.json")):
        out += json.loads(f.read_text())
    return out


def _progress(console, total: int, desc: str):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn)

    return Progress(TextColumn(desc), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeRemainingColumn(), console=console, transient=False, disable=not console.is_terminal)


def _compute(ctx, cw, todo, skip_bad: bool, part: int) -> list[dict]:
    n_frames = sum(p.n for p in todo)
    if not todo:
        return []
    if ctx.cfg.depth.provider == "files":
        return _compute_files(ctx, cw, todo, skip_bad, n_frames)
    return _compute_midas(ctx, cw, todo, skip_bad, n_frames)


def _compute_files(ctx, cw, todo, skip_bad, n_frames) -> list[dict]:
    import time

    from pipeline.images import read_depth_file

    m = ctx.plan.manifest
    opts = m.depth_options or {}
    kind = {"depth": "depth", "inverse_depth": "inverse", "inverse": "inverse"}.get(opts.get("kind"), opts.get("kind"))
    skipped: list[dict] = []
    t0 = time.time()
    done = 0
    with _progress(ctx.console, n_frames, "depth (files)") as bar:
        task = bar.add_task("depth", total=n_frames, rate="")
        for plan in todo:
            with cw.open_shard(plan) as sw:
                for i in range(plan.start, plan.stop):
                    rel = m.depth_paths[i]
                    try:
                        d = read_depth_file(m.root / rel, kind=kind, scale=float(opts.get("scale", 1.0)))
                        w, h = (int(v) for v in m.sizes[i])
                        if d.shape != (h, w):
                            raise ManifestError(f"depth file {m.root / rel}: shape {d.shape} but frame "
                                                f"{m.paths[i]} is {h}x{w}; depth must match its frame")
                        sw.add(i, frame_id=m.frame_ids[i], frame_hash=m.fingerprints[i], depth=d, valid=True)
                    except ManifestError as e:
                        if not skip_bad:
                            raise
                        skipped.append({"frame": m.frame_ids[i], "reason": str(e)})
                        sw.add(i, frame_id=m.frame_ids[i], frame_hash=m.fingerprints[i], depth=None, valid=False)
                    done += 1
                    bar.update(task, advance=1, rate=f"{done / max(time.time() - t0, 1e-9):.0f} frames/s")
    return skipped


def _identity(x):
    return x


class _MidasFrames:
    """Decode + run.py preprocessing in DataLoader workers; a bad frame becomes an error record."""

    def __init__(self, manifest, indices, spec, skip_bad: bool):
        self.m, self.indices, self.spec, self.skip_bad = manifest, list(indices), spec, skip_bad

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        from dkp_core.midas import preprocess

        from pipeline.images import read_rgb

        i = self.indices[j]
        try:
            img = read_rgb(self.m.path_of(i))
        except ManifestError as e:  # raised (or recorded) in the main process, with its message intact
            return {"i": i, "error": str(e)}
        x = preprocess(img.astype(np.float32) / 255.0, self.spec)  # (3, h_net, w_net)
        return {"i": i, "x": x, "hw": img.shape[:2]}


def _compute_midas(ctx, cw, todo, skip_bad, n_frames) -> list[dict]:
    import time

    import torch
    from torch.utils.data import DataLoader

    from dkp_core.midas import get_spec, postprocess
    from pipeline.midas_weights import load_midas
    from pipeline.train import resolve_device

    d = ctx.cfg.depth
    device = resolve_device(d.device, int(os.environ.get("LOCAL_RANK", 0)))
    model, _sha = load_midas(d.model_type, d.weights, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if d.compile:
        model = torch.compile(model, dynamic=True)
    spec = get_spec(d.model_type)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[d.precision] if device.type == "cuda" else None
    m = ctx.plan.manifest
    skipped: list[dict] = []
    fallbacks = 0
    t0, done = time.time(), 0

    def infer(xs: list[np.ndarray]) -> torch.Tensor:
        nonlocal fallbacks
        x = torch.from_numpy(np.stack(xs)).to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if amp is not None:
                with torch.autocast(device.type, dtype=amp):
                    y = model(x).float()
                if not torch.isfinite(y).all():  # fp16 overflow (Swin/head): redo this batch in fp32
                    fallbacks += 1
                    y = model(x).float()
            else:
                y = model(x)
        return y  # (B, h_net, w_net)

    with _progress(ctx.console, n_frames, f"depth ({d.model_type})") as bar:
        task = bar.add_task("depth", total=n_frames, rate="")
        for plan in todo:
            ds = _MidasFrames(m, range(plan.start, plan.stop), spec, skip_bad)
            loader = DataLoader(ds, batch_size=None, num_workers=d.num_workers, collate_fn=_identity,
                                prefetch_factor=4 if d.num_workers else None)
            buckets: dict[tuple, list[dict]] = {}
            with cw.open_shard(plan) as sw:
                def flush(key):
                    nonlocal done
                    items = buckets.pop(key)
                    y = infer([it["x"] for it in items])
                    for it, pred in zip(items, y):
                        out = postprocess(pred[None], it["hw"])[0].float().cpu().numpy()
                        sw.add(it["i"], frame_id=m.frame_ids[it["i"]], frame_hash=m.fingerprints[it["i"]],
                               depth=out, valid=True)
                    done += len(items)
                    bar.update(task, advance=len(items),
                               rate=f"{done / max(time.time() - t0, 1e-9):.1f} frames/s")

                for it in loader:
                    if "error" in it:
                        if not skip_bad:
                            raise ManifestError(it["error"])
                        skipped.append({"frame": m.frame_ids[it["i"]], "reason": it["error"]})
                        sw.add(it["i"], frame_id=m.frame_ids[it["i"]], frame_hash=m.fingerprints[it["i"]],
                               depth=None, valid=False)
                        done += 1
                        continue
                    key = tuple(it["x"].shape)
                    buckets.setdefault(key, []).append(it)
                    if len(buckets[key]) >= d.batch_size_inference:
                        flush(key)
                for key in list(buckets):
                    flush(key)
    if fallbacks:
        ctx.console.print(f"note: {fallbacks} batch(es) had non-finite {d.precision} output and were recomputed in fp32")
    return skipped
