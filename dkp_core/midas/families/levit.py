"""LeViT-384 (MiDaS ``dpt_levit_224``): family ``levit``, 224x224 inputs only.

timm 0.6's LeViT was one flat ``blocks`` Sequential; timm >= 1.0 has stages, renamed conv-bn pairs and a
named stem, so the key maps go through :func:`levit_flat_layout` (which old block index is which new
module). The decoder gets MiDaS's LeViT ``stem_transpose``; the ImageNet heads (``head``, ``head_dist``)
are ignored.
"""
from __future__ import annotations

import re
from typing import List, Sequence, Tuple

import timm
import torch
import torch.nn as nn

from .family import Family, KeyMap, register


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


# Inside one old residual module: (old sub-path, new sub-path) (timm 0.6 -> 1.0 names), by kind.
_INNER = {
    "attn": (("m.qkv.c.", "qkv.linear."), ("m.qkv.bn.", "qkv.bn."), ("m.proj.1.c.", "proj.ln.linear."),
             ("m.proj.1.bn.", "proj.ln.bn."), ("m.attention_biases", "attention_biases")),
    "mlp": (("m.0.c.", "ln1.linear."), ("m.0.bn.", "ln1.bn."), ("m.2.c.", "ln2.linear."), ("m.2.bn.", "ln2.bn.")),
    "down_attn": (("kv.c.", "kv.linear."), ("kv.bn.", "kv.bn."), ("q.1.c.", "q.ln.linear."),
                  ("q.1.bn.", "q.ln.bn."), ("proj.1.c.", "proj.ln.linear."), ("proj.1.bn.", "proj.ln.bn."),
                  ("attention_biases", "attention_biases")),
}
_INNER["down_mlp"] = _INNER["mlp"]


def official_to_ours(model: nn.Module) -> KeyMap:
    """timm 0.6 key -> timm >= 1.0 key, below ``pretrained.model.``, for the LeViT ``model``."""
    layout = levit_flat_layout(model)

    def fn(sub: str) -> str:
        m = re.match(r"patch_embed\.(\d+)\.(c|bn)\.(.*)$", sub)
        if m:  # stem: conv-bn at Sequential indices 0, 2, 4, 6 (activations between)
            idx = int(m.group(1))
            if idx % 2 == 0 and idx <= 6:
                return f"stem.conv{idx // 2 + 1}.{'linear' if m.group(2) == 'c' else 'bn'}.{m.group(3)}"
            return sub
        m = re.match(r"blocks\.(\d+)\.(.*)$", sub)
        if m and int(m.group(1)) < len(layout):
            prefix, kind = layout[int(m.group(1))]
            rest = m.group(2)
            for old, new in _INNER[kind]:
                if rest.startswith(old):
                    return f"{prefix}.{new}{rest[len(old):]}"
        return sub

    return fn


def ours_to_official(model: nn.Module) -> KeyMap:
    """The inverse of :func:`official_to_ours`."""
    blocks = [(prefix + ".", i, _INNER[kind]) for i, (prefix, kind) in enumerate(levit_flat_layout(model))]

    def fn(sub: str) -> str:
        m = re.match(r"stem\.conv(\d)\.(linear|bn)\.(.*)$", sub)
        if m:
            return f"patch_embed.{2 * (int(m.group(1)) - 1)}.{'c' if m.group(2) == 'linear' else 'bn'}.{m.group(3)}"
        for prefix, i, pairs in blocks:
            if sub.startswith(prefix):
                rest = sub[len(prefix):]
                for old, new in pairs:
                    if rest.startswith(new):
                        return f"blocks.{i}.{old}{rest[len(new):]}"
        return sub

    return fn


register(Family(
    name="levit",
    build=lambda spec: LevitBackbone(timm_name=spec.timm_name, hooks=spec.hooks, img_size=spec.net_h),
    official_to_ours=official_to_ours, ours_to_official=ours_to_official,
    ignored=(r"pretrained\.model\.head\.", r"pretrained\.model\.head_dist\."), transposed_stem=True))
