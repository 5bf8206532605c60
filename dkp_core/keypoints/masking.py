"""AutoLink's random block mask (research/paper_autolink.md §2.3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_block_mask(batch: int, *, blocks: int = 16, ratio: float = 0.8, size: int = 128,
                      generator: torch.Generator, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """A ``blocks``×``blocks`` grid of uniform draws per image, a cell kept where ``u > ratio``
    (so about ``1 - ratio`` of the cells survive), upsampled (nearest) to ``size``×``size``.

    Returns ``(batch, 1, size, size)`` of 0.0 (removed) / 1.0 (kept) on ``device``.

    The draws come from ``generator`` on the generator's own device and are then moved to
    ``device``: a CPU generator gives the same masks for a CPU or a CUDA run, and saving/restoring
    its state is all an exact resume needs.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    if blocks < 1 or size < blocks:
        raise ValueError(f"need 1 <= blocks <= size, got blocks={blocks}, size={size}")
    u = torch.rand((batch, 1, blocks, blocks), generator=generator, device=generator.device)
    keep = (u > ratio).to(device=device if device is not None else generator.device, dtype=dtype)
    # Nearest upsampling: with size a multiple of blocks every cell is an exact square of pixels.
    return F.interpolate(keep, size=(size, size), mode="nearest")  # (B, 1, size, size)
