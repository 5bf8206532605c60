"""BEiT (MiDaS ``dpt_beit_large_512`` / ``dpt_beit_large_384`` / ``dpt_beit_base_384``): family ``beit``.

The adapter runs its own attention forward over timm's parameters because MiDaS accepts any input size
that is a multiple of 16 by resizing each block's relative-position table (research §2.3); timm's BEiT
only supports its build size. timm >= 1.0 keeps the official file's backbone key names, so the key maps
are the identity; the unused ImageNet head is ignored.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .family import Family, register
from .reassemble import RESAMPLE, ReadoutReassemble, check_patch_multiple


def beit_relative_position_index(h: int, w: int, device=None) -> torch.Tensor:
    """BEiT's (h*w + 1, h*w + 1) int64 index into a table of (2h-1)(2w-1) + 3 rows.

    Token-token pairs index the (dy, dx) grid row-major; the last three rows are cls->token,
    token->cls and cls->cls (same layout as timm's ``gen_relative_position_index``).
    """
    num_rel = (2 * h - 1) * (2 * w - 1) + 3
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    coords = torch.stack([ys.reshape(-1), xs.reshape(-1)])  # (2, h*w)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, h*w, h*w)
    flat = (rel[0] + (h - 1)) * (2 * w - 1) + (rel[1] + (w - 1))  # (h*w, h*w)
    index = torch.zeros((h * w + 1, h * w + 1), dtype=torch.long, device=device)
    index[1:, 1:] = flat
    index[0, 0:] = num_rel - 3
    index[0:, 0] = num_rel - 2
    index[0, 0] = num_rel - 1
    return index


def beit_relative_position_bias(table: torch.Tensor, train_window: Tuple[int, int], grid: Tuple[int, int],
                                index: torch.Tensor) -> torch.Tensor:
    """The (1, heads, h*w+1, h*w+1) bias for a token grid ``grid`` (MiDaS ``_get_rel_pos_bias``).

    The token-token part of the table, a (2W-1) x (2W-1) grid for the training window W, is
    resized bilinearly (align_corners=False) to (2h-1) x (2w-1); the 3 cls rows are kept.
    """
    old_h, old_w = 2 * train_window[0] - 1, 2 * train_window[1] - 1
    new_h, new_w = 2 * grid[0] - 1, 2 * grid[1] - 1
    n_old = old_h * old_w
    heads = table.shape[1]
    if (new_h, new_w) != (old_h, old_w):
        # MiDaS reshapes to (old_w, old_h): the training windows are square, so this is the grid.
        sub = table[:n_old].reshape(1, old_w, old_h, heads).permute(0, 3, 1, 2)  # (1, heads, 2W-1, 2W-1)
        sub = F.interpolate(sub, size=(new_h, new_w), mode="bilinear", align_corners=False)
        sub = sub.permute(0, 2, 3, 1).reshape(new_h * new_w, heads)  # (rows, heads)
        table = torch.cat([sub, table[n_old:]], dim=0)
    n = grid[0] * grid[1] + 1
    bias = table[index.reshape(-1)].reshape(n, n, heads)  # (N, N, heads)
    return bias.permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)


def _beit_attention(attn: nn.Module, x: torch.Tensor, grid: Tuple[int, int], index: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    qkv_bias = None
    if attn.q_bias is not None:
        qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])  # k has no bias
    qkv = F.linear(x, attn.qkv.weight, qkv_bias)  # (B, N, 3*heads*d)
    qkv = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
    q, k, v = qkv.unbind(0)
    bias = beit_relative_position_bias(attn.relative_position_bias_table, attn.window_size, grid, index)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, heads, N, d)
    out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, heads*d)
    return attn.proj(out)


def _beit_block(blk: nn.Module, x: torch.Tensor, grid: Tuple[int, int], index: torch.Tensor) -> torch.Tensor:
    a = _beit_attention(blk.attn, blk.norm1(x), grid, index)
    x = x + (blk.gamma_1 * a if blk.gamma_1 is not None else a)
    m = blk.mlp(blk.norm2(x))
    return x + (blk.gamma_2 * m if blk.gamma_2 is not None else m)


class BeitBackbone(nn.Module):
    """BEiT (MiDaS ``beitl16_512`` / ``beitl16_384`` / ``beitb16_384``) at any size multiple of 16."""

    def __init__(self, *, timm_name: str, hooks: Sequence[int], in_channels: Sequence[int], vit_features: int,
                 timm_kwargs: Optional[Mapping[str, Any]] = None):
        super().__init__()
        # timm_kwargs: architecture overrides for timm (e.g. depth/embed_dim of a tiny test model).
        self.model = timm.create_model(timm_name, pretrained=False, num_classes=0, **dict(timm_kwargs or {}))
        self.hooks = tuple(int(h) for h in hooks)
        self.reassemble = nn.ModuleList(
            ReadoutReassemble(vit_features=vit_features, out_channels=c, resample=r)
            for c, r in zip(in_channels, RESAMPLE))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, 3, H, W) -> 4 maps (B, C_i, H/s, W/s), s = 4, 8, 16, 32."""
        grid = check_patch_multiple(x, 16, "BEiT")
        m = self.model
        t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, C)
        t = m.patch_embed.norm(t)
        t = torch.cat([m.cls_token.expand(t.shape[0], -1, -1), t], dim=1)  # (B, 1 + h*w, C)
        if m.pos_embed is not None:  # None for every MiDaS BEiT (relative position bias only)
            raise ValueError("BEiT with an absolute position embedding is not a MiDaS backbone")
        index = beit_relative_position_index(grid[0], grid[1], device=x.device)  # shared by all blocks
        taken = []
        for i, blk in enumerate(m.blocks[: max(self.hooks) + 1]):
            t = _beit_block(blk, t, grid, index)
            if i in self.hooks:
                taken.append(t)
        return [r(f, grid) for r, f in zip(self.reassemble, taken)]


register(Family(
    name="beit",
    build=lambda spec: BeitBackbone(timm_name=spec.timm_name, hooks=spec.hooks, in_channels=spec.in_channels,
                                    vit_features=spec.vit_features)))
