"""The depth model and the loop that feeds it: batches by resized shape, autocast with an fp32 fallback, one
shard at a time into the background writer."""
from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np

from pipeline.errors import CheckpointError, ManifestError
from pipeline.stages.depth.frames import device_batch, _Frames, _identity
from pipeline.stages.depth.writer import _BackgroundWriter, _max_shape, append_part_file


def load_model(cfg, weights_sha: Optional[str]):
    """``(model, device, amp dtype or None)`` ready for inference."""
    import torch

    from pipeline.weights.midas import load_midas
    from pipeline.training import resolve_device

    d = cfg.depth
    device = resolve_device(d.device, int(os.environ.get("LOCAL_RANK", 0)))
    model, sha = load_midas(d.model_type, d.weights, device=device)
    if weights_sha and sha != weights_sha:
        raise CheckpointError(f"depth.weights {d.weights!r} changed while the stage started (sha256 {sha[:12]}…, "
                              f"planned {weights_sha[:12]}…); re-run")
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if d.compile:
        # One compiled graph per input shape (buckets); LeViT/Swin always see one shape.
        model = torch.compile(model)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[d.precision]
    return model, device, amp


def _progress(console, desc: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(desc), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeRemainingColumn(), console=console, transient=False, disable=not console.is_terminal)


def _compute(ctx, cw, todo, skip_bad: bool, model, part: int) -> dict:
    """Write the shards ``todo``; returns timing stats. Skipped frames go to ``skipped.part<part>.json``."""
    import torch
    from torch.utils.data import DataLoader

    m, d = ctx.plan.manifest, ctx.settings.config
    if d.provider == "midas":
        from dkp_core.midas import get_spec

        ds = _Frames(m, [i for p in todo for i in range(p.start, p.stop)], midas_spec=get_spec(d.model_type),
                     preprocess=d.preprocess)
        desc = f"depth ({d.model_type})"
    else:
        opts = m.depth_options or {}
        kind = {"depth": "depth", "inverse_depth": "inverse", "inverse": "inverse"}.get(opts.get("kind"),
                                                                                        opts.get("kind"))
        ds = _Frames(m, [i for p in todo for i in range(p.start, p.stop)], depth_kind=kind,
                     depth_scale=float(opts.get("scale", 1.0)))
        desc = "depth (files)"
    plan_of = {i: p for p in todo for i in range(p.start, p.stop)}
    n_frames = len(ds)
    loader = DataLoader(ds, batch_size=None, num_workers=d.num_workers, collate_fn=_identity,
                        prefetch_factor=4 if d.num_workers else None)
    stats = {"frames": n_frames, "seconds_model": 0.0, "fp32_fallbacks": 0, "frames_with_holes": 0}
    skipped: list[dict] = []
    buckets: dict[tuple, list[dict]] = {}
    t0 = time.perf_counter()
    done = 0
    writer = _BackgroundWriter(cw)

    def row(i, depth, valid=True):
        return (i, m.frame_ids[i], m.fingerprints[i], depth, valid)

    def bad(i, message: str) -> None:
        """Frame ``i`` cannot be used: stop, or (``--skip-bad-frames``) record it and store it as invalid."""
        nonlocal done
        if not skip_bad:
            raise ManifestError(f"{message} [frame {m.frame_ids[i]!r}, index {i}]")
        rec = {"frame": m.frame_ids[i], "index": int(i), "reason": message}
        skipped.append(rec)
        append_part_file(ctx.path, f"skipped.part{part}.json", [rec])
        writer.add([row(i, None, valid=False)])
        done += 1

    def flush(key) -> None:
        nonlocal done
        items = buckets.pop(key)
        if ds.on_device:
            x, items = device_batch(items, ds.midas_spec, model[1], bad)  # (B, 3, h_net, w_net) on device
            if not items:
                return
        else:
            x = torch.stack([it["x"] for it in items])  # (B, 3, h_net, w_net)
        y = infer(model, x, stats)  # (B, h_net, w_net) on device
        rows = []
        by_size: dict[tuple, list[int]] = {}
        for k, it in enumerate(items):
            by_size.setdefault(tuple(it["hw"]), []).append(k)
        from dkp_core.midas.transforms import postprocess

        for hw, ks in by_size.items():
            out = postprocess(y[ks], hw).float().cpu().numpy()  # (b, H, W) at the frames' size
            rows += [(ks[j], out[j]) for j in range(len(ks))]
        writer.add([row(items[k]["i"], dep) for k, dep in sorted(rows, key=lambda r: r[0])])
        done += len(items)

    current = None
    ok = False
    try:
        with _progress(ctx.console, desc) as bar:
            task = bar.add_task("depth", total=n_frames, rate="")
            for it in loader:
                i = it["i"]
                plan = plan_of[i]
                if plan is not current:
                    # Batches never straddle shards, so a shard's bytes do not depend on which part wrote it.
                    for key in list(buckets):
                        flush(key)
                    if current is not None:
                        writer.commit()
                    writer.open(plan, _max_shape(m, plan))
                    current = plan
                if "error" in it:
                    bad(i, it["error"])
                elif "depth" in it:
                    stats["frames_with_holes"] += bool(np.isnan(it["depth"]).any())
                    writer.add([row(i, it["depth"])])
                    done += 1
                else:
                    key = it["key"]
                    buckets.setdefault(key, []).append(it)
                    if len(buckets[key]) >= d.batch_size_inference:
                        flush(key)
                    elif sum(map(len, buckets.values())) >= 4 * d.batch_size_inference:
                        # Many sizes in one shard: bound the frames held back (a function of the shard's
                        # frame order only, so still the same batches in every part).
                        flush(max(buckets, key=lambda k: len(buckets[k])))
                bar.update(task, completed=done, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.1f} frames/s")
            for key in list(buckets):
                flush(key)
            if current is not None:
                writer.commit()
            bar.update(task, completed=done)
        ok = True
    finally:
        writer.close(abort=not ok)
    stats.update(seconds=time.perf_counter() - t0, seconds_waiting_for_writer=writer.seconds_blocked,
                 seconds_writing=writer.seconds_writing)
    stats = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()}
    ctx.console.print(f"depth: {n_frames} frames in {stats['seconds']:.1f} s "
                      f"({n_frames / max(stats['seconds'], 1e-9):.1f} frames/s; model {stats['seconds_model']:.1f} s, "
                      f"waiting for the writer {stats['seconds_waiting_for_writer']:.2f} s)")
    if stats["fp32_fallbacks"]:
        ctx.console.print(f"note: {stats['fp32_fallbacks']} batch(es) had non-finite {d.precision} output and were "
                          f"recomputed in fp32")
    if skipped:
        ctx.console.print(f"{len(skipped)} unreadable frame(s) marked invalid (--skip-bad-frames)")
    if stats["frames_with_holes"]:
        ctx.console.print(f"note: {holes_note(stats['frames_with_holes'], n_frames)}")
    return stats


def holes_note(n_holes: int, n_frames: int) -> str:
    return (f"{n_holes} of {n_frames} depth files have holes (pixels with no reading: 0, NaN or Inf); "
            "they are kept as holes, which the teacher's normalisation ignores (min-max over valid pixels, holes "
            "-> far)")


def infer(model_bundle, x, stats: dict):
    """(B, 3, h, w) normalised input -> (B, h, w) float32 relative inverse depth on the model's device.

    Under fp16/bf16 autocast, a batch with any non-finite output (fp16 overflow in Swin attention or the
    head) is recomputed in fp32, and counted in ``stats['fp32_fallbacks']``.
    """
    import torch

    model, device, amp = model_bundle
    t0 = time.perf_counter()
    x = x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        if amp is None:
            y = model(x).float()
        else:
            with torch.autocast(device.type, dtype=amp):
                y = model(x)
            y = y.float()
            if not bool(torch.isfinite(y).all()):
                stats["fp32_fallbacks"] += 1
                y = model(x).float()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    stats["seconds_model"] += time.perf_counter() - t0
    return y

