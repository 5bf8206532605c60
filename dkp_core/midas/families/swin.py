"""Swin V2 (MiDaS ``dpt_swin2_*``, family ``swin2``) and Swin V1 (``dpt_swin_large_384``, family ``swin``):
square inputs at the native size only.

Key maps: timm >= 0.9 moved PatchMerging from the end of stage i to the start of stage i + 1, so the
official ``layers.i.downsample.*`` is our ``layers.{i+1}.downsample.*``; the unused ImageNet head is ignored.
"""
from __future__ import annotations

import re
from typing import List, Sequence

import timm
import torch
import torch.nn as nn

from .family import Family, KeyMap, register


class SwinBackbone(nn.Module):
    """Swin / Swin V2 through ``forward_intermediates``: the output of each stage's last block.

    timm >= 0.9 moved PatchMerging to the start of the next stage, so a stage output is exactly
    what MiDaS hooked (last block, before merging and before the final norm).
    """

    def __init__(self, *, timm_name: str, hooks: Sequence[int]):
        super().__init__()
        self.model = timm.create_model(timm_name, pretrained=False, num_classes=0)
        for i, (stage, h) in enumerate(zip(self.model.layers, hooks)):
            if int(h) != len(stage.blocks) - 1:
                raise ValueError(f"{timm_name}: MiDaS hook {h} of stage {i} is not its last block "
                                 f"({len(stage.blocks) - 1}); forward_intermediates cannot give it")
        self.img_size = tuple(self.model.patch_embed.img_size)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, 3, S, S) at the native S -> 4 maps (B, C * 2^i, S/4/2^i, S/4/2^i)."""
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"Swin backbones take exactly {self.img_size[0]}x{self.img_size[1]} inputs "
                             f"(MiDaS resizes to a square), got {x.shape[-2]}x{x.shape[-1]}")
        return self.model.forward_intermediates(x, indices=[0, 1, 2, 3], norm=False, output_fmt="NCHW",
                                                intermediates_only=True)


def _shift_downsample(by: int) -> KeyMap:
    def fn(sub: str) -> str:
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)$", sub)
        return f"layers.{int(m.group(1)) + by}.downsample.{m.group(2)}" if m else sub

    return fn


def _family(name: str) -> Family:
    return Family(name=name, build=lambda spec: SwinBackbone(timm_name=spec.timm_name, hooks=spec.hooks),
                  official_to_ours=lambda _model: _shift_downsample(+1),
                  ours_to_official=lambda _model: _shift_downsample(-1))


register(_family("swin2"))
register(_family("swin"))
