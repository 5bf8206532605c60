"""Frames into the depth model, a whole batch per DataLoader item.

The main process plans the batches once (:func:`plan_batches`: per shard, frames grouped by the network shape
their manifest size resizes to, in frame order, ``batch_size`` at a time); each DataLoader worker then reads,
decodes and (for MiDaS with ``depth.preprocess: cpu``) preprocesses one whole batch (:class:`BatchedFrames`)
and hands it back as one stacked tensor per network shape, which the DataLoader pins on CUDA. With
``prefetch_factor`` batches per worker, ``workers x prefetch_factor`` batches are in flight while the model runs.

With ``depth.preprocess: device`` the workers only read files (and decode what the device cannot): the JPEG
bytes are decoded on the model's device (nvJPEG on CUDA) and resized + normalised there (:func:`device_batch`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pipeline.errors import ManifestError


def keep_batch(x):
    return x


@dataclass(frozen=True)
class FrameBatch:
    """Manifest frames ``indices`` (in frame order) of shard ``shard`` (its index in the cache)."""

    shard: int
    indices: tuple[int, ...]


def plan_batches(m, plans: Sequence, batch_size: int, key_of: Callable[[int, int], Optional[tuple]]) -> list[FrameBatch]:
    """The batches of the shards ``plans`` (``ShardPlan``s, in order), never straddling a shard.

    Within a shard, frames are grouped by ``key_of(h, w)`` (the network input shape a frame of that manifest
    size resizes to; frames of unknown size (0) form their own group, which the worker splits by the shape it
    finds) in order of first appearance, then cut ``batch_size`` at a time. So a shard's batches, and hence its
    bytes, depend on the shard's frames only, not on which process (rank, ``--shard`` part) wrote it.
    """
    sizes = m.sizes  # (N, 2) (W, H)
    keys: dict[tuple[int, int], Optional[tuple]] = {}  # one key_of call per distinct frame size
    out: list[FrameBatch] = []
    for p in plans:
        groups: dict[Any, list[int]] = {}
        for i in range(p.start, p.stop):
            w, h = int(sizes[i, 0]), int(sizes[i, 1])
            if (h, w) not in keys:
                keys[(h, w)] = key_of(h, w) if h > 0 and w > 0 else None
            groups.setdefault(keys[(h, w)], []).append(i)
        for idx in groups.values():
            out += [FrameBatch(p.index, tuple(idx[s:s + batch_size])) for s in range(0, len(idx), batch_size)]
    return out


class BatchedFrames:
    """Item ``b``: batch ``batches[b]`` read (decoded, preprocessed) in a DataLoader worker.

    Returns ``{"batch": b, "shard", "errors": [(i, message)], "depths": [(i, (H, W) float32)] (files provider),
    "groups": [...]}``: one group per network input shape, ``{"key": (3, h_net, w_net), "i": [...],
    "hw": [(H, W), ...]}`` plus ``"x"``: (b, 3, h_net, w_net) float32 (``preprocess: cpu``) or ``"items"``:
    one ``{"jpeg": (n,) uint8 file bytes}`` (8-bit colour JPEG shown as stored: decoded on the device) or
    ``{"rgb": (H, W, 3) uint8}`` per frame, with ``"path"`` (``preprocess: device``).

    ``extra_work_s``: seconds each worker sleeps per batch on top of its real work: the data-side stand-in of
    ``dkp-pipeline bench depth-overlap`` (set on the class before the DataLoader forks its workers).
    """

    extra_work_s = 0.0

    def __init__(self, manifest, batches: Sequence[FrameBatch], *, midas_spec=None, depth_kind=None,
                 depth_scale: float = 1.0, preprocess: str = "cpu"):
        self.m, self.batches = manifest, list(batches)
        self.midas_spec, self.depth_kind, self.depth_scale = midas_spec, depth_kind, depth_scale
        self.on_device = midas_spec is not None and preprocess == "device"
        self.extra_work_s = type(self).extra_work_s  # travels with the dataset to spawned workers too

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, b: int) -> dict:
        import time

        import torch

        fb = self.batches[b]
        out: dict[str, Any] = {"batch": b, "shard": fb.shard, "errors": [], "depths": [], "groups": []}
        groups: dict[tuple, dict] = {}
        for i in fb.indices:
            try:
                item = self._frame(i)
            except ManifestError as e:  # raised (or recorded) in the main process, with its message intact
                out["errors"].append((i, str(e)))
                continue
            if "depth" in item:
                out["depths"].append((i, item["depth"]))
                continue
            g = groups.setdefault(item["key"], {"key": item["key"], "i": [], "hw": [], "x": [], "items": []})
            g["i"].append(i)
            g["hw"].append(item["hw"])
            if self.on_device:
                g["items"].append({k: item[k] for k in ("jpeg", "rgb", "path") if k in item})
            else:
                g["x"].append(item["x"])
        for g in groups.values():
            # frames of one original size next to each other (stable: frame order within a size), so the device
            # resizes each size's rows back as one slice
            order = sorted(range(len(g["i"])), key=lambda k: g["hw"][k])
            g["i"], g["hw"] = [g["i"][k] for k in order], [g["hw"][k] for k in order]
            if self.on_device:
                del g["x"]
                g["items"] = [g["items"][k] for k in order]
            else:
                del g["items"]
                g["x"] = torch.stack([g["x"][k] for k in order])  # (b, 3, h_net, w_net) float32, pinned as one
            out["groups"].append(g)
        if self.extra_work_s:
            time.sleep(self.extra_work_s)
        return out

    def _frame(self, i: int) -> dict:
        """Frame ``i`` decoded (and preprocessed): ``{"depth"}``, ``{"key", "hw", "x"}`` or, on the device path,
        ``{"key", "hw", "path", "jpeg" | "rgb"}``. Unusable frames raise ManifestError."""
        from pipeline.store.fingerprint import CHUNK
        from pipeline.data.images import (check_not_truncated, decode_rgb, exif_orientation, jpeg_header,
                                          read_depth_file, read_frame_bytes)
        from pipeline.data.video import is_video_frame, read_frame

        m = self.m
        path = m.path_of(i)
        video = is_video_frame(m, i)  # a frame of a video: decoded here on the CPU, by pipeline.data.video
        raw = None if video else read_frame_bytes(path)
        header = jpeg_header(raw) if self.on_device and not video else None
        # 8-bit colour JPEG shown as stored: the device decodes it (an EXIF-rotated one goes through decode_rgb,
        # which applies the orientation as read_rgb does everywhere else)
        if header is not None and header[2:] == (3, 8) and exif_orientation(raw[:CHUNK].tobytes()) == 1:
            check_not_truncated(path, raw)
            img, hw = None, header[:2]
        else:
            img = read_frame(m, i) if video else decode_rgb(path, raw)
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
            return {"depth": d}
        import torch

        from dkp_core.midas.transforms import preprocess_u8, target_size

        if hasattr(self.midas_spec, "preprocess"):  # depth.provider: transformers: the folder's processor (hf.py)
            x = self.midas_spec.preprocess(img)  # (3, h, w) float32 pixel_values
            return {"key": tuple(x.shape), "x": x, "hw": tuple(img.shape[:2])}
        if self.on_device:
            item = {"jpeg": torch.from_numpy(raw)} if img is None else {"rgb": torch.from_numpy(img)}
            return {"key": (3, *target_size(*hw, self.midas_spec)), "hw": tuple(hw), "path": str(path), **item}
        x = torch.from_numpy(preprocess_u8(img, self.midas_spec))  # (3, h_net, w_net)
        return {"key": tuple(x.shape), "x": x, "hw": tuple(img.shape[:2])}


def device_batch(items: list[dict], hws: list[tuple], spec, device) -> tuple[Any, list[int], list[tuple[int, str]]]:
    """``depth.preprocess: device``: decode the items' JPEG bytes on ``device`` (torchvision; nvJPEG on CUDA),
    move the CPU-decoded rest there, resize + normalise with torch ops (``preprocess_tensor``). ``hws``: each
    item's (H, W) from its header.

    Returns ``(x, kept, bad)``: x (b, 3, h_net, w_net) float32 on ``device``, row r for the item at position
    ``kept[r]`` (rows grouped by original size; x is None when none is kept), and ``(position, message)`` for each item nobody could decode (a JPEG the device
    cannot decode is decoded by OpenCV instead). Runs on whatever CUDA stream is current (the stage's copy-in
    stream), so the decode overlaps the previous batch's forward.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from dkp_core.midas.transforms import preprocess_tensor
    from pipeline.data.images import decode_rgb

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
    bad: list[tuple[int, str]] = []
    by_size: dict[tuple, list[tuple[int, Any]]] = {}  # (H, W) -> [(position, (3, H, W) uint8 on device)]
    for k, it in enumerate(items):
        img = decoded.get(k)
        if img is None:
            try:
                rgb = it["rgb"] if "rgb" in it else torch.from_numpy(decode_rgb(Path(it["path"]), it["jpeg"].numpy()))
            except ManifestError as e:
                bad.append((k, str(e)))
                continue
            img = rgb.to(device, non_blocking=True).permute(2, 0, 1)  # (3, H, W)
        if tuple(img.shape[1:]) != tuple(hws[k]):
            bad.append((k, f"frame {it['path']}: decoded as {img.shape[2]}x{img.shape[1]}, its header says "
                           f"{hws[k][1]}x{hws[k][0]}; re-extract it or pass --skip-bad-frames"))
            continue
        by_size.setdefault(tuple(img.shape[1:]), []).append((k, img))
    if not by_size:
        return None, [], bad
    # one resize call per original frame size; the rows come grouped by size (``kept`` says whose each is), so
    # no index tensor is built from a Python list (that would be a blocking host-to-device copy on CUDA)
    kept = [k for group in by_size.values() for k, _ in group]
    x = torch.cat([preprocess_tensor(torch.stack([img for _, img in group]), spec) for group in by_size.values()])
    return x, kept, bad
