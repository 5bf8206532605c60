"""Dataset layouts: one module per on-disk layout, each with ``walk(spec, root, memo, progress) -> Listing``.

A walker lists a layout's frames, partitions, keypoint annotations (in the dataset's own units), masks and
depth files exactly as AutoLink's loader for it does; :mod:`pipeline.data.build` turns that
:class:`~pipeline.data.layouts.listing.Listing` into a manifest. To add a layout: write ``<name>.py`` with a
``walk``, register it in :data:`WALKERS` and add its name to :data:`pipeline.data.spec.LAYOUTS`.
"""
from __future__ import annotations

from pipeline.data.layouts import deepfashion, folder, human36m, taichi

WALKERS = {
    "human36m": human36m.walk,
    "taichi": taichi.walk,
    "deepfashion": deepfashion.walk,
    "folder": folder.walk,
}
