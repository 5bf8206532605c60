"""Frames into the depth model: decoded (and, for MiDaS, preprocessed run.py-identically) in DataLoader
workers, or with ``depth.preprocess: device`` decoded and preprocessed on the model's device."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import ManifestError


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
        from pipeline.store.fingerprint import CHUNK
        from pipeline.data.images import (check_not_truncated, decode_rgb, exif_orientation, jpeg_header, read_depth_file,
                                     read_frame_bytes)
        from pipeline.data.video import is_video_frame, read_frame

        i = self.indices[j]
        m = self.m
        try:
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


def device_batch(items: list[dict], spec, device, bad) -> tuple[Any, list[dict]]:
    """``depth.preprocess: device``: decode the items' JPEG bytes on ``device`` (torchvision; nvJPEG on CUDA),
    move the CPU-decoded rest there, resize + normalise with torch ops (``preprocess_tensor``).

    Returns ``(x, kept)``: x (b, 3, h_net, w_net) float32 on ``device`` for the ``kept`` items, in order. A JPEG the
    device cannot decode is decoded by OpenCV instead; one nobody can decode goes to ``bad(i, message)``.
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


