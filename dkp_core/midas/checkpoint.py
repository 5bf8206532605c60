"""Official MiDaS 3.1 checkpoint layout <-> our module tree (pure: state dicts in and out, nothing read).

Official files are the state dict of ``midas.dpt_depth.DPTDepthModel`` built on timm 0.6:
``pretrained.model.*`` (timm 0.6 backbone, with its unused ImageNet head),
``pretrained.act_postprocessN.*`` (reassemble), ``scratch.*`` (decoder). Our decoder keeps the
``scratch.*`` names, so only the backbone and the reassemble stage are renamed
(research/midas.md §2.1, §3.3): each family module (``families/``) holds its backbone's key maps
both ways, ``families/reassemble.py`` the reassemble stage's. Three kinds of keys are treated specially:

- derived buffers (index tables, attention masks): functions of the architecture that the
  official files store and timm >= 1.0 no longer does; accepted present or absent, not loaded;
- unused training left-overs, listed explicitly (:func:`ignored_patterns`): ImageNet heads (each family's ``ignored``) and the deepest
  fusion block's ``resConfUnit1``, which MiDaS stores but never runs; accepted present or absent;
- everything else must map onto exactly one of our parameters/buffers, and every one of ours
  must be filled, with the same shape. Anything else is a ValueError naming the keys.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from .families import get_family, reassemble
from .registry import get_spec

DERIVED_LEAVES = ("relative_position_index", "attn_mask", "attention_bias_idxs", "relative_coords_table")
_BACKBONE = "pretrained.model."


def ignored_patterns(model_type: str) -> Tuple[str, ...]:
    """Regexes of official keys that are dropped on purpose for ``model_type``."""
    spec = get_spec(model_type)
    deepest = len(spec.in_channels)
    return get_family(spec.backbone).ignored + (rf"scratch\.refinenet{deepest}\.resConfUnit1\.",)


def is_derived(key: str) -> bool:
    """True for architecture-determined buffers (index tables, masks) stored in official files."""
    return key.rsplit(".", 1)[-1] in DERIVED_LEAVES


def convert_official_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], model_type: str
                                ) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """Map an official state dict onto ``model``'s keys.

    Returns (converted state dict, dropped derived keys, dropped ignored keys). Keys that match
    no rule are passed through unchanged, so the caller's comparison reports them as unexpected.
    """
    ignored_re = [re.compile(p) for p in ignored_patterns(model_type)]
    backbone_map = get_family(get_spec(model_type).backbone).official_to_ours(model.pretrained.model)
    out, derived, ignored = {}, [], []
    for key, value in state_dict.items():
        if is_derived(key):
            derived.append(key)
            continue
        if any(r.match(key) for r in ignored_re):
            ignored.append(key)
            continue
        if key.startswith(_BACKBONE):
            new = _BACKBONE + backbone_map(key[len(_BACKBONE):])
        else:
            new = reassemble.official_to_ours(key)
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


def official_layout_state_dict(model: nn.Module, model_type: str) -> Dict[str, torch.Tensor]:
    """``model``'s state dict (from ``create_model``) under the official MiDaS 3.1 checkpoint key names.

    The inverse of :func:`convert_official_state_dict` (derived buffers and unused heads left out, which
    the loader accepts): saved with ``torch.save``, a file that loads like a downloaded checkpoint, e.g.
    random weights for a benchmark that needs no download. Tensors are detached copies.
    """
    backbone_map = get_family(get_spec(model_type).backbone).ours_to_official(model.pretrained.model)
    out = {}
    for key, v in model.state_dict().items():
        if key.startswith(_BACKBONE):
            key = _BACKBONE + backbone_map(key[len(_BACKBONE):])
        else:
            key = reassemble.ours_to_official(key)
        out[key] = v.detach().clone()
    return out
