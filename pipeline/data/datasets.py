"""Training/evaluation datasets over a manifest (RGB) and a depth cache (teacher input).

Every item is a pure function of (index, epoch): the horizontal flip is drawn from
:func:`pipeline.training.sample_generator` seeded by (seed, epoch, index), and RGB and depth of the
same frame get the same flip, so the student and the frozen teacher see aligned inputs.

For a dataset whose description says ``apply_masks: true`` (Human3.6M without background), every input
is multiplied by the frame's foreground mask once it is in [-1, 1] (the flip mirrors both), exactly as AutoLink's
``h36m_wobg`` multiplies ``Normalize(ToTensor(img))`` by ``ToTensor(mask)``: the background becomes 0.
The teacher's depth is masked the same way (MiDaS ran on the whole frame; see docs/datasets.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from pipeline.data.images import read_mask, resize_square
from pipeline.data.video import read_frame  # an image file, or a frame of a video


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


def finish(parts: dict) -> dict:
    """Batched items from their parts (see :meth:`FrameDataset.parts`, stacked): ``rgb`` (B, 3, S, S) and/or
    ``depth`` (B, 3, S, S) float32 in [-1, 1], times the mask where there is one; ``index`` and ``flip`` as given.

    The arithmetic of :func:`rgb_to_tensor` and :func:`depth_to_tensor` (uint8 -> float32, / 127.5, - 1; the
    depth replicated), then the mask product: elementwise float32 operations, so each value is the one the
    per-item path computes, whether it runs on one item or on a batch.
    """
    out = {"index": parts["index"], "flip": parts["flip"]}
    mask = parts.get("mask")  # (B, 1 or 3, S, S) or None
    if "rgb_u8" in parts:
        x = parts["rgb_u8"].float().div_(127.5).sub_(1.0)  # (B, 3, S, S) in [-1, 1]
        out["rgb"] = x * mask if mask is not None else x  # the background becomes 0
    if "depth1" in parts:
        x = parts["depth1"].float().repeat(1, 3, 1, 1)  # (B, 1, S, S) -> (B, 3, S, S): the detector's channels
        out["depth"] = x * mask if mask is not None else x
    return out


def collate_frames(items: list) -> dict:
    """The trainer's ``collate_fn`` for :meth:`FrameDataset.loader_view`: stacks the items' parts (uint8 RGB,
    unreplicated depth: a quarter and a third of the float bytes) and converts the batch in one go."""
    from torch.utils.data import default_collate

    masks = [it["mask"] for it in items if "mask" in it]
    if masks and len({m.shape[0] for m in masks}) > 1:
        # a gray mask (1 channel) beside a colour one (3): the gray factor repeated multiplies each channel by
        # the same value it did as a broadcast, so the products do not change
        items = [it | {"mask": it["mask"].expand(3, -1, -1)} if it["mask"].shape[0] == 1 else it for it in items]
    return finish(default_collate(items))


def _own(a: np.ndarray, flip: bool) -> torch.Tensor:
    """``a`` (..., S, S) as a tensor, mirrored left-right if ``flip`` (torch's flip: ~4x numpy's reversed copy of
    uint8). ``a`` is a fresh array (decoded, or read from the frame cache), so it is shared, not copied."""
    t = torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.array(a))
    return t.flip(-1) if flip else t


class FrameDataset:
    """Frames of a manifest at the model size, as RGB and/or normalised depth, with a seeded flip.

    ``get(i, epoch)`` returns a dict with ``index`` (manifest index), ``flip`` (bool tensor) and
    ``rgb`` (3, S, S) and/or ``depth`` (3, S, S), both in [-1, 1] (times the mask when the manifest's
    ``apply_masks`` is set).

    An item is made of three arrays at the model size (:meth:`rgb_chw`, :meth:`depth_map`, :meth:`mask_chw`).
    With ``cache`` (a :class:`pipeline.data.framecache.FrameCache`, see :func:`pipeline.data.framecache.attach`)
    they are rows read from the training-frame cache instead of being decoded; everything after them (the flip,
    the float conversion, the mask product: :func:`finish`) is the same code, so an item is bit-identical either
    way. The trainer reads :meth:`loader_view` with :func:`collate_frames`: the same batches, converted per
    batch instead of per item.
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
        self._flips: dict[int, np.ndarray] = {}  # epoch -> (N,) bool

    def __len__(self) -> int:
        return len(self.indices)

    def _flip(self, i: int, epoch: int) -> bool:
        """``torch.rand((), generator=sample_generator(seed, epoch, i)) < 0.5``, computed for the whole epoch at
        once on first use (pipeline.training.flips: the same values, ~0.5 us a sample instead of ~35 us)."""
        if not self.hflip:
            return False
        flips = self._flips.get(epoch)
        if flips is None:
            from pipeline.training.flips import epoch_flips

            if len(self._flips) >= 2:  # a worker's epochs only grow: keep the current one and the next
                self._flips.pop(min(self._flips))
            flips = self._flips[epoch] = epoch_flips(self.seed, epoch, len(self))
        return bool(flips[i])

    # ---- the three arrays an item is made of (what the frame cache stores: row i = item i)
    def rgb_chw(self, i: int) -> np.ndarray:
        """Item ``i``'s frame at the model size (shorter side to S, centre crop): (3, S, S) uint8 RGB."""
        if self.cache is not None and self.cache.has("rgb"):
            return self.cache.read("rgb", i)
        img = resize_square(read_frame(self.manifest, int(self.indices[i])), self.image_size)
        return np.ascontiguousarray(img.transpose(2, 0, 1))

    def depth_map(self, i: int) -> np.ndarray:
        """Item ``i``'s teacher input before replication: (S, S) float32 in [-1, 1] (resized, then normalised)."""
        if self.cache is not None and self.cache.has("depth"):
            return self.cache.read("depth", i)
        d = resize_square(self.reader.read(int(self.indices[i])), self.image_size)
        return normalise_inverse_depth(d, self.depth_norm)

    def mask_chw(self, i: int) -> Optional[np.ndarray]:
        """Item ``i``'s foreground factor at the model size, (C, S, S) float32 in [0, 1] (C = 1 or 3), or None
        when the dataset is not masked."""
        if not self.manifest.apply_masks:
            return None
        if self.cache is not None and self.cache.has("mask"):
            return self.cache.read("mask", i)
        return np.ascontiguousarray(self._mask_of(int(self.indices[i])).transpose(2, 0, 1))

    def _mask_of(self, m: int) -> np.ndarray:
        factor = read_mask(Path(self.manifest.root) / self.manifest.mask_paths[m])  # (H, W, C)
        c = factor.shape[2]
        return resize_square(factor, self.image_size).reshape(self.image_size, self.image_size, c)

    def mask(self, m: int) -> Optional[torch.Tensor]:
        """(1 or 3, S, S) float32 factor in [0, 1] for manifest frame ``m``, or None if the dataset is not masked."""
        if not self.manifest.apply_masks:
            return None
        return torch.from_numpy(np.ascontiguousarray(self._mask_of(m).transpose(2, 0, 1)))

    # ---- items
    def parts(self, i: int, flip: bool = False) -> dict:
        """Item ``i`` before its float conversion: ``index`` (int), ``flip`` (bool) and, as used, ``rgb_u8``
        (3, S, S) uint8, ``depth1`` (1, S, S) float32 in [-1, 1], ``mask`` (C, S, S) float32, each mirrored when
        ``flip`` (mirroring commutes with the elementwise conversion and product that :func:`finish` does)."""
        out: dict = {"index": int(self.indices[i]), "flip": bool(flip)}  # tensors once per batch, by the collate
        if not (self.use_rgb or self.use_depth):
            return out
        if self.use_rgb:
            out["rgb_u8"] = _own(self.rgb_chw(i), flip)
        if self.use_depth:
            out["depth1"] = _own(self.depth_map(i), flip)[None]
        mask = self.mask_chw(i)
        if mask is not None:
            out["mask"] = _own(mask, flip)
        return out

    def load(self, i: int, flip: bool = False) -> dict:
        return {k: v[0] for k, v in collate_frames([self.parts(i, flip)]).items()}  # a batch of one

    def get(self, i: int, epoch: int) -> dict:
        return self.load(i, self._flip(i, epoch))

    def get_parts(self, i: int, epoch: int) -> dict:
        return self.parts(i, self._flip(i, epoch))

    def loader_view(self) -> "PartsView":
        """What the trainer's DataLoader reads (with ``collate_fn=collate_frames``): the same items, as parts."""
        return PartsView(self)

    # Plain map-style access (evaluation, embedding caches): never flipped.
    def __getitem__(self, i: int) -> dict:
        return self.load(i, False)


class PartsView:
    """An :class:`~pipeline.training.settings.EpochDataset` over a FrameDataset whose ``get`` gives the item's
    parts; batches of it through :func:`collate_frames` equal the stacked items of ``get``."""

    def __init__(self, ds: FrameDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, i: int, epoch: int) -> dict:
        return self.ds.get_parts(i, epoch)


def valid_train_indices(manifest, reader=None, split: str = "train") -> np.ndarray:
    """Manifest indices of ``split`` that have a valid depth map (when a cache is given)."""
    idx = manifest.split(split)
    if reader is not None:
        ok = np.array([reader.is_valid(int(i)) for i in idx], dtype=bool)
        idx = idx[ok]
    return idx
