"""DeepFashion In-shop with Lorenz et al.'s split: per partition, ``data_<part>.csv`` lists the images under
``img/`` and ``data_<part>.json`` holds their (x, y) pixel keypoints, row by row."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.data.layouts.listing import Listing
from pipeline.data.paths import fail, require_dir, safe_relpath, strip_ext
from pipeline.data.spec import DatasetSpec
from pipeline.store.fingerprint import FingerprintMemo


def walk(spec: DatasetSpec, root: Path, memo: Optional[FingerprintMemo], progress: bool) -> Listing:
    """The listing of this layout under ``root`` (``memo``/``progress``: unused, the walkers' common signature)."""
    f = spec.files
    L = Listing(kp_units="pixels_xy")
    img_dir = f["images_dir"]
    require_dir(spec, root, img_dir, "DeepFashion In-shop Img/img, 256x256, placed in the root as img/")
    rows: list[np.ndarray] = []
    for part, pf in f["partitions"].items():
        csv_rel, json_rel = pf["csv"], pf["json"]
        try:
            with open(root / csv_rel, newline="") as fh:
                lines = list(csv.reader(fh))
        except FileNotFoundError:
            raise fail(spec, f"split file {csv_rel!r} not found under root {root} (copy data_*.csv and "
                             f"data_*.json from Lorenz et al.'s custom_datasets/deepfashion/)") from None
        except (OSError, csv.Error, UnicodeDecodeError) as e:
            raise fail(spec, f"split file {csv_rel!r} unreadable ({e})") from None
        if not lines or len(lines[0]) < 2 or lines[0][1].strip() != "filename":
            raise fail(spec, f"split file {csv_rel!r}: expected the header 'id,filename', got "
                             f"{','.join(lines[0]) if lines else '(empty file)'!r}")
        files = []
        for n, row in enumerate(lines[1:], start=2):
            if len(row) < 2 or not row[1].strip():
                raise fail(spec, f"split file {csv_rel!r} line {n}: no filename in {row!r}")
            files.append(row[1].strip())
        try:
            entries = json.loads((root / json_rel).read_text())
        except FileNotFoundError:
            raise fail(spec, f"keypoint file {json_rel!r} not found under root {root} (it ships beside "
                             f"{csv_rel} in Lorenz et al.'s split)") from None
        except (OSError, ValueError) as e:
            raise fail(spec, f"keypoint file {json_rel!r} unreadable ({e})") from None
        if not isinstance(entries, list) or len(entries) != len(files):
            n_e = len(entries) if isinstance(entries, list) else type(entries).__name__
            raise fail(spec, f"keypoint file {json_rel!r} has {n_e} entries but {csv_rel!r} has {len(files)} "
                             f"rows; they must be aligned row by row (same release of both files)")
        try:
            kp = np.asarray([e["keypoints"] for e in entries], dtype=np.float64)  # (M, J, 2) (x, y)
        except (KeyError, TypeError, ValueError) as e:
            raise fail(spec, f"keypoint file {json_rel!r}: entries need 'keypoints' as (J, 2) numbers ({e})") from None
        if len(files) and (kp.ndim != 3 or kp.shape[1:] != (spec.n_joints, 2)):
            raise fail(spec, f"keypoint file {json_rel!r}: keypoints have shape {kp.shape[1:]}, expected "
                             f"({spec.n_joints}, 2)")
        for name in files:
            rel = safe_relpath(spec, root, f"{img_dir}/{name}", csv_rel)
            L.ids.append(strip_ext(name))
            L.paths.append(rel)
            L.splits.append(part)
            L.kp_sources.append(json_rel)
        rows.append(kp.reshape(len(files), spec.n_joints, 2))
    L.kp = np.concatenate(rows)
    return L
