"""Human3.6M as AutoLink's loader reads it: subject/action frame folders, landmarks in MATLAB ``.mat`` files (v5 via
scipy, v7.3 via h5py), optional background masks."""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.data.layouts.listing import Listing
from pipeline.data.paths import fail, require_dir
from pipeline.data.spec import DatasetSpec
from pipeline.errors import ManifestError
from pipeline.store.fingerprint import FingerprintMemo, combine, scan_files
from pipeline.store.io import write_atomic

log = logging.getLogger(__name__)


def _read_h36m_mat(path: Path, key: str) -> np.ndarray:
    """``key`` of a MATLAB file as float64; v5 files via scipy (as AutoLink does), v7.3 (HDF5) via h5py."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x89HDF") or _is_hdf5(path):
        import h5py

        with h5py.File(path, "r") as h:
            # MATLAB v7.3 stores arrays column-major: an (A, B) matrix appears as (B, A).
            return np.asarray(h[key], dtype=np.float64).T
    try:
        import scipy.io
    except ImportError:
        raise ManifestError("reading Human3.6M landmarks (.mat, MATLAB v5) needs scipy: pip install scipy") from None
    return np.asarray(scipy.io.loadmat(str(path))[key], dtype=np.float64)


def _is_hdf5(path: Path) -> bool:
    # v7.3 MAT files are HDF5 with a 512-byte user block in front.
    with open(path, "rb") as f:
        f.seek(512)
        return f.read(4) == b"\x89HDF"


def _h36m_landmarks(spec: DatasetSpec, root: Path, rels: list[str], memo: Optional[FingerprintMemo],
                    progress: bool) -> np.ndarray:
    """(N, J, 2) float64 landmarks of the given .mat files, cached by their combined content hash."""
    key = spec.files.get("landmarks_key", "keypoints_2d")
    try:
        fps = [fi.fingerprint for fi in scan_files(root, rels, memo, progress=progress, desc="landmarks")]
    except OSError as e:
        raise fail(spec, f"landmark file unreadable: {e}") from None
    cache = None
    if memo is not None:
        cache = memo.path.parent / "annotations" / f"{combine(fps + [key])[5:]}.npy"
        try:
            arr = np.load(cache, allow_pickle=False)
            if arr.shape[0] == len(rels) and (not spec.n_joints or arr.shape[1:] == (spec.n_joints, 2)):
                return arr
        except (OSError, ValueError):
            pass  # no cache yet, or a corrupt one: parse again
    out = []
    for rel in rels:
        try:
            a = _read_h36m_mat(root / rel, key)
        except ManifestError:
            raise
        except Exception as e:  # scipy/h5py raise many types for damaged files
            raise fail(spec, f"landmark file {rel!r} unreadable ({type(e).__name__}: {e}); re-extract it "
                             f"from human_images.tar.gz") from None
        if a.ndim != 2 or a.shape[1] != 2 or (spec.n_joints and a.shape[0] != spec.n_joints):
            raise fail(spec, f"landmark file {rel!r}: '{key}' has shape {a.shape}, expected "
                             f"({spec.n_joints}, 2) (row, col) in [0, 1]")
        out.append(a)
    arr = np.stack(out) if out else np.zeros((0, spec.n_joints or 0, 2))  # (N, J, 2)
    if cache is not None:
        try:

            cache.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            write_atomic(cache, buf.getvalue())
        except OSError as e:
            log.warning("could not cache parsed landmarks in %s (%s)", cache, e)
    return arr


def walk(spec: DatasetSpec, root: Path, memo: Optional[FingerprintMemo], progress: bool) -> Listing:
    """The listing under ``root``: frames per subject/action, landmarks parsed once and cached via ``memo``."""
    f = spec.files
    L = Listing(kp_units="unit_rowcol", masks=[] if f.get("masks_dir") else None)
    ext = f.get("frame_ext", ".jpg")
    mats: list[str] = []
    for part, subjects in f["subjects"].items():
        for s in subjects:
            sdir = f["subject_dir"].format(subject=s)
            fdir = require_dir(spec, root, f"{sdir}/{f['frames_dir']}",
                               "is --root the extracted human_images/ directory?")
            actions = sorted(a for a in os.listdir(fdir)
                             if any(a.startswith(x) for x in f["actions"]) and (fdir / a).is_dir())
            for act in actions:
                for fn in sorted(os.listdir(fdir / act)):
                    if not fn.endswith(ext):
                        continue
                    stem = fn[: -len(ext)]
                    L.ids.append(f"{sdir}/{act}/{stem}")
                    L.paths.append(f"{sdir}/{f['frames_dir']}/{act}/{fn}")
                    L.splits.append(part)
                    mat = f"{sdir}/{f['landmarks_dir']}/{act}/{stem}.mat"
                    if not (root / mat).is_file():
                        raise fail(spec, f"landmark file {mat!r} for frame {L.paths[-1]!r} not found under "
                                         f"root {root} (incomplete extraction of human_images.tar.gz?)")
                    mats.append(mat)
                    if L.masks is not None:
                        mask = f"{sdir}/{f['masks_dir']}/{act}/{stem}.png"
                        if not (root / mask).is_file():
                            raise fail(spec, f"mask {mask!r} for frame {L.paths[-1]!r} not found under root "
                                             f"{root} (the folder is spelt 'BackgroudMask' in the release)")
                        L.masks.append(mask)
        if not any(sp == part for sp in L.splits):
            raise fail(spec, f"no frames for partition {part!r} (subjects {subjects}, actions "
                             f"{', '.join(f['actions'])}) under root {root}")
    L.kp = _h36m_landmarks(spec, root, mats, memo, progress)
    L.kp_sources = mats
    return L
