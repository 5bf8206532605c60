"""run.py-identical preprocessing and postprocessing for the MiDaS 3.1 DPT models.

``run.py`` does: ``utils.read_image`` (BGR -> RGB, / 255 -> float64 in [0, 1]), then
``Resize(net_w, net_h, keep_aspect_ratio, ensure_multiple_of=32, resize_method="minimal",
cv2.INTER_CUBIC)``, ``NormalizeImage(mean, std)``, ``PrepareForNet`` (HWC -> CHW float32);
after the network, bicubic (align_corners=False) back to the original size.
Facts: research/midas.md §1.3. Reading and decoding files is the caller's job.
"""
from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .registry import MidasSpec

_CV2_INTERP = {"cv2.INTER_CUBIC": cv2.INTER_CUBIC, "cv2.INTER_LINEAR": cv2.INTER_LINEAR,
               "cv2.INTER_AREA": cv2.INTER_AREA}


def _constrain_to_multiple_of(x: float, multiple: int) -> int:
    # np.round, i.e. round-half-to-even, exactly as MiDaS's Resize (no min/max bound in "minimal").
    return int(np.round(x / multiple) * multiple)


def target_size(h: int, w: int, spec: MidasSpec) -> Tuple[int, int]:
    """(h_net, w_net) that run.py resizes an h x w image to for ``spec``.

    ``keep_aspect_ratio``: both sides use the one scale (net_h / h or net_w / w) that is closer
    to 1, then each side is rounded to a multiple of ``ensure_multiple_of``. Otherwise each side
    is scaled to net_h / net_w independently (square models).
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    if spec.resize_method != "minimal":
        raise ValueError(f"{spec.model_type}: only run.py's 'minimal' resize is implemented, "
                         f"spec says {spec.resize_method!r}")
    scale_h = spec.net_h / h
    scale_w = spec.net_w / w
    if spec.keep_aspect_ratio:
        if abs(1 - scale_w) < abs(1 - scale_h):
            scale_h = scale_w
        else:
            scale_w = scale_h
    m = spec.ensure_multiple_of
    return _constrain_to_multiple_of(scale_h * h, m), _constrain_to_multiple_of(scale_w * w, m)


def preprocess(image_rgb_float01: np.ndarray, spec: MidasSpec) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1] -> (3, h_net, w_net) float32 network input (normalised).

    Computed in float64 like run.py (cv2 cubic, no antialias, no clipping of the overshoot),
    cast to float32 last.
    """
    img = np.asarray(image_rgb_float01)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"expected a float image in [0, 1], got dtype {img.dtype} (divide uint8 by 255)")
    return _resize_normalise(img.astype(np.float64, copy=False), spec)


# uint8 -> float32(v / 255) widened to float64: the values ``u8.astype(np.float32) / 255.0`` gives the resize
_U8_TO_FLOAT = (np.arange(256, dtype=np.float32) / np.float32(255)).astype(np.float64)


def preprocess_u8(image_rgb_u8: np.ndarray, spec: MidasSpec) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, h_net, w_net) float32: bit for bit ``preprocess(image.astype(np.float32) / 255.0)``
    (the depth stage's CPU path), with two fewer full-size passes (the /255 and the widening are one look-up)."""
    img = np.asarray(image_rgb_u8)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {img.dtype} {img.shape}")
    return _resize_normalise(cv2.LUT(np.ascontiguousarray(img), _U8_TO_FLOAT), spec)


def _resize_normalise(img: np.ndarray, spec: MidasSpec) -> np.ndarray:
    """(H, W, 3) float64 -> (3, h_net, w_net) float32: cv2 resize, then (x - mean) / std per channel in float64.

    Per channel on contiguous planes, in place: the same IEEE operations as run.py's broadcast over the
    last axis (so the same bits), without its temporaries and the strided transpose copy."""
    h_net, w_net = target_size(img.shape[0], img.shape[1], spec)
    img = cv2.resize(img, (w_net, h_net), interpolation=_CV2_INTERP[spec.interpolation])  # (h_net, w_net, 3)
    out = np.empty((3, h_net, w_net), dtype=np.float32)
    for c, plane in enumerate(cv2.split(img)):  # (h_net, w_net) float64 each
        np.subtract(plane, spec.mean[c], out=plane)
        np.divide(plane, spec.std[c], out=plane)
        out[c] = plane
    return out


def preprocess_tensor(images_u8: torch.Tensor, spec: MidasSpec) -> torch.Tensor:
    """(B, 3, H, W) uint8 RGB of one size, on any device -> (B, 3, h_net, w_net) float32 normalised input,
    with torch ops on that device (``depth.preprocess: device``).

    run.py's steps in float32: / 255, bicubic resize (``align_corners=False``, no antialias: the kernel
    (a = -0.75) and pixel-centre mapping of cv2.INTER_CUBIC), (x - mean) / std. Not bit-identical to
    :func:`preprocess` (float32, another summation order); the difference is measured in docs/midas.md.
    """
    if images_u8.ndim != 4 or images_u8.shape[1] != 3 or images_u8.dtype != torch.uint8:
        raise ValueError(f"expected (B, 3, H, W) uint8 RGB, got {images_u8.dtype} {tuple(images_u8.shape)}")
    if spec.interpolation != "cv2.INTER_CUBIC":
        raise ValueError(f"{spec.model_type}: the device path implements cv2.INTER_CUBIC only, spec says "
                         f"{spec.interpolation!r}")
    h, w = images_u8.shape[-2:]
    size = target_size(int(h), int(w), spec)
    x = images_u8.float().div_(255.0)  # (B, 3, H, W)
    if tuple(size) != (h, w):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False)  # (B, 3, h, w)
    # per channel with Python scalars (rounded to float32 by the kernel, as a float32 mean tensor would be): no
    # tensor built from a Python list, which on CUDA would be a blocking host-to-device copy per batch
    for c in range(3):
        x[:, c].sub_(spec.mean[c]).div_(spec.std[c])
    return x


def postprocess(pred: torch.Tensor, out_size: Tuple[int, int]) -> torch.Tensor:
    """(B, h, w) network output -> (B, H, W) at ``out_size`` = (H, W), bicubic, align_corners=False.

    Same units as the input (relative inverse depth). Bicubic overshoot can give small negative
    values near edges, as in run.py; clip at 0 downstream if non-negativity matters.
    """
    if pred.ndim != 3:
        raise ValueError(f"expected a (B, h, w) prediction, got shape {tuple(pred.shape)}")
    out = F.interpolate(pred.unsqueeze(1), size=tuple(int(s) for s in out_size), mode="bicubic",
                        align_corners=False)  # (B, 1, H, W)
    return out.squeeze(1)
