"""Content fingerprints of frames and weight files, memoised by (path, inode, size, mtime_ns).

A fingerprint is the xxh3-128 of a file's bytes, written ``"xxh3:<32 hex>"`` (docs/conventions.md):
it is the identity that artifact keys use. The memo only avoids re-reading files whose stat has
not changed; it is a disposable accelerator kept on local disk (``$DKP_CACHE_DIR/fingerprints``,
default ``~/.cache/dkp/fingerprints``), never the source of truth (research/pipeline.md 1.6-1.8):

- a corrupt or unreadable memo is logged and treated as empty, never an error;
- it is rewritten atomically (temporary file + rename), so a crash leaves the old memo or the new;
- a file whose mtime is within :data:`RACY_WINDOW_NS` of the scan is hashed but not memoised, since
  a second write inside the same mtime tick would keep size and mtime and go unnoticed ("racy git").

All file content is read by :func:`_read_and_digest`; tests spy on it to prove that a rebuild over
unchanged files reads nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import xxhash

from pipeline.store.io import HASH_CHUNK, stream_file, write_atomic

log = logging.getLogger(__name__)

PREFIX = "xxh3:"
MEMO_SCHEMA = "dkp.fingerprint-memo/1"
CHUNK = HASH_CHUNK  # read size (stream_file's); the first chunk is also what probes see (image headers live there)
RACY_WINDOW_NS = 2_000_000_000  # files modified this recently are not memoised (see module docstring)

# A probe extracts small facts (image size, ...) from a file's first bytes while it is being hashed,
# so that they are memoised with the hash and a rebuild needs neither. It returns a JSON-able dict.
Probe = Callable[[bytes, str], dict]


def default_cache_dir() -> Path:
    """The dkp cache root: ``$DKP_CACHE_DIR``, else ``$XDG_CACHE_HOME/dkp``, else ``~/.cache/dkp``."""
    env = os.environ.get("DKP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dkp"


def _read_and_digest(path: str | os.PathLike, *, sha256: bool = False, probe: Optional[Probe] = None) -> dict:
    """Read ``path`` once: ``{"xxh3": "xxh3:<hex>"}`` plus ``"sha256": "sha256:<hex>"`` and the probe's keys."""
    h = xxhash.xxh3_128()
    s = hashlib.sha256() if sha256 else None
    head = stream_file(path, *([h] if s is None else [h, s]))
    out: dict[str, Any] = {"xxh3": PREFIX + h.hexdigest()}
    if s is not None:
        out["sha256"] = "sha256:" + s.hexdigest()
    if probe is not None:
        out.update(probe(head, path))
    return out


def hash_file(path: str | os.PathLike) -> str:
    """xxh3-128 of the file's bytes: ``"xxh3:<32 hex>"``. No memo; see :func:`fingerprint_files`."""
    return _read_and_digest(Path(path))["xxh3"]


def combine(fingerprints: Sequence[str]) -> str:
    """Order-sensitive fingerprint of a list of fingerprints: ``"xxh3:<32 hex>"``.

    Each entry is newline-terminated (fingerprints never contain newlines), so ``["a", "b"]``,
    ``["ab"]`` and ``["b", "a"]`` all differ, and the empty list has a fingerprint too.
    """
    h = xxhash.xxh3_128()
    for fp in fingerprints:
        h.update(fp.encode("ascii"))
        h.update(b"\n")
    return PREFIX + h.hexdigest()


class FingerprintMemo:
    """(absolute path, inode, size, mtime_ns) -> digests (+ probe results), in one JSON file.

    One memo file per dataset root (:meth:`for_root`) keeps each file small and lets datasets be
    built concurrently. Entries for a path are replaced when its stat changes.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._entries: dict[str, list] = {}
        self._dirty = False
        self._load()

    @classmethod
    def for_root(cls, root: str | os.PathLike, *, cache_dir: Optional[Path] = None) -> "FingerprintMemo":
        """The memo for files under ``root``: ``<cache_dir>/fingerprints/<sha256(abs root)[:16]>.json``."""
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        tag = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
        return cls(base / "fingerprints" / f"{tag}.json")

    def _load(self) -> None:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("fingerprint memo %s unreadable (%s); every file will be hashed", self.path, e)
            return
        try:
            data = json.loads(raw)
            if data.get("schema") != MEMO_SCHEMA or not isinstance(data.get("entries"), dict):
                raise ValueError(f"schema {data.get('schema')!r}, expected {MEMO_SCHEMA!r}")
            self._entries = data["entries"]
        except (ValueError, AttributeError) as e:
            log.warning("fingerprint memo %s is corrupt (%s); ignoring it, every file will be hashed", self.path, e)
            self._entries = {}

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _stat_key(st: os.stat_result) -> list[int]:
        return [st.st_ino, st.st_size, st.st_mtime_ns]

    def lookup(self, path: str | os.PathLike, st: os.stat_result) -> Optional[dict]:
        """The digests stored for ``path`` if its (inode, size, mtime_ns) still match ``st``, else None."""
        e = self._entries.get(str(path))
        if not isinstance(e, list) or len(e) != 2 or e[0] != self._stat_key(st) or not isinstance(e[1], dict):
            return None
        return e[1]

    def store(self, path: str | os.PathLike, st: os.stat_result, record: Mapping[str, Any]) -> None:
        self._entries[str(path)] = [self._stat_key(st), dict(record)]
        self._dirty = True

    def save(self) -> None:
        """Write the memo atomically if it changed; failures are logged (the memo is optional)."""
        if not self._dirty:
            return

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps({"schema": MEMO_SCHEMA, "entries": self._entries},
                                               separators=(",", ":")))
            self._dirty = False
        except OSError as e:
            log.warning("could not write fingerprint memo %s (%s); next run hashes again", self.path, e.strerror or e)


@dataclass(frozen=True)
class FileInfo:
    """What a scan learns about one file."""

    fingerprint: str  # "xxh3:<hex>"
    extra: Mapping[str, Any] = field(default_factory=dict)  # probe results, e.g. {"wh": [W, H]}


def _progress_bar(total: int, desc: str):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class FilesPerSecond(ProgressColumn):
        def render(self, task) -> Text:  # average over the scan: rich's windowed estimate needs many updates
            rate = task.completed / task.elapsed if task.elapsed else 0.0
            return Text(f"{rate:,.0f} files/s")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), FilesPerSecond(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=False)


def scan_files(
    root: str | os.PathLike,
    relpaths: Sequence[str],
    memo: Optional[FingerprintMemo],
    *,
    probe: Optional[Probe] = None,
    probe_keys: Sequence[str] = (),
    progress: bool = True,
    desc: str = "fingerprinting",
) -> list[FileInfo]:
    """Fingerprint ``root/relpath`` for each relpath (in order), reading only files the memo cannot vouch for.

    ``probe`` (with the keys it returns, ``probe_keys``) runs on the first bytes of each file that is
    read; its results are memoised with the hash. Raises ``FileNotFoundError``/``OSError`` for a
    missing or unreadable file (callers turn it into a named error). Saves the memo at the end.
    """
    root_s = os.path.abspath(root)  # memo keys are absolute paths; plain strings: pathlib costs ~20 us per file
    now_ns = time.time_ns()
    out: list[FileInfo] = []
    bar = _progress_bar(len(relpaths), desc) if progress and relpaths else None
    task = bar.add_task(desc, total=len(relpaths)) if bar is not None else None
    try:
        if bar is not None:
            bar.start()
        for i, rel in enumerate(relpaths):
            p = os.path.join(root_s, rel)
            st = os.stat(p)
            rec = memo.lookup(p, st) if memo is not None else None
            if rec is None or "xxh3" not in rec or any(k not in rec for k in probe_keys):
                try:
                    rec = _read_and_digest(p, probe=probe)
                except ValueError as e:  # a probe's verdict, e.g. not an image: say which file
                    raise ValueError(f"{p}: {e}") from None
                if memo is not None and st.st_mtime_ns < now_ns - RACY_WINDOW_NS:
                    memo.store(p, st, rec)
            out.append(FileInfo(rec["xxh3"], {k: rec[k] for k in probe_keys}))
            if bar is not None and (i % 256 == 255 or i == len(relpaths) - 1):
                bar.update(task, completed=i + 1)
    finally:
        if bar is not None:
            bar.stop()
        if memo is not None:
            memo.save()
    return out


def fingerprint_files(
    root: str | os.PathLike, relpaths: Sequence[str], memo: Optional[FingerprintMemo], progress: bool = True
) -> list[str]:
    """``"xxh3:<hex>"`` of each ``root/relpath``, in order; unchanged files are answered from ``memo``."""
    return [fi.fingerprint for fi in scan_files(root, relpaths, memo, progress=progress)]


def sha256_file_memo(path: str | os.PathLike, memo: Optional[FingerprintMemo] = None) -> str:
    """``"sha256:<hex>"`` of a (weights) file, memoised like frames (default memo: ``<cache>/fingerprints/files.json``)."""
    p = Path(path).resolve()
    if memo is None:
        memo = FingerprintMemo(default_cache_dir() / "fingerprints" / "files.json")
    st = os.stat(p)
    rec = memo.lookup(p, st)
    if rec is None or "sha256" not in rec:
        rec = _read_and_digest(p, sha256=True)
        if st.st_mtime_ns < time.time_ns() - RACY_WINDOW_NS:
            memo.store(p, st, rec)
            memo.save()
    return rec["sha256"]


# --------------------------------------------------------------------------------------------------
# probes: image and depth headers, so a frame's size costs nothing beyond the read for its hash


def _png_header(head: bytes) -> Optional[tuple[int, int, int]]:
    """(W, H, bit depth) from a PNG's IHDR, or None if ``head`` is not a PNG."""
    if len(head) >= 25 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return w, h, head[24]
    return None


def probe_image(head: bytes, path: str | os.PathLike) -> dict:
    """``{"wh": [W, H], "orientation": 1..8}`` of an image from its header, as viewers show it: a JPEG's EXIF
    orientation 5..8 swaps W and H (pipeline.data.images.read_rgb applies the tag). Decodes with OpenCV, from
    the bytes, only for other formats."""
    from pipeline.data.images import exif_orientation, jpeg_header

    png = _png_header(head)
    if png is not None:
        return {"wh": [png[0], png[1]], "orientation": 1}
    jpg = jpeg_header(head)  # (H, W, components, bits): the marker walk the depth stage's reader uses too
    if jpg is not None and jpg[0] > 0 and jpg[1] > 0:
        o = exif_orientation(head)
        h, w = jpg[0], jpg[1]
        return {"wh": [h, w] if o >= 5 else [w, h], "orientation": o}
    import cv2
    import numpy as np

    raw = np.fromfile(path, dtype=np.uint8)  # not cv2.imread: its path handling crashes on non-UTF-8 names
    img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if img is None:
        raise ValueError("not a readable image (OpenCV could not decode it)")
    return {"wh": [int(img.shape[1]), int(img.shape[0])], "orientation": 1}


def probe_depth(head: bytes, path: str | os.PathLike) -> dict:
    """``{"wh": [W, H], "depth_format": "png16" | "npy:<dtype>"}`` from a depth file's header."""
    png = _png_header(head)
    if png is not None:
        if png[2] != 16:
            raise ValueError(f"PNG depth must be 16-bit, this one is {png[2]}-bit (save it as 16-bit PNG or float .npy)")
        return {"wh": [png[0], png[1]], "depth_format": "png16"}
    if head[:6] == b"\x93NUMPY":
        import io

        import numpy as np

        f = io.BytesIO(head)
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = reader(f)
        if len(shape) != 2 or dtype.kind != "f":
            raise ValueError(f".npy depth must be a 2-D float array (H, W), this one is {dtype} {shape}")
        return {"wh": [int(shape[1]), int(shape[0])], "depth_format": f"npy:{dtype.str}"}
    raise ValueError("neither a 16-bit PNG nor a .npy file")
