"""Inverse depth for a batch of frames, exactly as the `depth` stage computes it (without the files)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .registry import MidasSpec
from .transforms import postprocess, preprocess_u8, target_size


def image_to_input(image_rgb_u8: np.ndarray, spec: MidasSpec) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, h_net, w_net) float32 network input (run.py: /255, cubic resize, normalise)."""
    if image_rgb_u8.dtype != np.uint8 or image_rgb_u8.ndim != 3 or image_rgb_u8.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {image_rgb_u8.dtype} {image_rgb_u8.shape}")
    return preprocess_u8(image_rgb_u8, spec)


@torch.inference_mode()
def predict_inverse_depth(model: torch.nn.Module, spec: MidasSpec, frames: Sequence[np.ndarray], *,
                          batch_size: int = 8, device: Optional[torch.device | str] = None) -> list[np.ndarray]:
    """Relative inverse depth (larger = nearer) for RGB uint8 frames (H, W, 3) of any sizes.

    Frames are grouped by their resized network shape (as the stage batches them), run in fp32 and resized
    back to each frame's own size with bicubic interpolation. Returns one float32 (H, W) array per frame,
    in input order.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out: list[Optional[np.ndarray]] = [None] * len(frames)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, f in enumerate(frames):
        groups.setdefault(target_size(f.shape[0], f.shape[1], spec), []).append(i)
    for idx in groups.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            x = torch.from_numpy(np.stack([image_to_input(frames[i], spec) for i in chunk])).to(device)
            y = model(x).float()  # (b, h_net, w_net)
            for i, pred in zip(chunk, y):
                out[i] = postprocess(pred[None], frames[i].shape[:2])[0].cpu().numpy()
    return out  # type: ignore[return-value]
