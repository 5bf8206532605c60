"""Stage 1 `depth`: every frame of the manifest -> relative inverse depth in the HDF5 depth cache.

Providers:
- ``midas``: MiDaS 3.1 from the official checkpoint the user names; frames decoded and preprocessed
  (run.py-identical) in DataLoader workers, batched by resized shape, ``inference_mode``, autocast
  (bf16/fp16; a batch with non-finite fp16 output is recomputed in fp32 — Swin's and the head's known
  overflow), channels_last on CUDA, optional ``torch.compile``; with ``depth.preprocess: device`` JPEGs are
  decoded on the model's device (nvJPEG on CUDA) and every frame is resized + normalised there (float32 torch
  ops, :func:`_device_batch`), leaving the workers only file reads (and non-JPEG decodes);
- ``files``: depth maps named by a ``folder``/``synthetic`` manifest, converted to inverse depth.

Every HDF5 operation runs on one background writer thread (:class:`_BackgroundWriter`): the main thread
only decodes results and queues them, so compression and fsyncs overlap the next batch's inference.

The artifact directory *is* the cache directory (pipeline/depth_cache.py). A shard is the unit of
work and atomicity: a crash loses at most the shard being written. Distributed: under torchrun each
rank writes the shards it owns (index % world == rank) and rank 0 merges after a barrier; with
``--shard i/n`` a scheduler array does the same across machines, and the last part to finish (or a
plain re-run) merges and publishes.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.artifacts import LOCK, ArtifactWriter, Lock, write_atomic
from pipeline.errors import CheckpointError, ConfigError, LockError, ManifestError


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
        if d.preprocess != "cpu":  # absent for the run.py-identical default, so caches from before stay valid
            spec["preprocess"] = d.preprocess
    else:
        opts = manifest.depth_options or {}
        spec.update(depth_fingerprint=manifest.depth_fingerprint,
                    **{f"depth_options.{k}": v for k, v in sorted(opts.items())})
    return spec


def expected_spec(cfg, manifest) -> dict:
    """The spec a cache for ``cfg`` over ``manifest`` must have (weights hashed from the file named in cfg)."""
    sha = None
    if cfg.depth.provider == "midas":
        _check_midas_config(cfg)
        from pipeline.graph import file_digest

        sha = file_digest(cfg.depth.weights).split(":", 1)[-1]
    return cache_spec(cfg, manifest, sha)


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


def _check_midas_config(cfg) -> None:
    """Model type known, weights named and present: all checked before anything is written."""
    from dkp_core.midas import get_spec, list_models

    d = cfg.depth
    try:
        ms = get_spec(d.model_type)
    except ValueError:
        raise ConfigError(f"depth.model_type {d.model_type!r} is not a MiDaS 3.1 model; valid: "
                          f"{', '.join(list_models())}") from None
    where = f"the official checkpoint {ms.weights_file!r} (download: {ms.weights_url})"
    if not d.weights:
        raise ConfigError(f"depth.weights is not set: pass {where} with --set depth.weights=/path/to/{ms.weights_file}")
    if not Path(d.weights).expanduser().is_file():
        raise CheckpointError(f"depth.weights: MiDaS weights for {d.model_type} not found at {d.weights!r}; "
                              f"expected {where}")


def run_managed(ctx) -> bool:
    """Build (or resume) this process's part of the depth cache; merge and publish when every part is done.

    Returns True when the artifact is published (by this process), False when this process only wrote
    its part (``--shard i/n`` with parts left, or a torchrun rank other than 0): the runner then neither
    records the key as built nor says so.
    """
    from pipeline.depth_cache import CacheWriter, progress

    cfg, m, sp = ctx.cfg, ctx.plan.manifest, ctx.stage
    shard_i, shard_n = _parse_shard(ctx.options.get("shard"))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and shard_n > 1:
        raise ConfigError("use either torchrun or --shard i/n, not both")
    part, parts = (rank, world) if world > 1 else (shard_i, shard_n)
    path: Path = ctx.path
    skip_bad = bool(ctx.options.get("skip_bad_frames"))

    weights_sha = None
    if cfg.depth.provider == "midas":
        _check_midas_config(cfg)
        weights_sha = (sp.inputs["config"].get("weights_sha256") or "").split(":", 1)[-1]
    spec = cache_spec(cfg, m, weights_sha)

    dist_here = _init_distributed(world)
    try:
        model = None
        if cfg.depth.provider == "midas" and not (path / "layout.json").exists():
            # Load (and so check) the weights before the artifact directory exists: a wrong file leaves nothing.
            model = _load_model(cfg, weights_sha)
        path.mkdir(parents=True, exist_ok=True)
        lock_name = LOCK if parts == 1 else f"{LOCK}.part{part}of{parts}"
        with Lock(path / lock_name):
            _refuse_concurrent_parts(path, parts)
            writer = ArtifactWriter(stage="depth", key=sp.key, path=path, inputs=sp.inputs, config=sp.config)
            if part == 0:
                writer.write_record(status="in_progress")
            cw = CacheWriter(path, spec=spec, n_frames=len(m), shard_size=cfg.depth.shard_size,
                             storage_dtype=cfg.depth.storage_dtype)
            todo = cw.shards_todo(part, parts)
            if todo:
                if model is None and cfg.depth.provider == "midas":
                    model = _load_model(cfg, weights_sha)  # resuming: only when this part has shards left
                stats = _compute(ctx, cw, todo, skip_bad, model, part)
                _append_part_file(path, f"stats.part{part}.json", [stats])
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
            if rank != 0:
                return False
    finally:
        if dist_here:  # kept for the rest of the process (a later training stage reuses it)
            from pipeline.training.runtime import destroy_at_exit

            destroy_at_exit()
    return _merge_and_publish(ctx, spec, part, parts)


def _merge_and_publish(ctx, spec: dict, part: int, parts: int) -> bool:
    from pipeline.depth_cache import finalize, progress

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
        stats = _read_part_files(path, "stats.part*.json")
        w = ArtifactWriter(stage="depth", key=sp.key, path=path, inputs=sp.inputs, config=sp.config)
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
    from pipeline.images import read_rgb, resize_square
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
                rgb = read_rgb(m.path_of(int(i)))
            except ManifestError:  # the frame changed since; show the depth beside a blank
                rgb = np.zeros_like(heat)
            tiles += [resize_square(rgb, size), resize_square(np.ascontiguousarray(heat), size)]
    save_png(path / PREVIEW, grid(tiles, cols=8))


def _init_distributed(world: int) -> bool:
    """Join torchrun's process group (gloo: only a barrier is needed). True if initialised here."""
    if world <= 1:
        return False
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    # Ranks finish their shards at different times; the barrier before the merge must outwait the slowest.
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    return True


def _refuse_concurrent_parts(path: Path, parts: int) -> None:
    """A plain run and a live ``--shard`` part must not write the same shards (and vice versa)."""
    names = [p.name for p in path.glob(f"{LOCK}.part*")] if parts == 1 else ([LOCK] if (path / LOCK).exists() else [])
    for name in names:
        probe = Lock(path / name)
        probe.acquire()  # raises LockError naming pid/host when that process is alive; breaks stale locks
        probe.release()


def _append_part_file(path: Path, name: str, rows: list) -> None:
    if not rows:
        return
    f = path / name
    prev = json.loads(f.read_text()) if f.exists() else []
    write_atomic(f, json.dumps(prev + rows, indent=1))


def _read_part_files(path: Path, pattern: str) -> list:
    out: list = []
    for f in sorted(path.glob(pattern)):
        out += json.loads(f.read_text())
    return out


def _skipped_frames(path: Path) -> list[dict]:
    """The frames invalid in the finished cache, with the reason recorded when each was skipped.

    Records are written the moment a frame is skipped (before its shard is committed), so a run killed
    later keeps them; a shard rewritten on resume may record a frame twice: the last record wins, and
    only frames that really are invalid in the final cache are listed.
    """
    from pipeline.depth_cache import DepthCacheReader

    latest = {int(s["index"]): s for s in _read_part_files(path, "skipped.part*.json")}
    with DepthCacheReader(path) as r:
        invalid = sorted(set(range(len(r))) - set(r.valid_indices().tolist()))
        return [latest.get(i, {"frame": r.frame_id(i), "index": i, "reason": "unreadable (reason not recorded)"})
                for i in invalid]


def _sum_stats(stats: list[dict]) -> dict:
    keys = ("frames", "seconds", "seconds_model", "seconds_waiting_for_writer", "seconds_writing", "fp32_fallbacks",
            "frames_with_holes")
    out = {k: round(sum(s.get(k, 0) for s in stats), 3) for k in keys}
    out["runs"] = len(stats)
    return out


# ---------------------------------------------------------------------------------------------- writing
class _BackgroundWriter:
    """Runs every HDF5 operation of this process (open shard, add frames, commit) on one thread.

    The main thread queues work and returns at once unless ``max_pending`` messages are waiting (then it
    waits: the writer sets the pace only when it is the bottleneck). An error on the writer thread is
    re-raised in the main thread at its next call; leaving with an error aborts the open shard (its temp
    file is deleted, finished shards are untouched).
    """

    def __init__(self, cw, max_pending: int = 16) -> None:
        self.cw = cw
        self.q: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: Optional[BaseException] = None
        self.seconds_blocked = 0.0  # main thread waiting on a full queue
        self.seconds_writing = 0.0  # writer thread busy
        self.thread = threading.Thread(target=self._run, name="depth-cache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sw = None
        while True:
            op, arg = self.q.get()
            if op == "stop":
                if sw is not None:
                    sw.abort()
                return
            if self.error is not None:
                continue  # drain until stop
            t0 = time.perf_counter()
            try:
                if op == "open":
                    plan, max_shape = arg
                    sw = self.cw.open_shard(plan, max_shape=max_shape)
                elif op == "add":
                    for i, fid, fhash, depth, valid in arg:
                        sw.add(i, frame_id=fid, frame_hash=fhash, depth=depth, valid=valid)
                elif op == "commit":
                    s, sw = sw, None
                    s.__exit__(None, None, None)  # commit; on failure aborts and names disk errors
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                if sw is not None:
                    try:
                        sw.__exit__(type(e), e, e.__traceback__)  # abort; OSError -> CacheError
                    except BaseException as translated:  # noqa: BLE001
                        e = translated
                    sw = None
                self.error = e
            self.seconds_writing += time.perf_counter() - t0

    def _put(self, op: str, arg=None) -> None:
        self._raise()
        t0 = time.perf_counter()
        while True:
            try:
                self.q.put((op, arg), timeout=0.5)
                break
            except queue.Full:
                self._raise()
        self.seconds_blocked += time.perf_counter() - t0

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def open(self, plan, max_shape) -> None:
        self._put("open", (plan, max_shape))

    def add(self, rows: list[tuple]) -> None:
        self._put("add", rows)

    def commit(self) -> None:
        self._put("commit")

    def close(self, *, abort: bool) -> None:
        """Stop the thread after the queued work (``abort``: drop the open shard); re-raise a writer error."""
        self.q.put(("stop", None))
        self.thread.join()
        if not abort:
            self._raise()


def _max_shape(m, plan) -> Optional[tuple[int, int]]:
    """(H, W) of the largest frame of the shard from the manifest, so frames are written as they come."""
    wh = m.sizes[plan.start:plan.stop]  # (n, 2) (W, H)
    if len(wh) == 0 or (wh <= 0).any():
        return None  # unknown sizes: the shard writer buffers and sizes the file at commit
    return int(wh[:, 1].max()), int(wh[:, 0].max())


# ---------------------------------------------------------------------------------------------- reading frames
def _identity(x):
    return x


class _Frames:
    """Per frame, in DataLoader workers: decode (and, for MiDaS, preprocess) or an error record.

    Items: ``{"i", "key", "x": (3, h_net, w_net) float32 tensor, "hw"}`` (midas), with ``preprocess="device"``
    ``{"i", "key", "hw", "path", "jpeg": (n,) uint8 file bytes}`` for 8-bit colour JPEGs (decoded later on the
    device) or ``{"i", "key", "hw", "path", "rgb": (H, W, 3) uint8}`` for the rest; ``{"i", "depth": (H, W)}`` (files) or
    ``{"i", "error": message}`` for a frame that cannot be used. ``key`` is the batch bucket: (3, h_net, w_net).
    """

    def __init__(self, manifest, indices, *, midas_spec=None, depth_kind=None, depth_scale: float = 1.0,
                 preprocess: str = "cpu"):
        self.m, self.indices = manifest, list(indices)
        self.midas_spec, self.depth_kind, self.depth_scale = midas_spec, depth_kind, depth_scale
        self.on_device = midas_spec is not None and preprocess == "device"

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        from pipeline.fingerprint import CHUNK
        from pipeline.images import (check_not_truncated, decode_rgb, exif_orientation, jpeg_header, read_depth_file,
                                     read_frame_bytes)

        i = self.indices[j]
        m = self.m
        try:
            path = m.path_of(i)
            raw = read_frame_bytes(path)
            header = jpeg_header(raw) if self.on_device else None
            # 8-bit colour JPEG shown as stored: the device decodes it (an EXIF-rotated one goes through decode_rgb,
            # which applies the orientation as read_rgb does everywhere else)
            if header is not None and header[2:] == (3, 8) and exif_orientation(raw[:CHUNK].tobytes()) == 1:
                check_not_truncated(path, raw)
                img, hw = None, header[:2]
            else:
                img = decode_rgb(path, raw)
                hw = img.shape[:2]
            w, h = (int(v) for v in m.sizes[i])  # manifest sizes are (W, H)
            if w > 0 and h > 0 and tuple(hw) != (h, w):
                raise ManifestError(f"frame {path}: decoded as {hw[1]}x{hw[0]} but the "
                                    f"manifest says {w}x{h} (file changed since the manifest was built?)")
            if self.midas_spec is None:
                d = read_depth_file(m.root / m.depth_paths[i], kind=self.depth_kind, scale=self.depth_scale)
                if d.shape != img.shape[:2]:
                    raise ManifestError(f"depth file {m.root / m.depth_paths[i]}: shape {d.shape} but frame "
                                        f"{m.paths[i]} is {img.shape[0]}x{img.shape[1]}; depth must match its frame")
                return {"i": i, "depth": d}
        except ManifestError as e:  # raised (or recorded) in the main process, with its message intact
            return {"i": i, "error": str(e)}
        import torch

        from dkp_core.midas.transforms import preprocess_u8, target_size

        if self.on_device:
            item = {"jpeg": torch.from_numpy(raw)} if img is None else {"rgb": torch.from_numpy(img)}
            return {"i": i, "key": (3, *target_size(*hw, self.midas_spec)), "hw": tuple(hw), "path": str(path), **item}
        x = torch.from_numpy(preprocess_u8(img, self.midas_spec))  # (3, h_net, w_net)
        return {"i": i, "key": tuple(x.shape), "x": x, "hw": img.shape[:2]}


def _device_batch(items: list[dict], spec, device, bad) -> tuple[Any, list[dict]]:
    """``depth.preprocess: device``: decode the items' JPEG bytes on ``device`` (torchvision; nvJPEG on CUDA),
    move the CPU-decoded rest there, resize + normalise with torch ops (``preprocess_tensor``).

    Returns ``(x, kept)``: x (b, 3, h_net, w_net) float32 on ``device`` for the ``kept`` items, in order. A JPEG the
    device cannot decode is decoded by OpenCV instead; one nobody can decode goes to ``bad(i, message)``.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from dkp_core.midas.transforms import preprocess_tensor
    from pipeline.images import decode_rgb

    jpegs = [k for k, it in enumerate(items) if "jpeg" in it]
    decoded: dict[int, Any] = {}  # item position -> (3, H, W) uint8 on device
    if jpegs:
        try:  # one batched call (torchvision >= 0.19 decodes a list on CUDA in one go)
            decoded = dict(zip(jpegs, decode_jpeg([items[k]["jpeg"] for k in jpegs], mode=ImageReadMode.RGB,
                                                  device=device)))
        except (RuntimeError, TypeError, ValueError):  # one bad file fails the whole call: retry one by one
            for k in jpegs:
                try:
                    decoded[k] = decode_jpeg(items[k]["jpeg"], mode=ImageReadMode.RGB, device=device)
                except (RuntimeError, ValueError):
                    pass
    kept, by_size = [], {}
    for k, it in enumerate(items):
        img = decoded.get(k)
        if img is None:
            try:
                rgb = it["rgb"] if "rgb" in it else torch.from_numpy(decode_rgb(Path(it["path"]), it["jpeg"].numpy()))
            except ManifestError as e:
                bad(it["i"], str(e))
                continue
            img = rgb.to(device, non_blocking=True).permute(2, 0, 1)  # (3, H, W)
        if tuple(img.shape[1:]) != tuple(it["hw"]):
            bad(it["i"], f"frame {it['path']}: decoded as {img.shape[2]}x{img.shape[1]}, its header says "
                         f"{it['hw'][1]}x{it['hw'][0]}; re-extract it or pass --skip-bad-frames")
            continue
        by_size.setdefault(tuple(img.shape[1:]), []).append(len(kept))
        kept.append((it, img))
    if not kept:
        return None, []
    x = torch.empty((len(kept), 3, *items[0]["key"][1:]), dtype=torch.float32, device=device)
    for ks in by_size.values():  # one resize call per original frame size
        x[ks] = preprocess_tensor(torch.stack([kept[k][1] for k in ks]), spec)
    return x, [it for it, _ in kept]


# ---------------------------------------------------------------------------------------------- compute
def _load_model(cfg, weights_sha: Optional[str]):
    """``(model, device, amp dtype or None)`` ready for inference."""
    import torch

    from pipeline.midas_weights import load_midas
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

    cfg, m = ctx.cfg, ctx.plan.manifest
    d = cfg.depth
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
        _append_part_file(ctx.path, f"skipped.part{part}.json", [rec])
        writer.add([row(i, None, valid=False)])
        done += 1

    def flush(key) -> None:
        nonlocal done
        items = buckets.pop(key)
        if ds.on_device:
            x, items = _device_batch(items, ds.midas_spec, model[1], bad)  # (B, 3, h_net, w_net) on device
            if not items:
                return
        else:
            x = torch.stack([it["x"] for it in items])  # (B, 3, h_net, w_net)
        y = _infer(model, x, stats)  # (B, h_net, w_net) on device
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


def _infer(model_bundle, x, stats: dict):
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
