"""MiDaS's reassemble stage for the token backbones (BEiT, ViT, the hybrid's ViT levels), and its key names.

``ReadoutReassemble`` is MiDaS's ``act_postprocessN`` (readout "project"); the official file stores it as
``pretrained.act_postprocessN.{0.project.0,3,4}.*`` and we as ``pretrained.reassemble.{N-1}.{readout,conv,
resample}.*``: :func:`official_to_ours` and :func:`ours_to_official` rename one key either way (every family
runs them; keys they do not know pass through unchanged).
"""
from __future__ import annotations

import re
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

class ReadoutReassemble(nn.Module):
    """MiDaS ``act_postprocessN`` with readout "project".

    tokens (B, 1 + h*w, C) -> concat [patch tokens, cls broadcast] -> Linear(2C -> C) -> GELU
    -> (B, C, h, w) -> 1x1 conv to ``out_channels`` -> resample (x4 / x2 / x1 / /2).
    """

    def __init__(self, *, vit_features: int, out_channels: int, resample: str):
        super().__init__()
        self.readout = nn.Linear(2 * vit_features, vit_features)
        self.conv = nn.Conv2d(vit_features, out_channels, kernel_size=1, stride=1, padding=0)
        if resample == "up4":
            self.resample = nn.ConvTranspose2d(out_channels, out_channels, kernel_size=4, stride=4, padding=0)
        elif resample == "up2":
            self.resample = nn.ConvTranspose2d(out_channels, out_channels, kernel_size=2, stride=2, padding=0)
        elif resample == "down2":
            self.resample = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1)
        elif resample == "none":
            self.resample = None
        else:
            raise ValueError(f"resample must be up4, up2, none or down2, got {resample!r}")

    def forward(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """tokens (B, 1 + h*w, C), grid (h, w) -> (B, out_channels, h*s, w*s)."""
        patch = tokens[:, 1:]  # (B, h*w, C); patch tokens first, as MiDaS concatenates
        cls = tokens[:, :1].expand_as(patch)  # (B, h*w, C)
        x = F.gelu(self.readout(torch.cat([patch, cls], dim=-1)))  # (B, h*w, C)
        b, _, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, grid[0], grid[1])  # (B, C, h, w)
        x = self.conv(x)
        return self.resample(x) if self.resample is not None else x



RESAMPLE = ("up4", "up2", "none", "down2")  # per level, shallow first


def check_patch_multiple(x: torch.Tensor, patch: int, name: str) -> Tuple[int, int]:
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h % patch or w % patch:
        raise ValueError(f"{name}: input height and width must be multiples of {patch}, got {h}x{w}")
    return h // patch, w // patch



_PARTS = (("0.project.0.", "readout."), ("3.", "conv."), ("4.", "resample."))  # official -> ours, in a level


def official_to_ours(key: str) -> str:
    """``pretrained.act_postprocessN.<part>`` -> ``pretrained.reassemble.{N-1}.<ours>``; other keys unchanged."""
    m = re.match(r"pretrained\.act_postprocess(\d)\.(.*)$", key)
    if m is None:
        return key
    level, rest = int(m.group(1)) - 1, m.group(2)
    for old, new in _PARTS:
        if rest.startswith(old):
            return f"pretrained.reassemble.{level}.{new}{rest[len(old):]}"
    return key  # left unmapped: reported as unexpected


def ours_to_official(key: str) -> str:
    """The inverse of :func:`official_to_ours`."""
    m = re.match(r"pretrained\.reassemble\.(\d)\.(readout|conv|resample)\.(.*)$", key)
    if m is None:
        return key
    old = {new: old for old, new in _PARTS}[m.group(2) + "."]
    return f"pretrained.act_postprocess{int(m.group(1)) + 1}.{old}{m.group(3)}"
