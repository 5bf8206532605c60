"""Build a :class:`~pipeline.data.manifest.Manifest`: walk a layout, check every path stays in the root,
fingerprint every frame (and mask/depth file), convert keypoints to pixels and range-check them.

Layouts walk exactly as AutoLink's loaders do (research/paper_autolink.md 3), quirks included; every problem a
user can fix is a :class:`~pipeline.errors.ManifestError` naming the file and the fix. Frame fingerprints come
from :mod:`pipeline.store.fingerprint` and are memoised, so a rebuild over unchanged files only ``stat``s them.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.data.layouts import WALKERS
from pipeline.data.layouts.listing import Listing
from pipeline.data.manifest import Manifest
from pipeline.data.paths import Inside, fail, refuse_duplicate_ids
from pipeline.data.spec import DatasetSpec, load_spec
from pipeline.data.images import probe_depth, probe_image
from pipeline.process import this_process
from pipeline.store.fingerprint import FingerprintMemo, Scan, Stats, scan_files, stat_files


def _to_pixels(L: Listing, sizes: np.ndarray) -> Optional[np.ndarray]:
    """(N, J, 2) float32 pixels (x, y) from the listing's units, given (N, 2) (W, H)."""
    if L.kp is None:
        return None
    if L.kp_units == "pixels_xy":
        return L.kp.astype(np.float32)
    if L.kp_units == "unit_rowcol":
        # (row, col) in [0, 1] where 0 and 1 are the first and last pixel centres -- the inverse of
        # AutoLink's detector output * 0.5 + 0.5, so the h36m protocol gets its numbers back exactly
        # with x / (W - 1), y / (H - 1).
        wh1 = (sizes - 1).astype(np.float64)[:, None, :]  # (N, 1, 2) (W-1, H-1)
        return (L.kp[..., ::-1] * wh1).astype(np.float32)
    raise AssertionError(L.kp_units)


def _check_range(spec: DatasetSpec, kp: np.ndarray, sizes: np.ndarray, L: Listing) -> None:
    m = spec.keypoint_margin
    wh = sizes.astype(np.float64)[:, None, :]  # (N, 1, 2)
    lo = -0.5 - m * wh
    hi = wh - 0.5 + m * wh
    with np.errstate(invalid="ignore"):
        bad = (kp < lo) | (kp > hi)  # NaN compares False: missing joints pass
    if bad.any():
        i, j, c = (int(v) for v in np.argwhere(bad)[0])
        W, H = (int(v) for v in sizes[i])
        src = L.source(i) or "annotations"
        raise fail(spec, f"joint {j} of frame {L.paths[i]!r} (from {src}) is at (x, y) = "
                         f"({kp[i, j, 0]:.2f}, {kp[i, j, 1]:.2f}) px, outside the {W}x{H} frame "
                         f"(margin {m:g} of the side; {int(bad.any(axis=(1, 2)).sum())} frames affected). "
                         f"Check the units (pixels, x right, y down) or raise keypoint_margin")


def build_manifest(name_or_yaml_path: str | os.PathLike, root: str | os.PathLike, *,
                   memo: Optional[FingerprintMemo] = None, progress: bool = True, frame_stride: int = 1) -> Manifest:
    """Walk dataset ``name_or_yaml_path`` (a ``data_manifests`` name or a YAML path) under ``root``.

    Reads annotations into docs/conventions.md, fingerprints every frame (and mask/depth file),
    reads each frame's size from its header while hashing it. ``memo`` defaults to the per-root memo
    in ``$DKP_CACHE_DIR/fingerprints``; unchanged files are not read again. Raises ManifestError for
    anything the user must fix. ``frame_stride``: every k-th frame of each video (the folder layout's videos/).
    """
    root_p = Path(root).expanduser()
    spec = load_spec(name_or_yaml_path, root_p)
    if not root_p.is_dir():
        raise fail(spec, f"root {root_p} is not a directory (pass the dataset's root with --root)")
    root_p = Path(os.path.abspath(root_p))
    if memo is None:
        memo = FingerprintMemo.for_root(root_p)
    if frame_stride != 1 and spec.layout != "folder":
        raise fail(spec, f"data.frame_stride {frame_stride} takes every k-th frame of videos, which only the folder "
                         f"layout reads (this is {spec.layout}); remove the setting")
    stride = {"frame_stride": frame_stride} if frame_stride != 1 else {}  # only the folder walker takes it
    L = WALKERS[spec.layout](spec, root_p, memo, progress, **stride)

    if not L.ids_unique:
        refuse_duplicate_ids(spec, L.ids, lambda fid, a, b: f"duplicate frame id {fid!r}: {L.paths[a]!r} and "
                                                            f"{L.paths[b]!r} (listed twice in the annotations?)")
    # Every file is stat'ed once, before anything is read: the stat says what is a symlink (checked to stay in
    # the root), and the memo compares it with what it recorded (a rebuild reads nothing).
    inside = Inside(spec, root_p)
    mask_rels = [r for r in L.masks or [] if r is not None]
    # the image files among the frames (video frames are the walker's: it checked and scanned their videos)
    images = L.paths if L.video_frames is None else [p for p, v in zip(L.paths, L.video_frames) if v is None]
    frame_st = _stat(spec, inside, images, "frame", L.stats.get("paths"))
    mask_st = _stat(spec, inside, mask_rels, "mask") if L.masks is not None else None
    depth_st = _stat(spec, inside, L.depths, "depth file", L.stats.get("depths")) if L.depths is not None else None

    fingerprints, sizes, orient = _frame_infos(spec, root_p, L, images, frame_st, memo, progress)  # (N, 2) (W, H)
    kp = _to_pixels(L, sizes)
    if kp is not None:
        _check_range(spec, kp, sizes, L)
    mask_fps = None
    if spec.apply_masks and (L.masks is None or None in L.masks):
        raise fail(spec, f"the description says apply_masks: true but not every frame has a mask (this layout "
                         f"lists masks from files.masks_dir, {spec.files.get('masks_dir')!r}); set that folder or "
                         f"drop apply_masks")
    if L.masks is not None:
        present = [i for i, m in enumerate(L.masks) if m is not None]
        minfos = _scan(spec, root_p, mask_rels, memo, progress, probe_image, ("wh",), "masks", mask_st)
        if spec.apply_masks:  # the mask multiplies the frame pixel by pixel: same size or nothing lines up
            mwh = minfos.column("wh").reshape(-1, 2)
            bad = np.flatnonzero((mwh != sizes[present]).any(axis=1))
            if len(bad):
                k, i = int(bad[0]), present[int(bad[0])]
                raise fail(spec, f"mask {L.masks[i]!r} is {mwh[k][0]}x{mwh[k][1]} but its frame "
                                 f"{L.paths[i]!r} is {sizes[i][0]}x{sizes[i][1]}; a mask must match its frame")
        fps = iter(minfos.fingerprints)
        mask_fps = [next(fps) if m is not None else None for m in L.masks]
    depth_fps = None
    if L.depths is not None:
        dinfos = _scan(spec, root_p, L.depths, memo, progress, probe_depth, ("wh", "depth_format"), "depth", depth_st)
        dwh = dinfos.column("wh").reshape(-1, 2)
        bad = np.flatnonzero((dwh != sizes).any(axis=1))
        if len(bad):
            i = int(bad[0])
            raise fail(spec, f"depth file {L.depths[i]!r} is {dwh[i][0]}x{dwh[i][1]} but its "
                             f"frame {L.paths[i]!r} is {sizes[i][0]}x{sizes[i][1]}; depth must match the frame")
        depth_fps = dinfos.fingerprints
    return Manifest(spec=spec, root=root_p, frame_ids=L.ids, paths=L.paths, splits=L.splits,
                    fingerprints=fingerprints, sizes=sizes, keypoints=kp,
                    mask_paths=L.masks, mask_fingerprints=mask_fps, depth_paths=L.depths,
                    depth_fingerprints=depth_fps,
                    orientations=None if (orient == 1).all() else orient.astype(int).tolist(),
                    video_frames=L.video_frames)


def _frame_infos(spec: DatasetSpec, root: Path, L: Listing, rels: list[str], st: Stats,
                 memo: Optional[FingerprintMemo], progress: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per frame: fingerprint, (W, H) and EXIF orientation: ``(fingerprints, (N, 2) int64, (N,) int)``. The image
    files ``rels`` (stats ``st``) are scanned here; a video frame's come from its video's scan (the walker's), its
    fingerprint from the video's bytes, the frame and the decode settings (orientation 1: the rotation is applied
    when the frame is decoded)."""
    infos = _scan(spec, root, rels, memo, progress, probe_image, ("wh", "orientation"), "frames", st)
    vf = L.video_frames
    if vf is None:  # image files only: columns straight from the scan
        return (infos.fingerprints, infos.column("wh").astype(np.int64).reshape(len(infos), 2),
                infos.column("orientation"))
    from pipeline.data.video import frame_fingerprint

    images = [i for i, v in enumerate(vf) if v is None]
    n = len(vf)
    fingerprints: list = [None] * n
    sizes = np.zeros((n, 2), dtype=np.int64)
    orient = np.ones(n, dtype=np.int64)
    for k, i in enumerate(images):
        fingerprints[i] = infos.fingerprints[k]
    if images:
        sizes[images] = infos.column("wh").astype(np.int64).reshape(len(images), 2)
        orient[images] = infos.column("orientation")
    for i, v in enumerate(vf):
        if v is not None:
            video = L.videos[L.paths[i]]
            fingerprints[i] = frame_fingerprint(video.fingerprint, v[0])
            sizes[i] = video.extra["wh"]
    return fingerprints, sizes, orient


def _stat(spec: DatasetSpec, inside: Inside, rels: list[str], what: str, known: Optional[Stats] = None) -> Stats:
    """One ``lstat`` per file (:func:`stat_files`; ``known``: what the walker already stat'ed); missing files and
    symlinks leaving the root are named errors."""
    try:
        st = known if known is not None and len(known.ino) == len(rels) else stat_files(inside.root, rels)
    except FileNotFoundError as e:
        root = str(inside.root).rstrip(os.sep) + os.sep
        rel = str(e.filename)[len(root):] if str(e.filename).startswith(root) else e.filename
        raise fail(spec, f"{what} {rel!r} not found under root {inside.root} "
                         f"(did you pass the right --root?)") from None
    except OSError as e:
        raise fail(spec, f"{what} file {e.filename} unreadable: {e}; replace or remove it") from None
    inside.check_all(rels, st.link, what, st.dirs)
    return st


def _scan(spec: DatasetSpec, root: Path, rels: list[str], memo: Optional[FingerprintMemo], progress: bool,
          probe: Any, keys: tuple, desc: str, stats: Optional[Stats] = None) -> Scan:
    try:
        return scan_files(root, rels, memo, probe=probe, probe_keys=keys, progress=progress, desc=desc, stats=stats)
    except FileNotFoundError as e:
        raise fail(spec, f"file {e.filename} not found (was it removed while the manifest was built?)") from None
    except (OSError, ValueError) as e:
        name = getattr(e, "filename", None)  # OSErrors carry it; probe ValueErrors put the path in the text
        what = f"{desc} file {name}" if name else f"{desc} file"
        raise fail(spec, f"{what} unreadable: {e}; replace or remove it") from None


# --------------------------------------------------------------------------------------------------
# once per torchrun job

HANDOFF_DIR = ".handoff"  # under the store root: manifests rank 0 built for the other ranks of a job
_calls = 0  # build_manifest_once calls in this process: every rank makes them in the same order


def _agent_store():
    """(c10d store, rank) when this process is a rank > 1-process torchrun job whose elastic agent serves a store
    at MASTER_ADDR:MASTER_PORT (``TORCHELASTIC_USE_AGENT_STORE``), else None."""
    process = this_process()
    if not process.distributed or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import datetime

    from torch.distributed import PrefixStore, TCPStore

    # Followers wait while rank 0 hashes the dataset: hours for millions of frames on a network file system. A
    # rank that dies instead ends the whole job (torchrun stops the others), so no one waits for nothing.
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=datetime.timedelta(hours=24))
    prefix = f"dkp/manifest/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    return PrefixStore(prefix, store), process.rank


def build_manifest_once(name_or_yaml_path: str | os.PathLike, root: str | os.PathLike, *, store_root: Path,
                        progress: bool = True, frame_stride: int = 1) -> Manifest:
    """:func:`build_manifest`, walked and fingerprinted by one process of a job: under torchrun, rank 0 builds it
    and saves it under ``STORE/.handoff/`` (the store is shared by the nodes of a job), the other ranks wait on
    the job's c10d store for its path and load it; they neither stat nor read the dataset, and their fingerprint
    memos (node-local) do not matter. Outside torchrun (or without the elastic agent's store), this process
    builds it."""
    global _calls
    agent = _agent_store()
    if agent is None:
        return build_manifest(name_or_yaml_path, root, progress=progress, frame_stride=frame_stride)
    store, rank = agent
    _calls += 1
    tag = f"{_calls}/"
    if rank != 0:
        store.wait([tag + "done"])
        error = store.get(tag + "error").decode() if store.check([tag + "error"]) else ""
        if error:
            from pipeline.errors import ManifestError

            raise ManifestError(f"rank 0 could not build the manifest: {error}")
        return Manifest.load(store.get(tag + "path").decode(), root=os.path.abspath(Path(root).expanduser()))
    from pipeline.errors import DkpError

    try:
        m = build_manifest(name_or_yaml_path, root, progress=progress, frame_stride=frame_stride)
    except DkpError as e:
        store.set(tag + "error", str(e))
        store.set(tag + "done", "1")
        raise
    import uuid

    handoff = Path(store_root) / HANDOFF_DIR
    handoff.mkdir(parents=True, exist_ok=True)
    for old in handoff.glob("manifest-*"):  # other jobs' hand-offs, long read
        if time.time() - old.stat().st_mtime > 2 * 86400:
            old.unlink(missing_ok=True)
    path = m.save(handoff / f"manifest-{uuid.uuid4().hex[:16]}.json")
    store.set(tag + "path", str(path))
    store.set(tag + "done", "1")
    return m
