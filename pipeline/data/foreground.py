"""Do keypoints land on the figure? Heatmap mass inside the foreground mask vs the mask's area.

A detector that ignores the figure spreads its heatmap mass like the image area: mass ≈ area fraction.
Keypoints on the figure put far more mass inside it. Masks come from the dataset: the synthetic
generator re-renders a frame's mask from (seed, index) exactly; datasets with mask files (Human3.6M
without background) read them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline.data.images import resize_square


def _synthetic_config(root: Path):
    import yaml

    from dkp_core.synthetic import SyntheticConfig

    meta = yaml.safe_load((root / "dataset.yaml").read_text())
    par = meta["synthetic"]["parameters"]
    cfg = dict(par["config"])
    for k in ("figure_depth", "wall_depth"):
        if k in cfg and cfg[k] is not None:
            cfg[k] = tuple(cfg[k])
    return SyntheticConfig(**cfg), int(par["seed"])


def foreground_masks(manifest, indices: Sequence[int], size: int) -> Optional[np.ndarray]:
    """(N, size, size) float32 in {0, 1}: the figure's mask after the model's resize/crop, or None if unknown."""
    root = Path(manifest.root)
    out = []
    if manifest.mask_paths is not None and all(manifest.mask_paths[i] for i in indices):
        from pipeline.data.images import read_gray

        for i in indices:
            m = read_gray(root / manifest.mask_paths[i])
            out.append(resize_square((m > 127).astype(np.float32), size))
        return (np.stack(out) > 0.5).astype(np.float32)
    if (root / "dataset.yaml").exists():
        try:
            cfg, seed = _synthetic_config(root)
        except (KeyError, TypeError):
            return None
        from dkp_core.synthetic import render_frame

        for i in indices:
            fid = manifest.frame_ids[i]
            m = render_frame(cfg, seed, int(fid.lstrip("f"))).mask.astype(np.float32)
            out.append(resize_square(m, size))
        return (np.stack(out) > 0.5).astype(np.float32)
    return None


def heatmap_mass_in_mask(heatmaps: np.ndarray, masks: np.ndarray) -> dict:
    """Heatmaps (N, K, h, w) (each map sums to 1), masks (N, S, S) -> mean mass inside vs mean area fraction.

    The mask is averaged over each heatmap cell (S/h x S/h pixels), so a cell half on the figure counts half.
    Returns {"mass_in_mask", "mask_area", "ratio"}.
    """
    n, k, h, w = heatmaps.shape
    s = masks.shape[-1]
    if s % h:
        raise ValueError(f"mask size {s} is not a multiple of the heatmap size {h}")
    f = s // h
    cell = masks.reshape(n, h, f, w, f).mean(axis=(2, 4))  # (N, h, w) fraction of each cell on the figure
    mass = (heatmaps * cell[:, None]).sum(axis=(2, 3))  # (N, K)
    area = float(cell.mean())
    m = float(mass.mean())
    return {"mass_in_mask": m, "mask_area": area, "ratio": m / area if area > 0 else float("nan")}
