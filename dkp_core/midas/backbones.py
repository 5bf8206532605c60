"""Backbone adapters: timm >= 1.0 models, driven through public modules and methods.

Each adapter owns the timm model as ``.model`` (random init, ``pretrained=False``,
``num_classes=0`` so no ImageNet head exists) and MiDaS's reassemble stage as ``.reassemble``,
and returns the list of features that MiDaS feeds to ``scratch.layerN_rn``.

No forward hooks and no module-level activation dict (MiDaS's pattern, which races between
threads and keeps activations alive): each adapter walks the blocks itself and keeps what it needs.
BEiT runs its own attention forward over timm's parameters because MiDaS accepts any input size
that is a multiple of 16 by resizing each block's relative-position table (research §2.3);
timm's BEiT only supports its build size.
"""
from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import MidasSpec


# ------------------------------------------------------------------------------------------------
# Reassemble (ViT / BEiT / hybrid): tokens -> feature map at stride 4, 8, 16 or 32
# ------------------------------------------------------------------------------------------------

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


_RESAMPLE = ("up4", "up2", "none", "down2")


def _check_patch_multiple(x: torch.Tensor, patch: int, name: str) -> Tuple[int, int]:
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h % patch or w % patch:
        raise ValueError(f"{name}: input height and width must be multiples of {patch}, got {h}x{w}")
    return h // patch, w // patch


# ------------------------------------------------------------------------------------------------
# BEiT
# ------------------------------------------------------------------------------------------------

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
            for c, r in zip(in_channels, _RESAMPLE))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, 3, H, W) -> 4 maps (B, C_i, H/s, W/s), s = 4, 8, 16, 32."""
        grid = _check_patch_multiple(x, 16, "BEiT")
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


# ------------------------------------------------------------------------------------------------
# ViT-L (dpt_large_384) and ViT-B + ResNet-50 hybrid (dpt_hybrid_384), MiDaS v3.0
# ------------------------------------------------------------------------------------------------

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
        for i, (c, r) in enumerate(zip(in_channels, _RESAMPLE)):
            if hybrid and i < 2:
                mods.append(nn.Identity())  # levels 1-2 are ResNet stage outputs, used as they are
            else:
                mods.append(ReadoutReassemble(vit_features=vit_features, out_channels=c, resample=r))
        self.reassemble = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, 3, H, W) -> 4 maps (B, C_i, H/s, W/s), s = 4, 8, 16, 32."""
        grid = _check_patch_multiple(x, 16, "ViT")
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


# ------------------------------------------------------------------------------------------------
# Swin V2 / Swin V1 (square, native size only)
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# LeViT (dpt_levit_224)
# ------------------------------------------------------------------------------------------------

def levit_flat_layout(model: nn.Module) -> List[Tuple[str, str]]:
    """The timm 0.6 flat ``blocks`` list of a timm >= 1.0 LeViT: for each old index, the new
    module prefix and its kind (``attn``, ``mlp``, ``down_attn``, ``down_mlp``).

    Old LeViT was one Sequential: [Residual(attn), Residual(mlp)] per block, with
    [AttentionSubsample, Residual(mlp)] in front of stages 2 and 3.
    """
    layout = []
    for s, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            layout.append((f"stages.{s}.downsample.attn_downsample", "down_attn"))
            layout.append((f"stages.{s}.downsample.mlp", "down_mlp"))
        for b in range(len(stage.blocks)):
            layout.append((f"stages.{s}.blocks.{b}.attn", "attn"))
            layout.append((f"stages.{s}.blocks.{b}.mlp", "mlp"))
    return layout


class LevitBackbone(nn.Module):
    """LeViT-384 at 224x224: token maps after the MiDaS-hooked residual blocks (14², 7², 4²)."""

    def __init__(self, *, timm_name: str, hooks: Sequence[int], img_size: int = 224):
        super().__init__()
        self.model = timm.create_model(timm_name, pretrained=False, num_classes=0)
        if getattr(self.model, "use_conv", False):
            raise ValueError(f"{timm_name}: the conv-mode LeViT is not a MiDaS backbone")
        layout = levit_flat_layout(self.model)
        self.taps = []  # (stage, block or -1 for the downsample) after which a feature is taken
        for h in hooks:
            prefix, kind = layout[int(h)]
            parts = prefix.split(".")
            if kind == "mlp":
                self.taps.append((int(parts[1]), int(parts[3])))
            elif kind == "down_mlp":
                self.taps.append((int(parts[1]), -1))
            else:
                raise ValueError(f"LeViT hook {h} ends inside a block ({prefix}); MiDaS hooks end blocks")
        self.img_size = img_size

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, 3, 224, 224) -> 3 maps (B, C_i, g_i, g_i), g = 14, 7, 4."""
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"LeViT takes exactly {self.img_size}x{self.img_size} inputs (its attention "
                             f"biases are per position), got {x.shape[-2]}x{x.shape[-1]}")
        m = self.model
        t = m.stem(x)  # (B, C, 14, 14)
        g0 = int(t.shape[-1])
        t = t.flatten(2).transpose(1, 2)  # (B, 196, C)
        want = list(self.taps)
        taken = []
        last_stage = max(s for s, _ in want)
        for s, stage in enumerate(m.stages[: last_stage + 1]):
            t = stage.downsample(t)
            if (s, -1) in want:
                taken.append((s, t))
            for b, blk in enumerate(stage.blocks):
                if s == last_stage and all(b > bb for ss, bb in want if ss == s):
                    break  # nothing later in this stage is needed
                t = blk(t)
                if (s, b) in want:
                    taken.append((s, t))
        out = []
        for s, f in taken:
            g = -(-g0 // 2 ** s)  # ceil: 14, 7, 4
            bsz, n, c = f.shape
            out.append(f.transpose(1, 2).reshape(bsz, c, g, g))  # (B, C, g, g)
        return out


def make_backbone(spec: MidasSpec) -> nn.Module:
    """The backbone adapter for ``spec`` (random init)."""
    if spec.backbone == "beit":
        return BeitBackbone(timm_name=spec.timm_name, hooks=spec.hooks, in_channels=spec.in_channels,
                            vit_features=spec.vit_features)
    if spec.backbone in ("swin", "swin2"):
        return SwinBackbone(timm_name=spec.timm_name, hooks=spec.hooks)
    if spec.backbone == "levit":
        return LevitBackbone(timm_name=spec.timm_name, hooks=spec.hooks, img_size=spec.net_h)
    if spec.backbone in ("vit", "hybrid"):
        return VitBackbone(timm_name=spec.timm_name, hooks=spec.hooks, in_channels=spec.in_channels,
                           vit_features=spec.vit_features, hybrid=spec.backbone == "hybrid")
    raise ValueError(f"unknown backbone family {spec.backbone!r} in spec {spec.model_type}")
