"""The depth model and the loop that feeds it, pipelined.

DataLoader workers read, decode and preprocess whole batches (:mod:`.frames`; pinned on CUDA); the main thread
launches each batch on a lane (:mod:`.lanes`: copy in, forward + finiteness flags + resize back, copy out, each on
its own CUDA stream) and fetches it ``IN_FLIGHT`` batches later, its one host wait; the rows go to the background
HDF5 writer (:mod:`.writer`). So on a GPU the data side, the copies, the model and the writer all work at once,
and the stage runs at the pace of the slowest of them, which its record names (``limit``).
"""
from __future__ import annotations

import collections
import contextlib
import os
import time
from typing import Any, Optional

import numpy as np

from pipeline.data.workers import dies_with_this_process
from pipeline.errors import CheckpointError, ConfigError, ManifestError
from pipeline.stages.depth.frames import BatchedFrames, keep_batch, device_batch, plan_batches
from pipeline.stages.depth.lanes import lane_for
from pipeline.stages.depth.writer import BackgroundWriter, append_part_file, largest_frame

IN_FLIGHT = 2  # batches launched and not yet fetched: batch k computes while k-1 is copied back and k+1 copied in
PREFETCH = 2  # batches each DataLoader worker prepares ahead
CPU_BATCH, CPU_WORKERS = 8, 2  # the CPU defaults (the model needs the cores: few workers)
GPU_MAX_BATCH, GPU_MAX_WORKERS = 64, 16


def depth_device(d, local_rank: int = 0):
    """The torch device the depth model runs on (``depth.device``; cuda:``local_rank`` under torchrun)."""
    import torch

    if d.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("depth.device is 'cuda' but torch sees no CUDA device (torch.cuda.is_available() is "
                          "False); set depth.device: auto (runs on the CPU here) or cpu, or install a CUDA build "
                          "of torch")
    from pipeline.training import resolve_device

    return resolve_device(d.device, local_rank)


def load_model(d, weights_sha: Optional[str], local_rank: int = 0):
    """``(model, device, amp dtype or None)`` ready for inference, for the resolved depth config ``d`` (on
    cuda:``local_rank`` under torchrun: ``ctx.process.local_rank``)."""
    import torch

    from pipeline.weights.midas import load_midas

    device = depth_device(d, local_rank)
    if d.provider == "transformers":  # a Hugging Face folder (hf.py): same bundle, same loop
        from pipeline.stages.depth.hf import load_model as load_hf

        return load_hf(d, weights_sha, device)
    model, sha = load_midas(d.model_type, d.weights, device=device)
    if weights_sha and sha != weights_sha:
        raise CheckpointError(f"depth.weights {d.weights!r} changed while the stage started (sha256 {sha[:12]}…, "
                              f"planned {weights_sha[:12]}…); re-run")
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if d.compile:
        # One compiled graph per input shape (buckets; the last batch of each is padded to the full batch);
        # LeViT/Swin always see one shape.
        model = torch.compile(model)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[d.precision]
    if device.type == "cpu" and amp is not None:
        warn_cpu_precision(d.precision)
    return model, device, amp


def warn_cpu_precision(precision: str) -> None:
    """fp16 autocast on a CPU is emulated (issue 23 measured a training step 22x slower than fp32), bf16 is
    fast only with bf16 units: say so rather than crawl in silence."""
    import logging

    from pipeline.training.runtime import cpu_has_bf16

    if precision == "fp16" or not cpu_has_bf16():
        logging.getLogger("pipeline.depth").warning(
            f"depth.precision {precision} runs emulated on this CPU (no {precision} units): expect it many times "
            f"slower than fp32; --set depth.precision=fp32 (with depth.preprocess=cpu: the exact run.py path, "
            f"another cache key) is the CPU's fast setting")


def forward(bundle, x, amp):
    """(B, 3, h, w) normalised input on the model's device -> (B, h, w) float32 relative inverse depth, there.
    Nothing waits for the device: the result may still be being computed (CUDA)."""
    import torch

    model, device, _ = bundle
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        if amp is None:
            return model(x).float()
        with torch.autocast(device.type, dtype=amp):
            y = model(x)
        return y.float()


def choose_batch(*, free_bytes: int, fixed_bytes: int, per_frame_bytes: int, cap: int = GPU_MAX_BATCH,
                 headroom: float = 0.75) -> int:
    """The largest power of two ``b <= cap`` whose forward (``fixed + b * per_frame`` bytes, measured) fits in
    ``headroom`` of the free memory; 1 if even that does not."""
    room = free_bytes * headroom - fixed_bytes
    b = 1
    while b * 2 <= cap and (b * 2) * per_frame_bytes <= room:
        b *= 2
    return b


def auto_batch(bundle, shape: tuple, amp) -> int:
    """``depth.batch_size_inference: auto`` on CUDA: two probe forwards (batch 1 and 2) at ``shape`` (3, h, w)
    give the memory a frame costs, :func:`choose_batch` the batch that fits the free memory."""
    import torch

    model, device, _ = bundle
    bundle = (getattr(model, "_orig_mod", model), device, None)  # a compiled model would compile for each probe
    peaks = []
    for b in (1, 2):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        forward(bundle, torch.zeros((b, *shape), device=device), amp)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_frame = max(1, peaks[1] - peaks[0])
    free, _ = torch.cuda.mem_get_info(device)
    return choose_batch(free_bytes=free, fixed_bytes=max(0, peaks[0] - per_frame), per_frame_bytes=per_frame)


def auto_workers(cuda: bool) -> int:
    """``depth.num_workers: auto``: the cores this process may use but one (the main thread) on CUDA, at most
    ``GPU_MAX_WORKERS``; ``CPU_WORKERS`` on a CPU, where the model wants the cores."""
    if not cuda:
        return CPU_WORKERS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(GPU_MAX_WORKERS, cores - 1))


@contextlib.contextmanager
def _tf32(on: bool):
    """TF32 matmuls while the depth model runs (``depth.tf32``, fp32 on CUDA), the process's setting after."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = old or on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _progress(console, desc: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(desc), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeRemainingColumn(), console=console, transient=False, disable=not console.is_terminal)


class _Launched:
    """One group of one batch on the lane: its handles (kept alive until fetched: see lanes.py), frames, precision."""

    __slots__ = ("h_in", "h_compute", "h_out", "group", "amp")

    def __init__(self, h_in, h_compute, h_out, group, amp):
        self.h_in, self.h_compute, self.h_out, self.group, self.amp = h_in, h_compute, h_out, group, amp


def compute_part(ctx, cw, todo, skip_bad: bool, model, part: int, *, lane_kind: Optional[str] = None) -> dict:
    """Write the shards ``todo``; returns timing stats. Skipped frames go to ``skipped.part<part>.json``.

    ``lane_kind="threads"``: run the model on the GPU stand-in lane (benches and tests, :mod:`.lanes`)."""
    import torch
    from torch.utils.data import DataLoader

    from dkp_core.midas.transforms import postprocess, target_size

    m, d = ctx.plan.manifest, ctx.settings.config
    midas = d.provider in ("midas", "transformers")  # a model on a lane (the transformers provider too)
    invert = bool(getattr(model[0], "dkp_metric", False)) if midas else False  # metric depth: stored as 1 / d
    device = model[1] if midas else torch.device("cpu")
    cuda = device.type == "cuda"
    lane = lane_for(device, lane_kind) if midas else None
    workers = d.num_workers if d.num_workers is not None else auto_workers(cuda)
    if midas and d.provider == "transformers":
        from pipeline.stages.depth.hf import HFDepthSpec

        spec = HFDepthSpec(d.weights)
        key_of = spec.key
    elif midas:
        from dkp_core.midas import get_spec

        spec = get_spec(d.model_type)

        def key_of(h, w):
            return (3, *target_size(h, w, spec))
    if midas:

        batch = d.batch_size_inference or CPU_BATCH
        if d.batch_size_inference is None and cuda:
            shapes = {key_of(int(h), int(w)) for w, h in np.unique(m.sizes[m.sizes.min(1) > 0], axis=0)} or {
                (3, spec.net_h, spec.net_w)}
            batch = auto_batch(model, max(shapes, key=lambda s: s[1] * s[2]), model[2])
        batches = plan_batches(m, todo, batch, key_of)
        ds = BatchedFrames(m, batches, midas_spec=spec, preprocess=d.preprocess)
        desc = f"depth ({d.model_type if d.provider == 'midas' else d.weights})"
    else:
        opts = m.depth_options or {}
        kind = {"depth": "depth", "inverse_depth": "inverse", "inverse": "inverse"}.get(opts.get("kind"),
                                                                                        opts.get("kind"))
        batch = d.batch_size_inference or CPU_BATCH
        batches = plan_batches(m, todo, batch, lambda h, w: None)
        ds = BatchedFrames(m, batches, depth_kind=kind, depth_scale=float(opts.get("scale", 1.0)))
        desc = "depth (files)"
    plans = {p.index: p for p in todo}
    n_frames = sum(p.n for p in todo)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=keep_batch,
                        prefetch_factor=PREFETCH if workers else None, pin_memory=cuda,
                        worker_init_fn=dies_with_this_process() if workers else None)
    pad_to = batch if (midas and d.compile) else 0  # one compiled graph per shape: every batch full
    stats: dict[str, Any] = {"frames": n_frames, "batches": 0, "batch_size": batch, "num_workers": workers,
                             "lane": lane.name if lane else None, "in_flight": IN_FLIGHT, "seconds_model": 0.0,
                             "seconds_waiting_for_data": 0.0, "seconds_waiting_for_device": 0.0,
                             "fp32_fallbacks": 0, "frames_with_holes": 0}
    skipped: list[dict] = []
    t0 = time.perf_counter()
    done = 0
    writer = BackgroundWriter(cw)
    fifo: collections.deque = collections.deque()  # host ops and launched groups, in the order they happened
    n_launched = 0  # launched groups in `fifo`

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

    def add_depths(depths) -> None:
        nonlocal done
        for i, dep in depths:
            stats["frames_with_holes"] += bool(np.isnan(dep).any())
        writer.add([row(i, dep) for i, dep in depths])
        done += len(depths)

    def launch(group, amp, x_from=None) -> _Launched:
        """Queue copy in, forward and copy out of ``group`` (nothing here waits for the device)."""
        def copy_in():
            if x_from is not None:  # the fp32 redo of a launched group: its input is on the device already
                return lane.value(x_from)
            if ds.on_device:
                x, kept, bad_ = device_batch(group["items"], group["hw"], spec, device)
            else:
                x, kept, bad_ = group["x"].to(device, non_blocking=True), list(range(len(group["i"]))), []
            if x is not None and len(x) < pad_to:  # repeat the last frame: the compiled graph's batch
                x = torch.cat([x, x[-1:].expand(pad_to - len(x), *x.shape[1:])])
            return x, kept, bad_

        h_in = lane.run("in", copy_in)

        def compute():
            x, kept, _ = lane.value(h_in)
            if x is None:
                return None
            y = forward(model, x, amp)[:len(kept)]  # (b, h_net, w_net) float32
            ok = torch.isfinite(y).flatten(1).all(1)  # (b,) on the device: fetched with the output, never read here
            outs, a = [], 0
            hws = [group["hw"][k] for k in kept]
            while a < len(kept):  # rows of one frame size are contiguous (frames.py orders them): slices, no gather
                b = a
                while b < len(kept) and hws[b] == hws[a]:
                    b += 1
                o = postprocess(y[a:b], hws[a])  # (b - a, H, W) at the frames' size
                if invert:  # metric depth (transformers provider): inverse depth, holes where d <= 0
                    o = torch.where(o > 0, 1.0 / o.clamp_min(1e-12), torch.full_like(o, float("nan")))
                outs.append((a, b, o))
                a = b
            return outs, ok

        h_compute = lane.run("compute", compute, after=h_in)

        def copy_out():
            r = lane.value(h_compute)
            if r is None:
                return None
            outs, ok = r
            return [(a, b, o.to("cpu", non_blocking=True)) for a, b, o in outs], ok.to("cpu", non_blocking=True)

        return _Launched(h_in, h_compute, lane.run("out", copy_out, after=h_compute), group, amp)

    def finish(item: _Launched) -> None:
        """Fetch a launched group (the one host wait per batch) and queue its rows to the writer."""
        nonlocal done
        t = time.perf_counter()
        res = lane.fetch(item.h_out)
        stats["seconds_waiting_for_device"] += time.perf_counter() - t
        stats["seconds_model"] += lane.seconds(item.h_compute)
        x, kept, bad_ = lane.value(item.h_in)
        g = item.group
        for k, message in bad_:
            bad(g["i"][k], message)
        if res is None:
            return
        outs, ok = res
        if item.amp is not None and not ok.numpy().all():
            # fp16 overflow (Swin attention, the head): recompute this group in fp32, the rare case that waits
            stats["fp32_fallbacks"] += 1
            redo = launch(g, None, x_from=item.h_in)
            outs, ok = lane.fetch(redo.h_out)
            stats["seconds_model"] += lane.seconds(redo.h_compute)
        rows = []
        for a, b, o in outs:
            arr = o.numpy()  # (b - a, H, W) float32, host
            rows += [row(g["i"][kept[a + j]], arr[j]) for j in range(b - a)]
        writer.add(rows)
        done += len(rows)

    def settle(max_launched: int) -> None:
        """Run the host ops at the front of the FIFO and fetch launched groups until at most ``max_launched``
        are in flight. Host ops (open, commit, rows of the files provider, skipped frames) keep their place
        among the batches, so a shard is committed only after all its rows were added."""
        nonlocal n_launched
        while fifo and (not isinstance(fifo[0], _Launched) or n_launched > max_launched):
            entry = fifo.popleft()
            if isinstance(entry, _Launched):
                n_launched -= 1
                finish(entry)
            else:
                entry()

    current = None
    ok_run = False
    tf32 = _tf32(midas and d.tf32 and d.precision == "fp32" and cuda) if midas else contextlib.nullcontext()
    try:
        with tf32, _progress(ctx.console, desc) as bar:
            task = bar.add_task("depth", total=n_frames, rate="")
            it = iter(loader)
            while True:
                t = time.perf_counter()
                item = next(it, None)
                stats["seconds_waiting_for_data"] += time.perf_counter() - t
                if item is None:
                    break
                if not stats["batches"]:  # the pipeline is full from here: the steady rate counts from this point
                    t_first, first_frames = time.perf_counter(), sum(len(g["i"]) for g in item["groups"]) + len(
                        item["depths"]) + len(item["errors"])
                stats["batches"] += 1
                if item["shard"] != current:
                    # Batches never straddle shards, so a shard's bytes do not depend on which part wrote it.
                    plan = plans[item["shard"]]
                    if current is not None:
                        fifo.append(writer.commit)
                    fifo.append(lambda plan=plan: writer.open(plan, largest_frame(m, plan)))
                    current = item["shard"]
                for i, message in item["errors"]:
                    if not skip_bad:
                        bad(i, message)  # raises at once, naming the frame
                    else:
                        fifo.append(lambda i=i, message=message: bad(i, message))
                if item["depths"]:
                    fifo.append(lambda depths=item["depths"]: add_depths(depths))
                for g in item["groups"]:
                    fifo.append(launch(g, model[2]))
                    n_launched += 1
                settle(IN_FLIGHT)
                bar.update(task, completed=done, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.1f} frames/s")
            settle(0)
            if current is not None:
                writer.commit()
            bar.update(task, completed=done)
        ok_run = True
    finally:
        writer.close(abort=not ok_run)
        if lane is not None:
            lane.close()
    stats["fetches"] = lane.fetches if lane else 0
    t_end = time.perf_counter()
    stats.update(seconds=t_end - t0, seconds_waiting_for_writer=writer.seconds_blocked,
                 seconds_writing=writer.seconds_writing, seconds_encoding=writer.seconds_encoding,
                 encode_threads=writer.threads)
    if stats["batches"] > 1:  # workers started, the first batch read: what the stage sustains after that
        stats.update(frames_after_first_batch=n_frames - first_frames, seconds_after_first_batch=t_end - t_first)
    stats["limit"] = limit_of(stats)
    stats = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()}
    ctx.console.print(f"depth: {n_frames} frames in {stats['seconds']:.1f} s "
                      f"({n_frames / max(stats['seconds'], 1e-9):.1f} frames/s, batch {batch}, {workers} workers; "
                      f"model {stats['seconds_model']:.1f} s, waiting for data {stats['seconds_waiting_for_data']:.1f} "
                      f"s, for the device {stats['seconds_waiting_for_device']:.1f} s, for the writer "
                      f"{stats['seconds_waiting_for_writer']:.2f} s: limited by {stats['limit']})")
    if stats["fp32_fallbacks"]:
        ctx.console.print(f"note: {stats['fp32_fallbacks']} batch(es) had non-finite {d.precision} output and were "
                          f"recomputed in fp32")
    if skipped:
        ctx.console.print(f"{len(skipped)} unreadable frame(s) marked invalid (--skip-bad-frames)")
    if stats["frames_with_holes"]:
        ctx.console.print(f"note: {holes_note(stats['frames_with_holes'], n_frames)}")
    return stats


def limit_of(stats: dict) -> str:
    """What held the stage back: where the main thread waited longest (the data side, the device, the writer),
    or the host itself when it waited little (its own launches and hand-offs, or a model that runs on the host)."""
    waits = {"data": stats.get("seconds_waiting_for_data", 0.0), "device": stats.get("seconds_waiting_for_device", 0.0),
             "writer": stats.get("seconds_waiting_for_writer", 0.0)}
    name, longest = max(waits.items(), key=lambda kv: kv[1])
    if longest < 0.2 * stats.get("seconds", 0.0):
        return "the model on the host" if stats.get("lane") == "host" else "the host loop"
    return {"data": "the data side (workers)", "device": "the model (device)", "writer": "the writer"}[name]


def holes_note(n_holes: int, n_frames: int) -> str:
    return (f"{n_holes} of {n_frames} depth files have holes (pixels with no reading: 0, NaN or Inf); "
            "they are kept as holes, which the teacher's normalisation ignores (min-max over valid pixels, holes "
            "-> far)")
