"""The folder layout, for a dataset of your own (and what :mod:`pipeline.data.synth` writes): frames under
``images/`` and/or videos under ``videos/`` (every frame of each, or every ``data.frame_stride``-th; frame id
``<video path under videos/>/<k>``, :mod:`pipeline.data.video`), optional ``keypoints.csv`` (pixels and a
train/test split column; unlisted frames are unlabelled training frames), optional ``depth/`` files that replace
MiDaS, options in ``ROOT/dataset.yaml``.

Built for a million frames: the listing of image files is list comprehensions and sets (no per-frame Python loop
with checks), ``keypoints.csv`` is parsed in chunks of rows with the checks done on arrays (a slow per-row pass
runs only to name the first bad row), and the parsed result is cached beside the fingerprint memo under the
CSV's content hash and the frame list, so a rebuild over an unchanged CSV only stats it. Video frames take a
slower path (a Python loop over each video's frames, a lookup per keypoints.csv row or depth file that names a
frame the stride leaves out): a video holds thousands of frames in one file, so they are few next to images.
"""
from __future__ import annotations

import csv
import io
import itertools
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.data.layouts.listing import Listing
from pipeline.data.paths import fail, refuse_duplicate_ids, require_dir, walk_images, walk_images_stat
from pipeline.data.spec import FOLDER_SPLITS, DatasetSpec
from pipeline.data.video import VIDEOS_DIR
from pipeline.store.fingerprint import FingerprintMemo, Stats, combine, names_blob, scan_files, stat_files
from pipeline.store.io import write_atomic

log = logging.getLogger(__name__)

CSV_PARSER = "folder-csv/1"  # bump when the parse result of the same CSV and frames would differ
CHUNK_ROWS = 65536  # rows of keypoints.csv checked as one set of arrays


def walk(spec: DatasetSpec, root: Path, memo: Optional[FingerprintMemo], progress: bool,
         frame_stride: int = 1) -> Listing:
    """The listing of this layout under ``root``: image files first, then the frames of the videos (``memo``: where
    the videos' scan and the parsed ``keypoints.csv`` are cached; ``frame_stride`` keeps every k-th frame of each
    video)."""
    f = spec.files
    L = Listing(kp_units="pixels_xy")
    vdir = root / f.get("videos_dir", VIDEOS_DIR)
    if vdir.is_dir() and not (root / f["images_dir"]).is_dir():
        images, L.stats["paths"] = [], stat_files(root, [])  # a dataset of videos only
    else:
        idir = require_dir(spec, root, f["images_dir"], f"put your frames in {root}/{f['images_dir']}/ or your "
                                                         f"videos in {vdir}/")
        images, L.stats["paths"] = walk_images_stat(spec, root, idir, f["image_exts"])
        if not images and not vdir.is_dir():
            raise fail(spec, f"no images ({', '.join(f['image_exts'])}) in {idir}")
    plen = len(f["images_dir"].rstrip("/") + "/")
    # The frame id is the path under images/ without its extension: every listed name ends with one of
    # image_exts, so the last "." starts it (os.path.splitext per frame costs ~1 s a million).
    ids = [rel[plen:rel.rfind(".")] for rel in images]
    refuse_duplicate_ids(spec, ids, lambda fid, a, b: f"duplicate frame id {fid!r}: {images[a]!r} and "
                                                      f"{images[b]!r}; keep one file per frame name")
    L.ids, L.paths, L.ids_unique = ids, list(images), True
    videos = None
    if vdir.is_dir():
        videos = _add_videos(spec, root, vdir, memo, progress, frame_stride, L)
    elif frame_stride != 1:
        raise fail(spec, f"data.frame_stride {frame_stride} takes every k-th frame of each video, but there is no "
                         f"{vdir.name}/ under {root} (image files are always all listed); remove the setting")
    L.splits = ["train"] * len(L.ids)  # frames not in keypoints.csv are unlabelled training frames
    csv_rel = f["keypoints_csv"]
    if (root / csv_rel).is_file():
        L.kp, L.splits, L.kp_lines = read_folder_csv(spec, root, csv_rel, L.ids, images, plen, memo, videos)
        L.kp_file = csv_rel
    elif spec.n_joints:
        L.kp = np.full((len(L.ids), spec.n_joints, 2), np.nan, dtype=np.float32)
    ddir = root / f["depth_dir"]
    if ddir.is_dir():
        if spec.depth is None:
            raise fail(spec, f"{f['depth_dir']}/ found under {root} but nothing says what it holds: add "
                             f"'depth_kind: depth' (near = small) or 'depth_kind: inverse_depth' (near = large), "
                             f"and 'depth_scale: S' if the stored numbers need scaling, to "
                             f"{root / f['options_file']}")
        L.depths, L.stats["depths"] = _depth_files(spec, root, ddir, L.ids, videos)
    return L


# --------------------------------------------------------------------------------------------------
# videos


class _Videos:
    """The videos of a listing: which frame ids they hold and which they leave out (the stride), so that a
    keypoints.csv row or a depth file naming a frame the stride drops is skipped, not refused."""

    def __init__(self, spec: DatasetSpec, prefix: str, scans: dict, stride: int) -> None:
        self.images_dir = spec.files["images_dir"]
        self.stride = stride
        self.frames = {rel: len(fi.extra["pts"]) for rel, fi in scans.items()}  # video path -> frames in it
        self.by_id = {rel[len(prefix):]: rel for rel in scans}  # "<path under videos/>" -> video path

    def signature(self) -> str:
        """What decides which rows are skipped, for the parsed-CSV cache's key: the stride and each video's length."""
        return combine([f"stride {self.stride}", *(f"{rel}\t{n}" for rel, n in self.frames.items())])

    def not_listed(self, name: str) -> Optional[str]:
        """Why frame ``name`` (of keypoints.csv, of a depth file) is not a frame of the listing: None for a video
        frame the stride leaves out (its row or file is skipped: annotations and depth of every frame stay valid
        whatever data.frame_stride is), else the end of the error message."""
        video, _, k = name.rpartition("/")
        if k.isdigit():
            rel = self.by_id.get(video)
            if rel is None:  # a video named by the end of its path (sub/clip.mp4 as clip.mp4): the first one
                rel = next((r for r in self.frames if r.endswith("/" + video)), None)
            if rel is not None:
                n = self.frames[rel]
                if int(k) >= n:
                    return f"is past the end of video {rel!r} ({n} frames: 0 to {n - 1})"
                return None if int(k) % self.stride else f"is not a frame of {rel!r}"
        return f"has no image in {self.images_dir}/ (remove the row or add the image)"


def _add_videos(spec: DatasetSpec, root: Path, vdir: Path, memo: Optional[FingerprintMemo], progress: bool,
                stride: int, L: Listing) -> Optional[_Videos]:
    """Append the frames of every video under ``vdir`` to ``L`` (sorted by path; frames k = 0, stride, 2 stride,
    ...): ids, paths (the video's), ``video_frames`` ([k, pts]; None for the image files before them) and
    ``videos`` (each video's scan). None when there is no video."""
    from pipeline.data.paths import Inside
    from pipeline.data.video import VIDEO_EXTS, probe_video

    rels = walk_images(spec, root, vdir, VIDEO_EXTS)  # the same walk, for video extensions
    if not rels and not L.ids:
        raise fail(spec, f"no videos ({', '.join(VIDEO_EXTS)}) in {vdir} and no images; put your frames or videos "
                         f"there")
    if not rels:
        return None
    inside = Inside(spec, root)
    for rel in rels:  # before anything is read: a symlink out of the root is refused, not scanned
        inside.check(rel, "video")
    try:
        scans = scan_files(root, rels, memo, probe=probe_video, probe_keys=("wh", "pts", "rotation"),
                           progress=progress, desc="videos")
    except (OSError, ValueError) as e:
        raise fail(spec, f"video unreadable: {e}; replace or remove it") from None
    prefix = vdir.relative_to(root).as_posix().rstrip("/") + "/"
    images = len(L.ids)
    L.video_frames = [None] * images
    L.videos = {}
    for rel, fi in zip(rels, scans):
        L.videos[rel] = fi
        pts = fi.extra["pts"]
        ks = range(0, len(pts), stride)
        L.ids += [f"{rel[len(prefix):]}/{k}" for k in ks]
        L.paths += [rel] * len(ks)
        L.video_frames += [[k, int(pts[k])] for k in ks]
    # an image named like a video frame (images/clip.mp4/3.png)
    refuse_duplicate_ids(spec, L.ids, lambda fid, a, b: f"duplicate frame id {fid!r}: {L.paths[a]!r} and frame "
                                                        f"{L.video_frames[b][0]} of {L.paths[b]!r}; rename one")
    return _Videos(spec, prefix, L.videos, stride)


def _depth_files(spec: DatasetSpec, root: Path, ddir: Path, ids: list[str],
                 videos: Optional[_Videos] = None) -> tuple[list[str], Stats]:
    """The depth file of each frame (in frame order) and their stats. The depth files of video frames that the
    stride leaves out are skipped."""
    f = spec.files
    depths, st = walk_images_stat(spec, root, ddir, (".png", ".npy"))
    dplen = len(f["depth_dir"].rstrip("/") + "/")
    dids = [rel[dplen:rel.rfind(".")] for rel in depths]
    known = set(ids)
    if videos is not None and not known.issuperset(dids):
        keep = np.fromiter((d in known or videos.not_listed(d) is not None for d in dids), dtype=bool,
                           count=len(dids))
        if not keep.all():  # dropped before any check: two files for a skipped frame are not an error either
            at = np.flatnonzero(keep).tolist()
            depths, dids = [depths[k] for k in at], [dids[k] for k in at]
            # dirs=None: the folders of the files kept are checked from their paths (a folder holding only
            # skipped files is never read)
            st = Stats(st.ino[keep], st.size[keep], st.mtime[keep], st.link[keep], None)
    # the first offending file in listing order, whichever its problem (as a loop over the files would say)
    dup_at = unknown_at = len(dids)
    if len(set(dids)) != len(dids):
        seen: dict[str, int] = {}
        dup_at = next(i for i, d in enumerate(dids) if seen.setdefault(d, i) != i)
    if not known.issuperset(dids):
        unknown_at = next(i for i, d in enumerate(dids) if d not in known)
    if dup_at < unknown_at:
        did = dids[dup_at]
        raise fail(spec, f"two depth files for frame {did!r}: {depths[dids.index(did)]!r} and {depths[dup_at]!r}; "
                         f"keep one")
    if unknown_at < len(dids):
        raise fail(spec, f"depth file {depths[unknown_at]!r} has no frame {dids[unknown_at]!r} in "
                         f"{f['images_dir']}/; remove it or add the frame")
    found = dict(zip(dids, range(len(dids))))
    if len(found) != len(ids):
        lacking = [i for i in ids if i not in found]
        raise fail(spec, f"{len(lacking)} frames have no depth file in {f['depth_dir']}/, e.g. {lacking[0]!r}; "
                         f"give every frame one (<frame>.png 16-bit or <frame>.npy float) or remove "
                         f"{f['depth_dir']}/ to use MiDaS")
    order = np.fromiter((found[i] for i in ids), dtype=np.int64, count=len(ids))
    if (order == np.arange(len(ids))).all():  # depth/ mirrors images/: already in frame order
        return depths, st
    return [depths[k] for k in order.tolist()], Stats(st.ino[order], st.size[order], st.mtime[order], st.link[order],
                                                      st.dirs)


# --------------------------------------------------------------------------------------------------
# keypoints.csv


def read_folder_csv(spec: DatasetSpec, root: Path, csv_rel: str, ids: list[str], images: list[str], plen: int,
                    memo: Optional[FingerprintMemo],
                    videos: Optional[_Videos] = None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Parse ``keypoints.csv`` for the frames ``ids`` (files ``images`` for the first ``len(images)``, then video
    frames of ``videos``). Returns ``(kp, splits, lines)``: (N, J, 2) float32 pixels (x, y), NaN = missing or
    unlisted; the split of every frame; (N,) int64 CSV line of each frame's row (0: not in the CSV), for messages.
    Cached under the CSV's content hash and the frame list (and, with videos, what decides the rows skipped)."""
    cache = None
    if memo is not None:
        try:
            csv_fp = scan_files(root, [csv_rel], memo, progress=False, desc="annotations").fingerprints[0]
        except OSError as e:
            raise fail(spec, f"{csv_rel} unreadable ({e})") from None
        key = combine([CSV_PARSER, csv_fp, combine([str(spec.n_joints)]), _digest(names_blob(ids)),
                       _digest(names_blob(images)), *([videos.signature()] if videos is not None else [])])
        cache = memo.path.parent / "annotations" / f"folder-{key[5:]}.npz"
        got = _load_cached(cache, len(ids))
        if got is not None:
            return got
    kp, codes, lines = _parse_csv(spec, root, csv_rel, ids, images, plen, videos)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.savez(buf, kp=kp, split=codes, line=lines)
            write_atomic(cache, buf.getvalue())
        except OSError as e:
            log.warning("could not cache the parsed %s in %s (%s)", csv_rel, cache, e.strerror or e)
    return kp, _split_names(codes), lines


def _digest(blob: bytes) -> str:
    import xxhash

    return "xxh3:" + xxhash.xxh3_128(blob).hexdigest()


def _load_cached(path: Path, n: int) -> Optional[tuple[np.ndarray, list[str], np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            kp, codes, lines = z["kp"], z["split"], z["line"]
    except (OSError, ValueError, KeyError, EOFError):
        return None  # no cache yet, or a damaged one: parse again
    except Exception as e:  # noqa: BLE001 - zipfile raises its own types; a damaged cache is a miss
        log.warning("ignoring the damaged parsed-CSV cache %s (%s)", path, e)
        return None
    if kp.ndim != 3 or len(kp) != n or codes.shape != (n,) or lines.shape != (n,) or codes.max(initial=0) >= len(
            FOLDER_SPLITS):
        return None
    return kp, _split_names(codes), lines


def _parse_csv(spec: DatasetSpec, root: Path, csv_rel: str, ids: list[str], images: list[str],
               plen: int, videos: Optional[_Videos] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The parse itself: chunks of :data:`CHUNK_ROWS` rows checked as arrays (see :func:`_check_chunk`)."""
    try:
        fh = open(root / csv_rel, newline="", encoding="utf-8-sig")  # -sig: Excel's "CSV UTF-8" BOM
    except OSError as e:
        raise fail(spec, f"{csv_rel} unreadable ({e})") from None
    with fh:
        reader = csv.reader(fh)
        try:
            first = next(reader, None)
        except (OSError, csv.Error, UnicodeDecodeError) as e:
            raise fail(spec, f"{csv_rel} unreadable ({e})") from None
        if first is None:
            raise fail(spec, f"{csv_rel} is empty; expected a header frame,split,x0,y0,x1,y1,...")
        header = [h.strip() for h in first]
        n_coord = len(header) - 2
        expect = [f"{a}{j}" for j in range(max(n_coord, 0) // 2) for a in ("x", "y")]
        if header[:2] != ["frame", "split"] or n_coord <= 0 or n_coord % 2 or header[2:] != expect:
            raise fail(spec, f"{csv_rel}: header must be frame,split,x0,y0,x1,y1,... (pixels, x right, y down), "
                             f"got {','.join(header)!r}")
        J = n_coord // 2
        if spec.n_joints is not None and spec.n_joints != J:
            raise fail(spec, f"{csv_rel} has {J} joints (header) but the dataset says n_joints: {spec.n_joints}; "
                             f"fix one of them")
        n = len(ids)
        parsed = _Parsed(kp=np.full((n, J, 2), np.nan, dtype=np.float32), codes=np.zeros(n, dtype=np.uint8),
                         lines=np.zeros(n, dtype=np.int64), index=dict(zip(ids, range(n))),
                         names=lambda: dict(zip((rel[plen:] for rel in images), range(n))),
                         images_dir=spec.files["images_dir"], videos=videos)
        line0 = 2
        while True:
            try:
                rows = list(itertools.islice(reader, CHUNK_ROWS))
            except (OSError, csv.Error, UnicodeDecodeError) as e:
                raise fail(spec, f"{csv_rel} unreadable ({e})") from None
            if not rows:
                break
            _check_chunk(spec, csv_rel, rows, line0, len(header), J, parsed)
            line0 += len(rows)
    return parsed.kp, parsed.codes, parsed.lines


class _Parsed:
    """What the chunks fill in: keypoints, split codes (index into FOLDER_SPLITS) and CSV lines per frame."""

    def __init__(self, *, kp, codes, lines, index, names, images_dir: str, videos: Optional[_Videos] = None) -> None:
        self.kp, self.codes, self.lines, self.index, self.images_dir = kp, codes, lines, index, images_dir
        self._names, self._by_name = names, None
        self.videos = videos

    def not_listed(self, name: str) -> Optional[str]:
        """Why the frame a row names is not listed; None: a video frame the stride leaves out (the row is skipped)."""
        if self.videos is not None:
            return self.videos.not_listed(name)
        return f"has no image in {self.images_dir}/ (remove the row or add the image)"

    def frame_of(self, name: str) -> Optional[int]:
        """The frame a CSV ``frame`` cell names: a frame id, else a file name under images/."""
        i = self.index.get(name)
        if i is None:
            if self._by_name is None:
                self._by_name = self._names()
            i = self._by_name.get(name)
        return i


def _check_chunk(spec: DatasetSpec, csv_rel: str, rows: list[list[str]], line0: int, width: int, J: int,
                 parsed: _Parsed) -> None:
    """Check and store one chunk of rows (``rows[k]`` is on line ``line0 + k``). Every check runs on arrays; the
    first row that fails any of them is handed to :func:`_row_error` for the message a row-by-row reader gives."""
    blank = np.fromiter((not "".join(r).strip() for r in rows), dtype=bool, count=len(rows))
    keep = np.flatnonzero(~blank)
    bad = np.zeros(len(rows), dtype=bool)  # rows with any problem; the first one is reported
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    bad |= ~blank & (lens != width)
    ok_rows = [rows[k] for k in keep.tolist() if lens[k] == width]
    ok_at = keep[lens[keep] == width]
    frames = np.fromiter((-1 if (i := parsed.frame_of(r[0].strip())) is None else i for r in ok_rows),
                         dtype=np.int64, count=len(ok_rows))
    splits = [r[1].strip() for r in ok_rows]
    codes = np.fromiter((FOLDER_SPLITS.index(s) if s in FOLDER_SPLITS else 255 for s in splits), dtype=np.int64,
                        count=len(splits))
    cells = np.array([c.strip() for r in ok_rows for c in r[2:]], dtype=str).reshape(len(ok_rows), J, 2)
    empty = cells == ""
    one_coord = empty[..., 0] != empty[..., 1]  # (M, J)
    with np.errstate(invalid="ignore"):
        try:
            values = np.where(empty, "nan", cells).astype(np.float64)
            not_number = np.zeros(cells.shape[:2], dtype=bool)
        except ValueError:  # some cell is not a number: find which, row by row (only in this failing chunk)
            values, not_number = _floats_slowly(cells, empty)
    not_finite = ~empty.any(axis=-1) & ~np.isfinite(values).all(axis=-1)
    valid = frames >= 0
    # rows naming a video frame that the stride leaves out: skipped before any other check of theirs (a lookup
    # per such row: only datasets with videos have them)
    skip = np.zeros(len(frames), dtype=bool)
    if parsed.videos is not None and not valid.all():
        for m in np.flatnonzero(~valid).tolist():
            skip[m] = parsed.not_listed(ok_rows[m][0].strip()) is None
    # a frame listed twice: earlier in this chunk, or in an earlier chunk
    dup = np.zeros(len(frames), dtype=bool)
    dup[valid] = parsed.lines[frames[valid]] != 0
    _, first_pos = np.unique(frames, return_index=True)
    repeat = np.ones(len(frames), dtype=bool)
    repeat[first_pos] = False
    dup |= repeat & valid
    problem = ~skip & ((~valid) | dup | (codes == 255) | (one_coord | not_number | not_finite).any(axis=1))
    bad[ok_at[problem]] = True
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise fail(spec, _row_error(csv_rel, rows[k], line0 + k, width, J, parsed, rows[:k], line0))
    if skip.any():
        frames, values, codes, ok_at = frames[~skip], values[~skip], codes[~skip], ok_at[~skip]
    parsed.kp[frames] = values.astype(np.float32)
    parsed.codes[frames] = codes
    parsed.lines[frames] = line0 + ok_at


def _floats_slowly(cells: np.ndarray, empty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = np.full(cells.shape, np.nan)
    not_number = np.zeros(cells.shape[:2], dtype=bool)
    for m, j, c in zip(*np.nonzero(~empty)):
        try:
            values[m, j, c] = float(cells[m, j, c])
        except ValueError:
            not_number[m, j] = True
    return values, not_number


def _row_error(csv_rel: str, row: list[str], n: int, width: int, J: int, parsed: _Parsed, before: list[list[str]],
               line0: int) -> str:
    """The message for the first problem of row ``row`` (line ``n``), in the order a row-by-row check meets them."""
    if len(row) != width:
        return f"{csv_rel} line {n}: {len(row)} cells, the header has {width}"
    name, split = row[0].strip(), row[1].strip()
    i = parsed.frame_of(name)
    if i is None:
        return f"{csv_rel} line {n}: frame {name!r} {parsed.not_listed(name)}"
    earlier = int(parsed.lines[i]) or next((line0 + k for k, r in enumerate(before)
                                            if len(r) == width and parsed.frame_of(r[0].strip()) == i), 0)
    if earlier:
        return f"{csv_rel} line {n}: duplicate frame id {name!r} (first on line {earlier})"
    if split not in FOLDER_SPLITS:
        return f"{csv_rel} line {n}: split {split!r} is not one of {', '.join(FOLDER_SPLITS)}"
    cells = [c.strip() for c in row[2:]]
    for j in range(J):
        xs, ys = cells[2 * j], cells[2 * j + 1]
        if not xs and not ys:
            continue
        if not xs or not ys:
            return (f"{csv_rel} line {n}: joint {j} has only one coordinate; leave both x{j} and y{j} empty for a "
                    f"missing joint")
        try:
            xy = (float(xs), float(ys))
        except ValueError:
            return f"{csv_rel} line {n}: joint {j} ({xs!r}, {ys!r}) is not a number"
        if not np.isfinite(xy).all():
            return f"{csv_rel} line {n}: joint {j} ({xs!r}, {ys!r}) is not finite; leave the cells empty for a " \
                   f"missing joint"
    raise AssertionError(f"{csv_rel} line {n}: flagged by the array checks but passes the row check")


def _split_names(codes: np.ndarray) -> list[str]:
    """The split of each frame from its code (index into FOLDER_SPLITS): one fancy index, not a loop."""
    return np.array(FOLDER_SPLITS, dtype=object)[codes].tolist()
