"""The pieces a stage's fingerprint is made of: what it reads of the dataset, as the named parts that enter its
artifact key (each stage composes its own in its declaration, ``Stage.reads``, pipeline/stages/<name>/__init__.py).

A stage's key must change when, and only when, something it reads changes (a stale result reported
fresh is the worst bug this tool can have; a needless rebuild of a depth cache costs hours). So each
stage's fingerprint is a small dict of named parts, one per thing it reads, and ``status`` names the
part that changed (:func:`describe`). Here: digests of arrays and values, the frames' identity (unchanged since
schema 1, so existing depth caches stay valid), index sets, annotations, masks, the synthetic block of
``ROOT/dataset.yaml``, and the words for a part that changed.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from pipeline.store.io import canonical_json
from pipeline.store.fingerprint import combine


def digest(*parts: Any) -> str:
    """``"xxh3:<hex>"`` of arrays (dtype, shape and bytes; NaN included) and JSON-able values, in order."""
    import xxhash

    h = xxhash.xxh3_128()
    for p in parts:
        if isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(_json_bytes(p))
        h.update(b"\x00")
    return "xxh3:" + h.hexdigest()


_PLAIN = re.compile(r'[^\x20-\x7e]|["\\]')  # what JSON would escape in a string (ensure_ascii)


def _json_bytes(p: Any) -> bytes:
    """``canonical_json(p).encode()``; for a list of strings JSON writes as they are (printable ASCII without
    quotes or backslashes: every file name of a usual dataset), the same bytes by one join, ~4x faster at a
    million names than the encoder."""
    if isinstance(p, list) and p and all(type(x) is str for x in p):
        body = '","'.join(p)
        if not _PLAIN.search(body):
            return ('["' + body + '"]').encode("ascii")
    return canonical_json(p).encode()


def frames_identity(m) -> str:
    """The ordered content of the frames as decoded: their fingerprints, plus the EXIF orientation of
    any frame that has one (the decoder rotates such frames, so the same bytes decode differently from
    before orientation was applied). Without tags: the schema-1 value, :attr:`Manifest.fingerprint`."""
    if not m.orientations:
        return m.fingerprint
    return frames_of(m, np.arange(len(m)))


def frames_of(m, idx: np.ndarray) -> str:
    """``combine`` of the fingerprints of frames ``idx`` (``@exifN`` appended where a frame has a tag)."""
    orient = m.orientations
    if orient is None:
        if len(idx) == len(m) and (idx == np.arange(len(m))).all():
            return m.fingerprint  # computed once per manifest
        return combine([m.fingerprints[i] for i in idx.tolist()])
    return combine([m.fingerprints[i] + (f"@exif{orient[i]}" if orient[i] != 1 else "") for i in idx.tolist()])


def union(m, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.union1d(a, b) of two index sets of ``m``'s frames, by a mask: O(N), no sort of a million indices."""
    keep = np.zeros(len(m), dtype=bool)
    keep[a] = True
    keep[b] = True
    return np.flatnonzero(keep).astype(np.int64)


def annotations_of(m, idx: np.ndarray) -> str:
    kp = m.keypoints[idx] if m.keypoints is not None else np.zeros((len(idx), 0, 2), np.float32)
    return digest(np.asarray(kp, dtype=np.float32))


def synthetic_block(root: Path) -> Optional[dict]:
    """The ``synthetic`` mapping of ROOT/dataset.yaml (what teach and eval read from it), or None."""
    import yaml

    try:
        doc = yaml.safe_load((Path(root) / "dataset.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    block = doc.get("synthetic") if isinstance(doc, dict) else None
    return block if isinstance(block, dict) else None


def manifest_fingerprint(m) -> dict:
    """Everything manifest.json holds (the dataset root aside: moved data keeps its artifacts)."""
    depth_files = None
    if m.depth_fingerprints is not None:
        depth_files = m.depth_fingerprint
    return {"frames": frames_identity(m), "names": digest(m.frame_ids, m.paths), "splits": digest(m.splits),
            "annotations": annotations_of(m, np.arange(len(m))), "masks": m.mask_fingerprint,
            "depth_files": depth_files}


def applied_masks(m, fingerprint: dict, part: str) -> dict:
    """``fingerprint`` plus the masks' content as ``part`` when every model input is multiplied by its frame's
    mask (human36m_wobg: the masks' bytes are then read by whatever reads a frame)."""
    if m.apply_masks:
        fingerprint[part] = m.mask_fingerprint
    return fingerprint


# --------------------------------------------------------------------------------------------------
# why a part changed


def split_moves(old, new) -> Counter:
    """(old partition, new partition) -> number of frames (matched by id) whose partition changed."""
    before = dict(zip(old.frame_ids, old.splits))
    return Counter((before[f], s) for f, s in zip(new.frame_ids, new.splits) if f in before and before[f] != s)


def annotation_changes(old, new) -> int:
    """Frames (matched by id, in both manifests) whose ground truth differs: coordinates, a joint
    added or removed (visibility), or the number of joints."""
    if old.keypoints is None or new.keypoints is None:
        return 0 if old.keypoints is new.keypoints else len(set(old.frame_ids) & set(new.frame_ids))
    if old.keypoints.shape[1:] != new.keypoints.shape[1:]:
        return len(set(old.frame_ids) & set(new.frame_ids))
    pos = {f: i for i, f in enumerate(old.frame_ids)}
    n = 0
    for j, f in enumerate(new.frame_ids):
        i = pos.get(f)
        if i is not None and not np.array_equal(old.keypoints[i], new.keypoints[j], equal_nan=True):
            n += 1
    return n


def _moves_text(moves: Counter) -> str:
    n = sum(moves.values())
    detail = ", ".join(f"{a} -> {b}: {k}" for (a, b), k in sorted(moves.items()))
    return f"splits changed: {n} frame{'s' * (n != 1)} moved ({detail})"


_GENERIC = {
    "frames": "frames changed",
    "names": "frame names or paths changed",
    "splits": "splits changed",
    "train": "splits changed: the train split is not the frames this was trained on",
    "pictured": "splits changed: the test split (pictured in samples/) is not the one this was built with",
    "annotations": "annotations changed",
    "masks": "foreground masks changed",
    "depth_files": "depth files changed",
    "synthetic": "the synthetic block of dataset.yaml (generator parameters, left/right pairs) changed",
}


def describe(reads: Optional[Callable[[Any, Optional[dict]], dict]], part: str, old_value: Any, old_m, new_m,
             synthetic: Optional[dict]) -> str:
    """Why fingerprint part ``part`` of a stage changed, with counts when the old manifest is known; ``reads`` is
    the stage's own fingerprint (its declaration's ``Stage.reads``).

    ``old_m`` is the manifest this experiment last built (None if gone); the counts are given only when
    recomputing ``part`` from it gives ``old_value``, i.e. when it really is the data the artifact saw.
    """
    generic = _GENERIC.get(part, f"input {part} changed")
    if old_m is None or reads is None:
        return generic
    try:
        same_source = reads(old_m, synthetic).get(part) == old_value
    except Exception:  # an old manifest this version cannot split the same way
        same_source = False
    if not same_source:
        return generic
    if part in ("splits", "train", "pictured"):
        moves = split_moves(old_m, new_m)
        if moves:
            return _moves_text(moves)
        return generic + " (annotated frames entered or left a split)"
    if part == "annotations":
        n = annotation_changes(old_m, new_m)
        if n:
            return f"annotations changed: {n} frame{'s' * (n != 1)} (coordinates or visibility)"
    return generic


# --------------------------------------------------------------------------------------------------
# what a stage needs, checked before anything upstream of it is built


def eval_data_problem(m) -> Optional[str]:
    """Why eval cannot score dataset ``m`` (no ground truth, too few annotated frames in a split), or None.

    Checked by ``run`` before training (pipeline.graph.preflight), so a dataset without annotations fails
    in a second, not after two models have trained, and by the eval stage itself."""
    csv = m.spec.files.get("keypoints_csv")
    if m.keypoints is None or not m.has_gt.any():
        if csv and not (Path(m.root) / csv).is_file():
            what = f"there is no {Path(m.root) / csv}"
            fix = (f"add {csv} (header frame,split,x0,y0,x1,y1,...: pixels, split train or test; docs/datasets.md)")
        else:
            what = "its annotations hold no annotated frame"
            fix = "add ground-truth keypoints (docs/datasets.md)"
        return (f"dataset {m.name} under {m.root} has no ground-truth keypoints ({what}), so eval has nothing to "
                f"score; {fix}, or stop before eval with `--until distill`")
    fit, test = m.split("regress"), m.split("test")
    if len(fit) < 2 or len(test) < 1:
        fix = (f"mark at least one annotated frame 'test' and two 'train' in {csv}'s split column" if csv
               else "check the split files")
        return (f"dataset {m.name} under {m.root}: {len(fit)} regression-fit and {len(test)} test frames with ground "
                f"truth; eval needs at least 2 and 1: {fix}, or stop before eval with `--until distill`")
    return None
