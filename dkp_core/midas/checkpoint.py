"""Official MiDaS 3.1 checkpoint layout -> our module tree (pure: state dict in, nothing read).

Official files are the state dict of ``midas.dpt_depth.DPTDepthModel`` built on timm 0.6:
``pretrained.model.*`` (timm 0.6 backbone, with its unused ImageNet head),
``pretrained.act_postprocessN.*`` (reassemble), ``scratch.*`` (decoder). Our decoder keeps the
``scratch.*`` names, so only the backbone and the reassemble stage are renamed
(research/midas.md §2.1, §3.3). Three kinds of keys are treated specially:

- derived buffers (index tables, attention masks): functions of the architecture that the
  official files store and timm >= 1.0 no longer does; accepted present or absent, not loaded;
- unused training left-overs, listed explicitly (``IGNORED``): ImageNet heads and the deepest
  fusion block's ``resConfUnit1``, which MiDaS stores but never runs; accepted present or absent;
- everything else must map onto exactly one of our parameters/buffers, and every one of ours
  must be filled, with the same shape. Anything else is a ValueError naming the keys.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from .backbones import levit_flat_layout
from .registry import get_spec

DERIVED_LEAVES = ("relative_position_index", "attn_mask", "attention_bias_idxs", "relative_coords_table")

# Unused parts of the official checkpoint, by backbone family (regexes on official keys).
_IGNORED_BACKBONE = {
    "beit": (r"pretrained\.model\.head\.",),
    "swin": (r"pretrained\.model\.head\.",),
    "swin2": (r"pretrained\.model\.head\.",),
    "levit": (r"pretrained\.model\.head\.", r"pretrained\.model\.head_dist\."),
    "vit": (r"pretrained\.model\.head\.",),
    "hybrid": (r"pretrained\.model\.head\.",),
}


def ignored_patterns(model_type: str) -> Tuple[str, ...]:
    """Regexes of official keys that are dropped on purpose for ``model_type``."""
    spec = get_spec(model_type)
    deepest = len(spec.in_channels)
    return _IGNORED_BACKBONE[spec.backbone] + (rf"scratch\.refinenet{deepest}\.resConfUnit1\.",)


def is_derived(key: str) -> bool:
    """True for architecture-determined buffers (index tables, masks) stored in official files."""
    return key.rsplit(".", 1)[-1] in DERIVED_LEAVES


def _rename_reassemble(key: str) -> str:
    m = re.match(r"pretrained\.act_postprocess(\d)\.(.*)$", key)
    if m is None:
        return key
    level, rest = int(m.group(1)) - 1, m.group(2)
    for old, new in (("0.project.0.", "readout."), ("3.", "conv."), ("4.", "resample.")):
        if rest.startswith(old):
            return f"pretrained.reassemble.{level}.{new}{rest[len(old):]}"
    return key  # left unmapped: reported as unexpected


def _swin_backbone_map(sub: str) -> str:
    # timm >= 0.9 moved PatchMerging from the end of stage i to the start of stage i + 1.
    m = re.match(r"layers\.(\d+)\.downsample\.(.*)$", sub)
    if m:
        return f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    return sub


def _levit_backbone_map(model: nn.Module) -> Callable[[str], str]:
    layout = levit_flat_layout(model.pretrained.model)
    # Inside one old residual module: old sub-path -> new sub-path (timm 0.6 -> 1.0 names).
    inner = {
        "attn": (("m.qkv.c.", "qkv.linear."), ("m.qkv.bn.", "qkv.bn."), ("m.proj.1.c.", "proj.ln.linear."),
                 ("m.proj.1.bn.", "proj.ln.bn."), ("m.attention_biases", "attention_biases")),
        "mlp": (("m.0.c.", "ln1.linear."), ("m.0.bn.", "ln1.bn."), ("m.2.c.", "ln2.linear."),
                ("m.2.bn.", "ln2.bn.")),
        "down_attn": (("kv.c.", "kv.linear."), ("kv.bn.", "kv.bn."), ("q.1.c.", "q.ln.linear."),
                      ("q.1.bn.", "q.ln.bn."), ("proj.1.c.", "proj.ln.linear."), ("proj.1.bn.", "proj.ln.bn."),
                      ("attention_biases", "attention_biases")),
    }
    inner["down_mlp"] = inner["mlp"]

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
            for old, new in inner[kind]:
                if rest.startswith(old):
                    return f"{prefix}.{new}{rest[len(old):]}"
        return sub

    return fn


def convert_official_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], model_type: str
                                ) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """Map an official state dict onto ``model``'s keys.

    Returns (converted state dict, dropped derived keys, dropped ignored keys). Keys that match
    no rule are passed through unchanged, so the caller's comparison reports them as unexpected.
    """
    spec = get_spec(model_type)
    ignored_re = [re.compile(p) for p in ignored_patterns(model_type)]
    if spec.backbone in ("swin", "swin2"):
        backbone_map = _swin_backbone_map
    elif spec.backbone == "levit":
        backbone_map = _levit_backbone_map(model)
    else:
        backbone_map = lambda sub: sub  # noqa: E731 - BEiT/ViT/hybrid names are unchanged in timm 1.0
    out, derived, ignored = {}, [], []
    for key, value in state_dict.items():
        if is_derived(key):
            derived.append(key)
            continue
        if any(r.match(key) for r in ignored_re):
            ignored.append(key)
            continue
        if key.startswith("pretrained.model."):
            new = "pretrained.model." + backbone_map(key[len("pretrained.model."):])
        else:
            new = _rename_reassemble(key)
        out[new] = value
    return out, derived, ignored


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], model_type: str) -> None:
    """Load an official MiDaS checkpoint (plain state dict) into ``model`` (from ``create_model``).

    Strict: every non-derived, non-ignored key must be used and every parameter/buffer of the
    model filled with a tensor of the same shape; otherwise ValueError naming the missing,
    unexpected and mis-shaped keys (first few of each). Derived buffers and the explicit
    ``ignored_patterns`` are accepted present or absent.
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise ValueError(f"expected a state dict (str -> tensor), got {type(state_dict).__name__}")
    converted, _, _ = convert_official_state_dict(model, state_dict, model_type)
    ours = model.state_dict()
    missing = [k for k in ours if k not in converted]
    unexpected = [k for k in converted if k not in ours]
    mis_shaped = [f"{k}: file {tuple(v.shape)} vs model {tuple(ours[k].shape)}" for k, v in converted.items()
                  if k in ours and (not torch.is_tensor(v) or tuple(v.shape) != tuple(ours[k].shape))]
    if missing or unexpected or mis_shaped:
        def _few(xs: List[str]) -> str:
            return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (after mapping): {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (after mapping): {_few(unexpected)}")
        if mis_shaped:
            parts.append(f"{len(mis_shaped)} with another shape: {_few(mis_shaped)}")
        raise ValueError(f"state dict does not fit MiDaS model type {model_type!r}: " + "; ".join(parts))
    model.load_state_dict(converted, strict=True)
    # timm's LeViT caches gathered attention biases per device in eval mode; ``train(mode)`` is
    # its public way to drop a cache that may hold the random-init biases.
    model.train(model.training)
