"""AutoLink's decoder: a 5-level U-Net that reconstructs the image from the masked image and the
link map (research/paper_autolink.md §2.5).

Submodule names (``down0``..``down4``, ``up1``..``up4``, ``conv``, ``alpha``) and the Sequential
indices inside the blocks are AutoLink's, so its checkpoints load by name.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dkp_core.keypoints.detector import LEAKY_SLOPE, init_autolink_weights


class DownBlock(nn.Module):
    """conv, BN, LReLU, conv, BN, bilinear ×0.5, LReLU."""

    def __init__(self, *, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.Upsample(scale_factor=0.5, mode="bilinear", align_corners=False),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, Cin, H, W)`` -> ``(B, Cout, H/2, W/2)``."""
        return self.net(x)


class DecoderUpBlock(nn.Module):
    """bilinear ×2, conv, BN, LReLU, conv, BN, LReLU."""

    def __init__(self, *, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, Cin, H, W)`` -> ``(B, Cout, 2H, 2W)``."""
        return self.net(x)


class Decoder(nn.Module):
    """U-Net on ``[α · masked image, link map]`` -> reconstruction with ``in_channels`` channels.

    ``α`` is a learnable scalar initialised to 1 (AutoLink logs it: it shows how much the decoder
    leans on the visible pixels versus the links). The output has no activation: it lives in the
    normalised [-1, 1] image space but is not clamped. Input side must be a multiple of 16.
    """

    def __init__(self, *, in_channels: int = 3, link_channels: int = 1, width: int = 64) -> None:
        super().__init__()
        w = width  # AutoLink: 64 (channels 64..1024); smaller widths keep the topology for CPU presets
        self.width = width
        self.in_channels = in_channels
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.down0 = nn.Sequential(
            nn.Conv2d(in_channels + link_channels, w, kernel_size=3, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )  # S
        self.down1 = DownBlock(in_channels=w, out_channels=2 * w)  # S/2
        self.down2 = DownBlock(in_channels=2 * w, out_channels=4 * w)  # S/4
        self.down3 = DownBlock(in_channels=4 * w, out_channels=8 * w)  # S/8
        self.down4 = DownBlock(in_channels=8 * w, out_channels=8 * w)  # S/16
        self.up1 = DecoderUpBlock(in_channels=8 * w, out_channels=8 * w)  # S/8, concat d16 -> 16w
        self.up2 = DecoderUpBlock(in_channels=16 * w, out_channels=4 * w)  # S/4, concat d32 -> 8w
        self.up3 = DecoderUpBlock(in_channels=8 * w, out_channels=2 * w)  # S/2, concat d64 -> 4w
        self.up4 = DecoderUpBlock(in_channels=4 * w, out_channels=w)  # S, concat d128 -> 2w
        self.conv = nn.Conv2d(2 * w, in_channels, kernel_size=3, padding=1)
        init_autolink_weights(self)

    def forward(self, masked_image: Tensor, link_map: Tensor) -> Tensor:
        """``masked_image`` ``(B, C, S, S)``, ``link_map`` ``(B, 1, S, S)`` -> reconstruction
        ``(B, C, S, S)`` in normalised image units."""
        if masked_image.shape[-2:] != link_map.shape[-2:]:
            raise ValueError(f"masked image {tuple(masked_image.shape)} and link map "
                             f"{tuple(link_map.shape)} differ in size")
        if masked_image.shape[-1] % 16 or masked_image.shape[-2] % 16:
            raise ValueError(f"decoder input side must be a multiple of 16, got {tuple(masked_image.shape[-2:])}")
        x = torch.cat([masked_image * self.alpha, link_map.to(masked_image.dtype)], dim=1)  # (B, C+1, S, S)
        d_full = self.down0(x)  # (B, 64, S, S)
        d2 = self.down1(d_full)  # (B, 128, S/2, S/2)
        d4 = self.down2(d2)  # (B, 256, S/4, S/4)
        d8 = self.down3(d4)  # (B, 512, S/8, S/8)
        d16 = self.down4(d8)  # (B, 512, S/16, S/16)
        u = torch.cat([self.up1(d16), d8], dim=1)  # (B, 1024, S/8, S/8)
        u = torch.cat([self.up2(u), d4], dim=1)  # (B, 512, S/4, S/4)
        u = torch.cat([self.up3(u), d2], dim=1)  # (B, 256, S/2, S/2)
        u = torch.cat([self.up4(u), d_full], dim=1)  # (B, 128, S, S)
        return self.conv(u)
