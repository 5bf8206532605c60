"""Our DPT neck and head (MiDaS 3.1 ``DPTDepthModel``), on top of a backbone adapter.

Module names mirror the official checkpoint's ``scratch.*`` tree (``layerN_rn``,
``refinenetN.{resConfUnit1,resConfUnit2,out_conv}``, ``output_conv.{0,2,4}``,
``stem_transpose.{0,2}``) so the decoder loads by name; only the backbone needs a key map
(see ``checkpoint.py``). Data flow: research/midas.md §2.2.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))): 3x3 convs with bias, no norm (MiDaS uses use_bn=False)."""

    def __init__(self, *, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place: x is also the skip branch.
        out = self.conv1(F.relu(x))
        out = self.conv2(F.relu(out))
        return out + x


class FeatureFusionBlock(nn.Module):
    """One DPT fusion level: (upper + RCU1(skip)) -> RCU2 -> bilinear resize -> 1x1 conv.

    The deepest level has no skip input, so it is built with ``has_skip=False`` and has no
    ``resConfUnit1`` (the official file stores one that MiDaS never runs; the loader drops it).
    """

    def __init__(self, *, features: int, has_skip: bool = True):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features=features) if has_skip else None
        self.resConfUnit2 = ResidualConvUnit(features=features)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1, stride=1, padding=0, bias=True)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None,
                size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Returns (B, F, h', w'): ``size`` if given, else twice the input size."""
        out = x
        if skip is not None:
            out = out + self.resConfUnit1(skip)
        out = self.resConfUnit2(out)
        # MiDaS resizes before the 1x1 conv, align_corners=True.
        if size is None:
            out = F.interpolate(out, scale_factor=2.0, mode="bilinear", align_corners=True)
        else:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(out)


class _ConvTransposeNorm(nn.Sequential):
    """LeViT decoder stem layer: ConvTranspose 3x3 s2 (no bias) + BatchNorm.

    MiDaS passes ``dilation=1`` positionally into ConvTranspose2d's ``output_padding`` slot, so
    the layer is k3 s2 p1 output_padding=1: it doubles the size exactly (28 -> 56 -> 112).
    """

    def __init__(self, *, in_channels: int, out_channels: int):
        super().__init__()
        self.c = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1,
                                    output_padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)


class Scratch(nn.Module):
    """The DPT decoder: per-level 3x3 projections, fusion blocks, (LeViT stem), depth head."""

    def __init__(self, *, in_channels: Sequence[int], features: int, head_features_1: int,
                 head_features_2: int, levit_stem: bool):
        super().__init__()
        n = len(in_channels)
        if n not in (3, 4):
            raise ValueError(f"DPT needs 3 or 4 feature levels, got {n}")
        self.num_levels = n
        for i, c in enumerate(in_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(c, features, kernel_size=3, stride=1, padding=1,
                                                    bias=False))
        for i in range(1, n + 1):
            setattr(self, f"refinenet{i}", FeatureFusionBlock(features=features, has_skip=i < n))
        if levit_stem:
            # 256 -> 128 -> 64 channels, x4 spatially (14 -> 56 for a 224 input after refinenet1).
            self.stem_transpose = nn.Sequential(
                _ConvTransposeNorm(in_channels=features, out_channels=features // 2), nn.Hardswish(),
                _ConvTransposeNorm(in_channels=features // 2, out_channels=features // 4), nn.Hardswish())
            if head_features_1 != features // 4:
                raise ValueError(f"LeViT head expects {features // 4} input channels, got {head_features_1}")
        else:
            self.stem_transpose = None
            if head_features_1 != features:
                raise ValueError(f"head_features_1 must equal features ({features}), got {head_features_1}")
        # Indices 0, 2, 4 carry weights, as in the official Sequential (1 = upsample, 3/5 = ReLU).
        self.output_conv = nn.Sequential(
            nn.Conv2d(head_features_1, head_features_1 // 2, kernel_size=3, stride=1, padding=1),
            _Upsample2x(),
            nn.Conv2d(head_features_1 // 2, head_features_2, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.Conv2d(head_features_2, 1, kernel_size=1, stride=1, padding=0),
            nn.ReLU(),  # non_negative=True in every MiDaS 3.1 model
        )

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """feats: the reassembled backbone features, shallow first. Returns (B, 1, H, W)."""
        rn = [getattr(self, f"layer{i}_rn")(f) for i, f in enumerate(feats, start=1)]  # (B, F, h_i, w_i)
        n = self.num_levels
        path = getattr(self, f"refinenet{n}")(rn[n - 1], size=tuple(rn[n - 2].shape[2:]))
        for i in range(n - 1, 1, -1):
            path = getattr(self, f"refinenet{i}")(path, rn[i - 1], size=tuple(rn[i - 2].shape[2:]))
        path = self.refinenet1(path, rn[0])  # x2
        if self.stem_transpose is not None:
            path = self.stem_transpose(path)
        return self.output_conv(path)


class _Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


class MidasDpt(nn.Module):
    """MiDaS 3.1 DPT depth model: backbone adapter (``pretrained``) + decoder (``scratch``).

    ``forward((B, 3, H, W) normalised input) -> (B, H, W)`` relative inverse depth (larger =
    nearer, arbitrary per-image scale and shift), >= 0 after the final ReLU, at the input size.
    """

    def __init__(self, *, backbone: nn.Module, in_channels: Sequence[int], features: int = 256,
                 head_features_1: int = 256, head_features_2: int = 32, levit_stem: bool = False):
        super().__init__()
        self.pretrained = backbone
        self.scratch = Scratch(in_channels=in_channels, features=features,
                               head_features_1=head_features_1, head_features_2=head_features_2,
                               levit_stem=levit_stem)

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The reassembled features fed to ``scratch.layerN_rn`` (shallow first):
        list of (B, C_i, H/s_i, W/s_i) with strides 4, 8, 16, 32 (LeViT: 16, 32, 64)."""
        return self.pretrained(x)

    def forward_with_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """One pass giving both ``forward(x)`` (B, H, W) and ``forward_features(x)``."""
        feats = self.pretrained(x)
        return self.scratch(feats).squeeze(1), feats  # (B, 1, H, W) -> (B, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scratch(self.pretrained(x)).squeeze(1)  # (B, 1, H, W) -> (B, H, W)
