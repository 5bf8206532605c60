"""The MiDaS 3.1 DPT model zoo: one frozen spec per model type, and ``create_model``.

A spec carries everything that must travel with the weights (timm's ``PretrainedCfg`` habit):
the architecture (timm backbone name, hooked blocks, reassemble widths), run.py's preprocessing
(net size, resize rule, mean/std, interpolation), the official weights file and where users get
it, and what the output means. The spec is part of the depth-cache key, so every field that
changes results is here and nothing else is.

Facts: the project's research notes, research/midas.md §1.2 (model table) and §2 (wiring), checked
against isl-org/MiDaS at 4545977 (``midas/model_loader.py``, ``midas/dpt_depth.py``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .dpt import MidasDpt
from .families import get_family

OUTPUT_MEANING = "relative inverse depth (larger = nearer)"

_URL_V31 = "https://github.com/isl-org/MiDaS/releases/download/v3_1/"
_URL_V3 = "https://github.com/isl-org/MiDaS/releases/download/v3/"


@dataclass(frozen=True)
class MidasSpec:
    """What one MiDaS 3.1 model type is, how run.py feeds it, and what it returns."""

    model_type: str
    backbone: str  # adapter family (dkp_core.midas.families): "beit" | "swin2" | "swin" | "levit" | "vit" | "hybrid"
    timm_name: str  # timm >= 1.0 model name of the backbone (built with pretrained=False)
    hooks: Tuple[int, ...]  # MiDaS hook indices (flat block indices in the timm 0.6 layout)
    in_channels: Tuple[int, ...]  # channels of the reassembled features fed to scratch.layerN_rn
    vit_features: int  # token width of the transformer (0 for the hierarchical backbones)
    net_w: int  # run.py net_w: width the resize rule aims at
    net_h: int  # run.py net_h
    keep_aspect_ratio: bool  # False: every input becomes exactly net_h x net_w (Swin, Swin2, LeViT)
    resize_method: str = "minimal"  # run.py's Resize(resize_method=...): scale as little as possible
    ensure_multiple_of: int = 32
    mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)  # MiDaS's values, not timm's ImageNet ones
    std: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "cv2.INTER_CUBIC"  # on float64 RGB in [0, 1], no antialias, no clipping
    features: int = 256  # DPT decoder width
    head_features_1: int = 256  # input width of the head (LeViT: 64, after stem_transpose)
    head_features_2: int = 32
    patch_size: int = 16  # token stride of the ViT-style backbones
    weights_file: str = ""  # official checkpoint file name
    weights_url: str = ""  # where users download it
    output_meaning: str = OUTPUT_MEANING

    @property
    def resize_mode(self) -> str:
        """``"minimal"`` (keep aspect, multiple of 32, scale closest to 1) or ``"square"``."""
        return "minimal" if self.keep_aspect_ratio else "square"

    def to_dict(self) -> dict:
        """Plain JSON-able dict (for artifact keys and HDF5 attributes)."""
        d = dataclasses.asdict(self)
        d["resize_mode"] = self.resize_mode
        return d


def _beit(model_type: str, timm_name: str, size: int, large: bool) -> MidasSpec:
    return MidasSpec(
        model_type=model_type, backbone="beit", timm_name=timm_name,
        hooks=(5, 11, 17, 23) if large else (2, 5, 8, 11),
        in_channels=(256, 512, 1024, 1024) if large else (96, 192, 384, 768),
        vit_features=1024 if large else 768,
        net_w=size, net_h=size, keep_aspect_ratio=True,
        weights_file=f"{model_type}.pt", weights_url=_URL_V31 + f"{model_type}.pt")


def _swin(model_type: str, backbone: str, timm_name: str, size: int, hooks, in_channels) -> MidasSpec:
    return MidasSpec(
        model_type=model_type, backbone=backbone, timm_name=timm_name, hooks=tuple(hooks),
        in_channels=tuple(in_channels), vit_features=0, net_w=size, net_h=size,
        keep_aspect_ratio=False, patch_size=4,
        weights_file=f"{model_type}.pt", weights_url=_URL_V31 + f"{model_type}.pt")


_SPECS = {s.model_type: s for s in (
    _beit("dpt_beit_large_512", "beit_large_patch16_512", 512, large=True),
    _beit("dpt_beit_large_384", "beit_large_patch16_384", 384, large=True),
    _beit("dpt_beit_base_384", "beit_base_patch16_384", 384, large=False),
    _swin("dpt_swin2_large_384", "swin2", "swinv2_large_window12to24_192to384", 384,
          (1, 1, 17, 1), (192, 384, 768, 1536)),
    _swin("dpt_swin2_base_384", "swin2", "swinv2_base_window12to24_192to384", 384,
          (1, 1, 17, 1), (128, 256, 512, 1024)),
    _swin("dpt_swin2_tiny_256", "swin2", "swinv2_tiny_window16_256", 256,
          (1, 1, 5, 1), (96, 192, 384, 768)),
    _swin("dpt_swin_large_384", "swin", "swin_large_patch4_window12_384", 384,
          (1, 1, 17, 1), (192, 384, 768, 1536)),
    MidasSpec(
        model_type="dpt_levit_224", backbone="levit", timm_name="levit_384", hooks=(3, 11, 21),
        in_channels=(384, 512, 768), vit_features=0, net_w=224, net_h=224,
        keep_aspect_ratio=False, head_features_1=64, head_features_2=8,
        weights_file="dpt_levit_224.pt", weights_url=_URL_V31 + "dpt_levit_224.pt"),
    MidasSpec(
        model_type="dpt_large_384", backbone="vit", timm_name="vit_large_patch16_384",
        hooks=(5, 11, 17, 23), in_channels=(256, 512, 1024, 1024), vit_features=1024,
        net_w=384, net_h=384, keep_aspect_ratio=True,
        weights_file="dpt_large_384.pt", weights_url=_URL_V3 + "dpt_large_384.pt"),
    MidasSpec(
        model_type="dpt_hybrid_384", backbone="hybrid", timm_name="vit_base_r50_s16_384",
        hooks=(0, 1, 8, 11), in_channels=(256, 512, 768, 768), vit_features=768,
        net_w=384, net_h=384, keep_aspect_ratio=True,
        weights_file="dpt_hybrid_384.pt", weights_url=_URL_V3 + "dpt_hybrid_384.pt"),
)}


def list_models() -> list[str]:
    """Names of every supported model type, sorted."""
    return sorted(_SPECS)


def get_spec(name: str) -> MidasSpec:
    """The spec of ``name``; ValueError listing the valid names when it is unknown."""
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown MiDaS model type {name!r}; valid: {', '.join(list_models())}") from None


def create_model(name: str, *, device: Optional[torch.device | str] = None) -> torch.nn.Module:
    """Build ``name`` with random weights (timm ``pretrained=False``; nothing is downloaded).

    Returns a :class:`~dkp_core.midas.dpt.MidasDpt` in eval mode: ``(B, 3, H, W)`` normalised
    input -> ``(B, H, W)`` relative inverse depth. ``device="meta"`` builds without memory
    (shape checks).
    """
    spec = get_spec(name)
    family = get_family(spec.backbone)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = MidasDpt(
            backbone=family.build(spec), in_channels=spec.in_channels, features=spec.features,
            head_features_1=spec.head_features_1, head_features_2=spec.head_features_2,
            levit_stem=family.transposed_stem)
    return model.eval()

