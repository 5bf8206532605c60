"""ViT-L/16 (MiDaS v3.0 ``dpt_large_384``, family ``vit``) and ViT-B/16 on ResNet-50 stages (``dpt_hybrid_384``,
family ``hybrid``): one adapter, at any input size that is a multiple of 16 (the position embedding is resized).

timm >= 1.0 keeps the official file's backbone key names, so the key maps are the identity; the unused
ImageNet head is ignored.
"""
from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .family import Family, register
from .reassemble import RESAMPLE, ReadoutReassemble, check_patch_multiple


def _resized_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(1, 1 + G*G, C) -> (1, 1 + h*w, C): grid part resized bilinearly (MiDaS ``_resize_pos_embed``)."""
    tok, pos = pos_embed[:, :1], pos_embed[0, 1:]
    g = int(math.sqrt(pos.shape[0]))
    if (g, g) == tuple(grid):
        return pos_embed
    pos = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, C, G, G)
    pos = F.interpolate(pos, size=grid, mode="bilinear", align_corners=False)
    pos = pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)  # (1, h*w, C)
    return torch.cat([tok, pos], dim=1)


class VitBackbone(nn.Module):
    """ViT-L/16 (dpt_large_384) or ViT-B/16 on ResNet-50 stages (dpt_hybrid_384), any size multiple of 16."""

    def __init__(self, *, timm_name: str, hooks: Sequence[int], in_channels: Sequence[int], vit_features: int,
                 hybrid: bool, timm_kwargs: Optional[Mapping[str, Any]] = None):
        super().__init__()
        # timm_kwargs: architecture overrides for timm (e.g. depth/embed_dim of a tiny test model).
        self.model = timm.create_model(timm_name, pretrained=False, num_classes=0, **dict(timm_kwargs or {}))
        self.hybrid = hybrid
        self.hooks = tuple(int(h) for h in hooks)
        if getattr(self.model, "num_prefix_tokens", 1) != 1 or getattr(self.model, "no_embed_class", False):
            raise ValueError(f"{timm_name}: expected one cls token inside the position embedding")
        mods = []
        for i, (c, r) in enumerate(zip(in_channels, RESAMPLE)):
            if hybrid and i < 2:
                mods.append(nn.Identity())  # levels 1-2 are ResNet stage outputs, used as they are
            else:
                mods.append(ReadoutReassemble(vit_features=vit_features, out_channels=c, resample=r))
        self.reassemble = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, 3, H, W) -> 4 maps (B, C_i, H/s, W/s), s = 4, 8, 16, 32."""
        grid = check_patch_multiple(x, 16, "ViT")
        m = self.model
        early = []
        if self.hybrid:
            cnn = m.patch_embed.backbone  # timm ResNetV2: stem -> stages -> norm (Identity, no preact)
            y = cnn.stem(x)
            for s, stage in enumerate(cnn.stages):
                y = stage(y)
                if s < 2:
                    early.append(y)  # (B, 256, H/4, W/4), (B, 512, H/8, W/8)
            y = cnn.norm(y)
            t = m.patch_embed.proj(y)
        else:
            t = m.patch_embed.proj(x)
        t = t.flatten(2).transpose(1, 2)  # (B, h*w, C)
        t = torch.cat([m.cls_token.expand(t.shape[0], -1, -1), t], dim=1)  # (B, 1 + h*w, C)
        t = t + _resized_pos_embed(m.pos_embed, grid)
        vit_hooks = self.hooks[2:] if self.hybrid else self.hooks
        taken = []
        for i, blk in enumerate(m.blocks[: max(vit_hooks) + 1]):
            t = blk(t)
            if i in vit_hooks:
                taken.append(t)
        out = list(early)
        for r, f in zip(self.reassemble[len(early):], taken):
            out.append(r(f, grid))
        return out


def _build(hybrid: bool):
    return lambda spec: VitBackbone(timm_name=spec.timm_name, hooks=spec.hooks, in_channels=spec.in_channels,
                                    vit_features=spec.vit_features, hybrid=hybrid)


register(Family(name="vit", build=_build(hybrid=False)))
register(Family(name="hybrid", build=_build(hybrid=True)))
