"""Taichi (motion-cosegmentation's release): frame folders per video, GT keypoints in a pandas pickle read
by :mod:`pipeline.data.safe_pickle`, optional test masks."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np

from pipeline.data.layouts.listing import Listing
from pipeline.data.paths import fail, require_dir, safe_relpath, strip_ext, walk_images
from pipeline.data.safe_pickle import SafeUnpickler, dataframe_columns
from pipeline.data.spec import DatasetSpec
from pipeline.errors import ManifestError
from pipeline.store.fingerprint import FingerprintMemo


def read_taichi_gt(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """File names and (M, J, 2) float64 (x, y) pixel GT (``-1`` kept) from a Taichi GT pickle, safely.

    Accepts the motion-cosegmentation pandas DataFrame (``file_name``, ``value`` columns) or a plain
    dict of those columns. Raises ManifestError for anything else, including pickles that name code.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(f).load()
        cols = dataframe_columns(obj)
        names = [str(x) for x in cols["file_name"]]
        values = np.stack([np.asarray(v, dtype=np.float64) for v in cols["value"]]) if names else np.zeros((0, 0, 2))
    except FileNotFoundError:
        raise
    except KeyError as e:
        raise ManifestError(f"Taichi GT {path}: no column {e} (expected file_name and value, as in "
                            f"motion-cosegmentation's landmarks/taichi_*_gt.pkl)") from None
    except Exception as e:  # any damage or refusal: the file cannot be used
        raise ManifestError(f"Taichi GT {path} unreadable ({type(e).__name__}: {e}); use the original "
                            f"landmarks/taichi_*_gt.pkl from motion-cosegmentation") from None
    if values.ndim != 3 or values.shape[2] != 2:
        raise ManifestError(f"Taichi GT {path}: 'value' entries have shape {values.shape[1:]}, expected (J, 2)")
    return names, values


def walk(spec: DatasetSpec, root: Path, memo: Optional[FingerprintMemo], progress: bool) -> Listing:
    """The listing of this layout under ``root`` (``memo``/``progress``: unused, the walkers' common signature)."""
    f = spec.files
    L = Listing(kp_units="pixels_xy")
    tdir = require_dir(spec, root, f["train_dir"], "the training videos' frame folders, <video>.mp4/<n>.png")
    # ImageFolder semantics: each sub-folder (a video) is a class; files directly in train/ are not frames.
    train = [r for r in walk_images(spec, root, tdir, f["train_exts"])
             if len(PurePosixPath(r).relative_to(PurePosixPath(f["train_dir"])).parts) >= 2]
    if not train:
        raise fail(spec, f"no training frames in {tdir}")
    J = spec.n_joints
    rows: list[np.ndarray] = []
    for rel in train:
        L.ids.append(strip_ext(rel))
        L.paths.append(rel)
        L.splits.append("train")
        L.kp_sources.append("")
    rows.append(np.full((len(train), J, 2), np.nan))
    masks_dir = f.get("test_masks_dir")
    have_masks = bool(masks_dir) and (root / masks_dir).is_dir()
    masks: list[Optional[str]] = [None] * len(train)
    for part in ("regress", "test"):
        gt_rel = f[f"{part}_gt"]
        img_dir = f[f"{part}_dir"]
        require_dir(spec, root, img_dir, "eval_images.tar.gz from motion-cosegmentation, extracted in the root")
        try:
            names, values = read_taichi_gt(root / gt_rel)
        except FileNotFoundError:
            raise fail(spec, f"GT file {gt_rel!r} not found under root {root} (copy motion-cosegmentation's "
                             f"landmarks/ into the root as {PurePosixPath(gt_rel).parent}/)") from None
        if values.shape[0] and values.shape[1] != J:
            raise fail(spec, f"GT file {gt_rel!r} has {values.shape[1]} joints per frame, expected {J}")
        # -1 marks a missing *coordinate* (AutoLink tests |v + 1| > 1e-6 per coordinate): only that component
        # becomes NaN. The protocol fits and scores each coordinate on its own, so a joint whose x is known and
        # y is not still counts for x, exactly as in AutoLink.
        values = np.where(np.abs(values + 1) <= 1e-6, np.nan, values)  # (M, J, 2)
        for i, name in enumerate(names):
            rel = safe_relpath(spec, root, f"{img_dir}/{name}", gt_rel)
            L.ids.append(strip_ext(rel))
            L.paths.append(rel)
            L.splits.append(part)
            L.kp_sources.append(gt_rel)
            mask = None
            if part == "test" and have_masks:
                mask = safe_relpath(spec, root, f"{masks_dir}/{name}", gt_rel)
            masks.append(mask)
        rows.append(values)
    L.kp = np.concatenate(rows)  # (N, J, 2)
    L.masks = masks if have_masks else None
    return L
