"""Training/evaluation datasets over a manifest (RGB) and a depth cache (teacher input).

Every item is a pure function of (index, epoch): the horizontal flip is drawn from
:func:`pipeline.training.sample_generator` seeded by (seed, epoch, index), and RGB and depth of the
same frame get the same flip, so the student and the frozen teacher see aligned inputs.

For a dataset whose description says ``apply_masks: true`` (Human3.6M without background), every input
is multiplied by the frame's foreground mask once it is in [-1, 1], before the flip, exactly as AutoLink's
``h36m_wobg`` multiplies ``Normalize(ToTensor(img))`` by ``ToTensor(mask)``: the background becomes 0.
The teacher's depth is masked the same way (MiDaS ran on the whole frame; see docs/datasets.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from pipeline.data.images import read_mask, read_rgb, resize_square


def normalise_inverse_depth(inv: np.ndarray, method: str = "minmax") -> np.ndarray:
    """Teacher input from relative inverse depth: per-frame min-max over finite pixels to [-1, 1].

    Near (large inverse depth) -> +1, far -> -1. A constant map becomes all zeros. Returns float32 (H, W).
    """
    if method != "minmax":
        raise ValueError(f"unknown depth normalisation {method!r}; valid: minmax")
    d = np.asarray(inv, dtype=np.float32)
    finite = np.isfinite(d)
    if not finite.any():
        return np.zeros_like(d)
    lo, hi = float(d[finite].min()), float(d[finite].max())
    if hi - lo < 1e-12:
        return np.zeros_like(d)
    out = (np.where(finite, d, lo) - lo) / (hi - lo) * 2.0 - 1.0
    return out.astype(np.float32)


def rgb_to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


def depth_to_tensor(depth_norm: np.ndarray, channels: int = 3) -> torch.Tensor:
    """(H, W) in [-1, 1] -> (channels, H, W) float32, the depth replicated to the detector's input channels."""
    return torch.from_numpy(np.ascontiguousarray(depth_norm)).float().unsqueeze(0).repeat(channels, 1, 1)


class FrameDataset:
    """Frames of a manifest at the model size, as RGB and/or normalised depth, with a seeded flip.

    ``get(i, epoch)`` returns a dict with ``index`` (manifest index), ``flip`` (bool tensor) and
    ``rgb`` (3, S, S) and/or ``depth`` (3, S, S), both in [-1, 1] (times the mask when the manifest's
    ``apply_masks`` is set).

    With ``cache`` (a :class:`pipeline.data.framecache.FrameCache`, see :func:`pipeline.data.framecache.attach`)
    the resized frame, normalised depth and mask factor of each item are rows read from the training-frame cache
    instead of being decoded; everything after them (tensor conversion, mask product, flip) is the same code, so
    an item is bit-identical either way.
    """

    def __init__(self, *, manifest, indices: Sequence[int], image_size: int, use_rgb: bool, use_depth: bool,
                 depth_reader=None, hflip: bool = False, seed: int = 0, depth_norm: str = "minmax",
                 cache=None) -> None:
        if use_depth and depth_reader is None:
            raise ValueError("use_depth needs a depth_reader")
        self.manifest = manifest
        self.indices = np.asarray(indices, dtype=np.int64)
        self.image_size = image_size
        self.use_rgb, self.use_depth = use_rgb, use_depth
        self.reader = depth_reader
        self.hflip, self.seed, self.depth_norm = hflip, seed, depth_norm
        self.cache = cache

    def __len__(self) -> int:
        return len(self.indices)

    def _flip(self, i: int, epoch: int) -> bool:
        if not self.hflip:
            return False
        from pipeline.training import sample_generator

        return bool(torch.rand((), generator=sample_generator(self.seed, epoch, i)) < 0.5)

    # ---- the three things an item is made of (what the frame cache stores, row i = item i)
    def rgb_u8(self, i: int) -> np.ndarray:
        """Item ``i``'s frame at the model size: (S, S, 3) uint8 RGB (shorter side to S, centre crop)."""
        if self.cache is not None and self.cache.has("rgb"):
            return self.cache.row("rgb", i)
        return resize_square(read_rgb(self.manifest.path_of(int(self.indices[i]))), self.image_size)

    def depth_map(self, i: int) -> np.ndarray:
        """Item ``i``'s teacher input before replication: (S, S) float32 in [-1, 1] (resized, then normalised)."""
        if self.cache is not None and self.cache.has("depth"):
            return self.cache.row("depth", i)
        d = resize_square(self.reader.read(int(self.indices[i])), self.image_size)
        return normalise_inverse_depth(d, self.depth_norm)

    def mask_factor(self, i: int) -> Optional[np.ndarray]:
        """Item ``i``'s foreground factor at the model size, (S, S, C) float32 in [0, 1] (C = 1 or 3), or None
        when the dataset is not masked."""
        if not self.manifest.apply_masks:
            return None
        if self.cache is not None and self.cache.has("mask"):
            return self.cache.row("mask", i)
        return self._mask_of(int(self.indices[i]))

    def _mask_of(self, m: int) -> np.ndarray:
        factor = read_mask(Path(self.manifest.root) / self.manifest.mask_paths[m])  # (H, W, C)
        c = factor.shape[2]
        return resize_square(factor, self.image_size).reshape(self.image_size, self.image_size, c)

    def mask(self, m: int) -> Optional[torch.Tensor]:
        """(1 or 3, S, S) float32 factor in [0, 1] for manifest frame ``m``, or None if the dataset is not masked."""
        if not self.manifest.apply_masks:
            return None
        return torch.from_numpy(np.ascontiguousarray(self._mask_of(m).transpose(2, 0, 1)))

    def load(self, i: int, flip: bool = False) -> dict:
        m = int(self.indices[i])
        item: dict = {"index": torch.tensor(m), "flip": torch.tensor(flip)}
        if not (self.use_rgb or self.use_depth):
            return item
        # The flip is taken on the (S, S, ...) arrays as a view, before the one copy each conversion makes: the
        # same values as flipping the product afterwards (an elementwise product commutes with a permutation of
        # pixels), without a third copy per input.
        factor = self.mask_factor(i)  # (S, S, C) or None
        mask = None
        if factor is not None:
            mask = torch.from_numpy(np.ascontiguousarray((factor[:, ::-1] if flip else factor).transpose(2, 0, 1)))
        if self.use_rgb:
            img = self.rgb_u8(i)
            x = rgb_to_tensor(img[:, ::-1] if flip else img)  # (3, S, S) in [-1, 1]
            item["rgb"] = x * mask if mask is not None else x  # (3, S, S) * (1 or 3, S, S): the background becomes 0
        if self.use_depth:
            d = self.depth_map(i)
            x = depth_to_tensor(d[:, ::-1] if flip else d)  # (3, S, S) in [-1, 1]
            item["depth"] = x * mask if mask is not None else x
        return item

    def get(self, i: int, epoch: int) -> dict:
        return self.load(i, self._flip(i, epoch))

    # Plain map-style access (evaluation, embedding caches): never flipped.
    def __getitem__(self, i: int) -> dict:
        return self.load(i, False)


def valid_train_indices(manifest, reader=None, split: str = "train") -> np.ndarray:
    """Manifest indices of ``split`` that have a valid depth map (when a cache is given)."""
    idx = manifest.split(split)
    if reader is not None:
        ok = np.array([reader.is_valid(int(i)) for i in idx], dtype=bool)
        idx = idx[ok]
    return idx
