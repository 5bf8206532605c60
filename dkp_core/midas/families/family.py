"""What a MiDaS backbone family is, and the registry the family modules add themselves to.

A family is the value of :attr:`~dkp_core.midas.registry.MidasSpec.backbone`; everything that differs
between families lives in its own module (``beit.py``, ``swin.py``, ``levit.py``, ``vit.py``) as one
:class:`Family`: how to build the adapter, how the official (timm 0.6) backbone keys map onto ours and
back, and which official keys are unused on purpose. Nothing outside those modules tests a family name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch.nn as nn

KeyMap = Callable[[str], str]  # a backbone key below ``pretrained.model.`` -> the same key in the other layout


def same_key(sub: str) -> str:
    """The key map of a family whose timm >= 1.0 names equal the official file's."""
    return sub


def same_keys(_timm_model: nn.Module) -> KeyMap:
    return same_key


@dataclass(frozen=True)
class Family:
    """One backbone family (see the module docstring).

    ``build(spec)`` returns the adapter (random init): ``.model`` is the timm backbone, ``forward`` returns
    the features fed to ``scratch.layerN_rn``. ``official_to_ours(timm_model)`` and
    ``ours_to_official(timm_model)`` return the key maps below ``pretrained.model.`` (built from the
    backbone instance because LeViT's depends on its block layout). ``ignored`` are regexes of official
    keys that are dropped on purpose (ImageNet heads). ``transposed_stem``: the decoder upsamples the
    deepest-fused features with MiDaS's LeViT ``stem_transpose``.
    """

    name: str
    build: Callable[[Any], nn.Module]
    official_to_ours: Callable[[nn.Module], KeyMap] = same_keys
    ours_to_official: Callable[[nn.Module], KeyMap] = same_keys
    ignored: Tuple[str, ...] = (r"pretrained\.model\.head\.",)
    transposed_stem: bool = False


_FAMILIES: Dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` to the registry (each family module calls this once per family it defines)."""
    if family.name in _FAMILIES:
        raise ValueError(f"MiDaS backbone family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """The family called ``name``; ValueError listing the registered ones when it is unknown."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown MiDaS backbone family {name!r}; registered: {', '.join(list_families())}") \
            from None


def list_families() -> List[str]:
    return sorted(_FAMILIES)
