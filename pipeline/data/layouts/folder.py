"""The folder layout, for a dataset of your own (and what :mod:`pipeline.data.synth` writes): frames under
``images/``, optional ``keypoints.csv`` (pixels and a train/test split column; unlisted frames are unlabelled
training frames), optional ``depth/`` files that replace MiDaS, options in ``ROOT/dataset.yaml``."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.data.layouts.listing import Listing
from pipeline.data.paths import fail, require_dir, strip_ext, walk_images
from pipeline.data.spec import FOLDER_SPLITS, DatasetSpec
from pipeline.store.fingerprint import FingerprintMemo


def walk(spec: DatasetSpec, root: Path, memo: Optional[FingerprintMemo], progress: bool) -> Listing:
    """The listing of this layout under ``root`` (``memo``/``progress``: unused, the walkers' common signature)."""
    f = spec.files
    L = Listing(kp_units="pixels_xy")
    idir = require_dir(spec, root, f["images_dir"], f"put your frames in {root}/{f['images_dir']}/")
    images = walk_images(spec, root, idir, f["image_exts"])
    if not images:
        raise fail(spec, f"no images ({', '.join(f['image_exts'])}) in {idir}")
    prefix = f["images_dir"].rstrip("/") + "/"
    index: dict[str, int] = {}
    by_name: dict[str, int] = {}
    for rel in images:
        fid = strip_ext(rel[len(prefix):])
        if fid in index:
            raise fail(spec, f"duplicate frame id {fid!r}: {L.paths[index[fid]]!r} and {rel!r}; keep one file "
                             f"per frame name")
        index[fid] = len(L.ids)
        by_name[rel[len(prefix):]] = len(L.ids)
        L.ids.append(fid)
        L.paths.append(rel)
        L.splits.append("train")  # frames not in keypoints.csv are unlabelled training frames
        L.kp_sources.append("")
    csv_rel = f["keypoints_csv"]
    if (root / csv_rel).is_file():
        L.kp = _read_folder_csv(spec, root, csv_rel, index, by_name, L)
    elif spec.n_joints:
        L.kp = np.full((len(L.ids), spec.n_joints, 2), np.nan)
    ddir = root / f["depth_dir"]
    if ddir.is_dir():
        if spec.depth is None:
            raise fail(spec, f"{f['depth_dir']}/ found under {root} but nothing says what it holds: add "
                             f"'depth_kind: depth' (near = small) or 'depth_kind: inverse_depth' (near = large), "
                             f"and 'depth_scale: S' if the stored numbers need scaling, to "
                             f"{root / f['options_file']}")
        depths = walk_images(spec, root, ddir, (".png", ".npy"))
        dprefix = f["depth_dir"].rstrip("/") + "/"
        found: dict[str, str] = {}
        for rel in depths:
            did = strip_ext(rel[len(dprefix):])
            if did in found:
                raise fail(spec, f"two depth files for frame {did!r}: {found[did]!r} and {rel!r}; keep one")
            if did not in index:
                raise fail(spec, f"depth file {rel!r} has no frame {did!r} in {f['images_dir']}/; remove it or "
                                 f"add the frame")
            found[did] = rel
        lacking = [i for i in L.ids if i not in found]
        if lacking:
            raise fail(spec, f"{len(lacking)} frames have no depth file in {f['depth_dir']}/, e.g. {lacking[0]!r}; "
                             f"give every frame one (<frame>.png 16-bit or <frame>.npy float) or remove "
                             f"{f['depth_dir']}/ to use MiDaS")
        L.depths = [found[i] for i in L.ids]
    return L


def _read_folder_csv(spec: DatasetSpec, root: Path, csv_rel: str, index: dict[str, int], by_name: dict[str, int],
                     L: Listing) -> np.ndarray:
    try:
        with open(root / csv_rel, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's "CSV UTF-8" BOM
            rows = list(csv.reader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise fail(spec, f"{csv_rel} unreadable ({e})") from None
    if not rows:
        raise fail(spec, f"{csv_rel} is empty; expected a header frame,split,x0,y0,x1,y1,...")
    header = [h.strip() for h in rows[0]]
    n_coord = len(header) - 2
    expect = [f"{a}{j}" for j in range(max(n_coord, 0) // 2) for a in ("x", "y")]
    if header[:2] != ["frame", "split"] or n_coord <= 0 or n_coord % 2 or header[2:] != expect:
        raise fail(spec, f"{csv_rel}: header must be frame,split,x0,y0,x1,y1,... (pixels, x right, y down), "
                         f"got {','.join(header)!r}")
    J = n_coord // 2
    if spec.n_joints is not None and spec.n_joints != J:
        raise fail(spec, f"{csv_rel} has {J} joints (header) but the dataset says n_joints: {spec.n_joints}; "
                         f"fix one of them")
    kp = np.full((len(L.ids), J, 2), np.nan)  # (N, J, 2)
    seen: dict[int, int] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise fail(spec, f"{csv_rel} line {n}: {len(row)} cells, the header has {len(header)}")
        name, split = row[0].strip(), row[1].strip()
        i = index.get(name, by_name.get(name))
        if i is None:
            raise fail(spec, f"{csv_rel} line {n}: frame {name!r} has no image in {spec.files['images_dir']}/ "
                             f"(remove the row or add the image)")
        if i in seen:
            raise fail(spec, f"{csv_rel} line {n}: duplicate frame id {name!r} (first on line {seen[i]})")
        seen[i] = n
        if split not in FOLDER_SPLITS:
            raise fail(spec, f"{csv_rel} line {n}: split {split!r} is not one of {', '.join(FOLDER_SPLITS)}")
        L.splits[i] = split
        L.kp_sources[i] = f"{csv_rel} line {n}"
        cells = [c.strip() for c in row[2:]]
        for j in range(J):
            xs, ys = cells[2 * j], cells[2 * j + 1]
            if not xs and not ys:
                continue
            if not xs or not ys:
                raise fail(spec, f"{csv_rel} line {n}: joint {j} has only one coordinate; leave both x{j} and "
                                 f"y{j} empty for a missing joint")
            try:
                kp[i, j] = (float(xs), float(ys))
            except ValueError:
                raise fail(spec, f"{csv_rel} line {n}: joint {j} ({xs!r}, {ys!r}) is not a number") from None
            if not np.isfinite(kp[i, j]).all():
                raise fail(spec, f"{csv_rel} line {n}: joint {j} ({xs!r}, {ys!r}) is not finite; leave the "
                                 f"cells empty for a missing joint")
    return kp
