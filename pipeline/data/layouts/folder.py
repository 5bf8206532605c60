"""The folder layout, for a dataset of your own (and what :mod:`pipeline.data.synth` writes): frames under
``images/`` and/or videos under ``videos/`` (every frame of each, or every ``data.frame_stride``-th; frame id
``<video path under videos/>/<k>``, :mod:`pipeline.data.video`), optional ``keypoints.csv`` (pixels and a
train/test split column; unlisted frames are unlabelled training frames), optional ``depth/`` files that replace
MiDaS, options in ``ROOT/dataset.yaml``."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.data.layouts.listing import Listing
from pipeline.data.paths import fail, require_dir, strip_ext, walk_images
from pipeline.data.spec import FOLDER_SPLITS, DatasetSpec
from pipeline.data.video import VIDEOS_DIR
from pipeline.store.fingerprint import FingerprintMemo


def walk(spec: DatasetSpec, root: Path, memo: Optional[FingerprintMemo], progress: bool,
         frame_stride: int = 1) -> Listing:
    """The listing of this layout under ``root``; ``memo``/``progress`` serve the videos' scan (their frame lists),
    ``frame_stride`` keeps every k-th frame of each video."""
    f = spec.files
    L = Listing(kp_units="pixels_xy")
    vdir = root / f.get("videos_dir", VIDEOS_DIR)
    if vdir.is_dir() and not (root / f["images_dir"]).is_dir():
        images = []  # a dataset of videos only
    else:
        idir = require_dir(spec, root, f["images_dir"], f"put your frames in {root}/{f['images_dir']}/ or your "
                                                         f"videos in {vdir}/")
        images = walk_images(spec, root, idir, f["image_exts"])
        if not images and not vdir.is_dir():
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
    if vdir.is_dir():
        _add_videos(spec, root, vdir, memo, progress, frame_stride, index, L)
    elif frame_stride != 1:
        raise fail(spec, f"data.frame_stride {frame_stride} takes every k-th frame of each video, but there is no "
                         f"{vdir.name}/ under {root} (image files are always all listed); remove the setting")
    csv_rel = f["keypoints_csv"]
    if (root / csv_rel).is_file():
        L.kp = _read_folder_csv(spec, root, csv_rel, index, by_name, L, frame_stride)
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
            if did not in index and _not_listed(spec, did, L, frame_stride) is None:
                continue  # the depth of a video frame the stride leaves out
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


def _add_videos(spec: DatasetSpec, root: Path, vdir: Path, memo: Optional[FingerprintMemo], progress: bool,
                stride: int, index: dict[str, int], L: Listing) -> None:
    """Append the frames of every video under ``vdir`` (sorted by path; frames k = 0, stride, 2 stride, ...)."""
    from pipeline.data.paths import Inside
    from pipeline.data.video import VIDEO_EXTS, probe_video
    from pipeline.store.fingerprint import scan_files

    rels = walk_images(spec, root, vdir, VIDEO_EXTS)  # the same walk, for video extensions
    if not rels and not L.ids:
        raise fail(spec, f"no videos ({', '.join(VIDEO_EXTS)}) in {vdir} and no images; put your frames or videos "
                         f"there")
    if not rels:
        return
    inside = Inside(spec, root)
    for rel in rels:  # before anything is read: a symlink out of the root is refused, not scanned
        inside.check(rel, "video")
    try:
        infos = scan_files(root, rels, memo, probe=probe_video, probe_keys=("wh", "pts", "rotation"),
                           progress=progress, desc="videos")
    except (OSError, ValueError) as e:
        raise fail(spec, f"video unreadable: {e}; replace or remove it") from None
    prefix = vdir.relative_to(root).as_posix().rstrip("/") + "/"
    L.video_frames = [None] * len(L.ids)
    L.videos = {}
    for rel, fi in zip(rels, infos):
        L.videos[rel] = fi
        pts = fi.extra["pts"]
        for k in range(0, len(pts), stride):
            fid = f"{rel[len(prefix):]}/{k}"
            if fid in index:
                raise fail(spec, f"duplicate frame id {fid!r}: {L.paths[index[fid]]!r} and frame {k} of {rel!r}; "
                                 f"rename one")
            index[fid] = len(L.ids)
            L.ids.append(fid)
            L.paths.append(rel)
            L.splits.append("train")
            L.kp_sources.append("")
            L.video_frames.append([k, int(pts[k])])


def _not_listed(spec: DatasetSpec, name: str, L: Listing, stride: int) -> Optional[str]:
    """Why keypoints.csv's frame ``name`` has no frame (None: a video frame the stride leaves out, whose row is
    skipped: annotations of every frame stay valid whatever data.frame_stride is)."""
    video, _, k = name.rpartition("/")
    if L.videos and k.isdigit():
        for rel, fi in L.videos.items():
            if rel.endswith("/" + video):
                n = len(fi.extra["pts"])
                if int(k) >= n:
                    return f"is past the end of video {rel!r} ({n} frames: 0 to {n - 1})"
                return None if int(k) % stride else f"is not a frame of {rel!r}"
    return f"has no image in {spec.files['images_dir']}/ (remove the row or add the image)"


def _read_folder_csv(spec: DatasetSpec, root: Path, csv_rel: str, index: dict[str, int], by_name: dict[str, int],
                     L: Listing, stride: int = 1) -> np.ndarray:
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
            why = _not_listed(spec, name, L, stride)
            if why is None:
                continue
            raise fail(spec, f"{csv_rel} line {n}: frame {name!r} {why}")
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
