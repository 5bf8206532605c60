"""MiDaS backbone families, one module each, behind one registry (timm's habit: one file per model family).

- ``family.py``: the :class:`Family` record (adapter builder, official-key maps both ways, ignored keys)
  and the registry (``register``, ``get_family``, ``list_families``);
- ``reassemble.py``: MiDaS's readout/reassemble stage, shared by the token backbones (BEiT, ViT);
- ``beit.py`` (``beit``), ``vit.py`` (``vit``, ``hybrid``), ``swin.py`` (``swin``, ``swin2``),
  ``levit.py`` (``levit``): the adapters over timm >= 1.0 and their checkpoint key maps.

To add a family: write its module with its adapter and ``register(Family(...))``, import it below, and
give its model types a :class:`~dkp_core.midas.registry.MidasSpec` with ``backbone=<its name>``.
"""
from . import beit, levit, swin, vit  # noqa: F401 - importing a family module registers it
from .family import Family, KeyMap, get_family, list_families, register

__all__ = ["Family", "KeyMap", "get_family", "list_families", "register"]
