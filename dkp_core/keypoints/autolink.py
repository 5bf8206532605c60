"""AutoLink: detector -> link map -> masked-image U-Net reconstruction (research/paper_autolink.md §2).

The same class is the depth teacher (``image`` = depth replicated to ``in_channels``) and the RGB
student; the losses live in :mod:`dkp_core.losses`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from dkp_core.keypoints.decoder import Decoder
from dkp_core.keypoints.detector import DetectorOutput, KeypointDetector
from dkp_core.keypoints.links import LinkRenderer
from dkp_core.keypoints.masking import random_block_mask


@dataclass
class AutoLinkOutput:
    """What :meth:`AutoLink.forward` returns (S = image_size, C = in_channels).

    reconstruction: ``(B, C, S, S)`` decoder output, normalised image units, no activation.
    keypoints: ``(B, K, 2)`` (x, y) in [-1, 1] (same tensor as ``detector_output.keypoints``).
    edge_map: ``(B, 1, S, S)`` link map, >= 0.
    masked_image: ``(B, C, S, S)`` the input with removed blocks set to 0 (before α).
    detector_output: the full :class:`DetectorOutput` (logits, heatmaps, requested features).
    """

    reconstruction: Tensor
    keypoints: Tensor
    edge_map: Tensor
    masked_image: Tensor
    detector_output: DetectorOutput


class AutoLink(nn.Module):
    """Detector, link renderer and decoder with AutoLink's defaults (K-specific ``thick`` is the
    caller's choice: AutoLink used 5e-4 for Taichi K=10)."""

    def __init__(self, *, n_keypoints: int, in_channels: int = 3, image_size: int = 128,
                 heatmap_size: int = 32, thick: float = 5e-4, sklr: float = 512.0,
                 mask_ratio: float = 0.8, mask_blocks: int = 16, width: int = 64, extra_blocks: int = 0) -> None:
        super().__init__()
        self.n_keypoints = n_keypoints
        self.in_channels = in_channels
        self.image_size = image_size
        self.mask_ratio = float(mask_ratio)
        self.mask_blocks = int(mask_blocks)
        self.detector = KeypointDetector(n_keypoints=n_keypoints, in_channels=in_channels,
                                         image_size=image_size, heatmap_size=heatmap_size, width=width,
                                         extra_blocks=extra_blocks)
        self.links = LinkRenderer(n_keypoints=n_keypoints, size=image_size, thick=thick, sklr=sklr)
        self.decoder = Decoder(in_channels=in_channels, width=width)

    def forward(self, image: Tensor, *, mask_generator: torch.Generator,
                return_features: Sequence[str] = ()) -> AutoLinkOutput:
        """One AutoLink pass on ``image`` ``(B, C, S, S)``, normalised to [-1, 1].

        The detector sees the unmasked image; the decoder gets ``α · image · mask`` plus the link
        map and reconstructs ``image`` (the loss is the caller's). ``mask_generator`` drives the
        block mask, so a run is reproducible and resumable from the generator's state.
        """
        b, c, h, w = image.shape
        if c != self.in_channels or (h, w) != (self.image_size, self.image_size):
            raise ValueError(
                f"AutoLink expects images (B, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(image.shape)}; resize/crop to image_size in the data pipeline")
        det = self.detector(image, return_features=return_features)
        mask = random_block_mask(b, blocks=self.mask_blocks, ratio=self.mask_ratio, size=self.image_size,
                                 generator=mask_generator, device=image.device, dtype=image.dtype)
        masked = image * mask  # (B, C, S, S); removed pixels = 0 = mid-grey
        edge_map = self.links(det.keypoints)  # (B, 1, S, S)
        recon = self.decoder(masked, edge_map)
        return AutoLinkOutput(reconstruction=recon, keypoints=det.keypoints, edge_map=edge_map,
                              masked_image=masked, detector_output=det)


# AutoLink's detector is one nn.Sequential ``conv`` with indices 0..6; ours names them.
_AUTOLINK_DETECTOR_INDEX = {"0": "down1", "1": "down2", "2": "down3", "3": "down4",
                            "4": "up1", "5": "up2", "6": "head"}


def convert_autolink_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map an official AutoLink checkpoint's ``state_dict`` (PyTorch-Lightning ``Model``: keys
    ``encoder.detector.conv.N.*``, ``decoder.*``, ``vgg_loss.*``) to :class:`AutoLink` keys.

    The perceptual-loss VGG and the detector's fixed coordinate grid are dropped; the edge
    parameters ``decoder.skeleton_scalar`` become ``links.theta``. Weights need no change for our
    (x, y) order: the link map and the heatmaps are the same, only the soft-argmax grid differs.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("vgg_loss.") or key == "encoder.detector.coord":
            continue
        m = re.match(r"encoder\.detector\.conv\.(\d)\.(.*)", key)
        if m:
            out[f"detector.{_AUTOLINK_DETECTOR_INDEX[m.group(1)]}.{m.group(2)}"] = value
        elif key == "decoder.skeleton_scalar":
            out["links.theta"] = value
        elif key.startswith("decoder."):
            out[key] = value
        else:
            raise KeyError(f"unexpected key in AutoLink checkpoint: {key!r}")
    return out
