"""Content fingerprints of frames and weight files, memoised by (path, inode, size, mtime_ns).

A fingerprint is the xxh3-128 of a file's bytes, written ``"xxh3:<32 hex>"`` (docs/conventions.md):
it is the identity that artifact keys use. The memo only avoids re-reading files whose stat has
not changed; it is a disposable accelerator kept on local disk (``$DKP_CACHE_DIR/fingerprints``,
default ``~/.cache/dkp/fingerprints``), never the source of truth (research/pipeline.md 1.6-1.8):

- a corrupt or unreadable memo is logged and treated as empty, never an error;
- it is rewritten atomically (temporary file + rename), so a crash leaves the old memo or the new;
- a file whose mtime is within :data:`RACY_WINDOW_NS` of the scan is hashed but not memoised, since
  a second write inside the same mtime tick would keep size and mtime and go unnoticed ("racy git").

A rebuild costs one ``lstat`` per file and array comparisons (the memo is columnar: see
:class:`FingerprintMemo`, in :mod:`pipeline.store.memo`): nothing is read (`bench scale` measures it up to a million).
All file content is read by :func:`_read_and_digest`; tests spy on it to prove that a rebuild over
unchanged files reads nothing.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat as stat_mod
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import xxhash

from pipeline.store.io import HASH_CHUNK, stream_file
# the memo lives in its own module; FingerprintMemo and default_cache_dir stay importable from here (callers)
from pipeline.store.memo import FingerprintMemo, Segment, default_cache_dir, names_blob, object_array, segment_id

log = logging.getLogger(__name__)

PREFIX = "xxh3:"
CHUNK = HASH_CHUNK  # read size (stream_file's); the first chunk is also what probes see (image headers live there)
RACY_WINDOW_NS = 2_000_000_000  # files modified this recently are not memoised (see module docstring)

# A probe extracts small facts (image size, ...) from a file's first bytes while it is being hashed,
# so that they are memoised with the hash and a rebuild needs neither. It returns a JSON-able dict.
Probe = Callable[[bytes, str], dict]


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
    ``["ab"]`` and ``["b", "a"]`` all differ, and the empty list has a fingerprint too. The entries are
    hashed as one joined buffer: the same digest as feeding them one by one, ~50x faster for a million.
    """
    if not fingerprints:
        return PREFIX + xxhash.xxh3_128().hexdigest()
    return PREFIX + xxhash.xxh3_128(("\n".join(fingerprints) + "\n").encode("ascii")).hexdigest()


@dataclass(frozen=True)
class FileInfo:
    """What a scan learns about one file."""

    fingerprint: str  # "xxh3:<hex>"
    extra: Mapping[str, Any] = field(default_factory=dict)  # probe results, e.g. {"wh": [W, H]}


@dataclass
class Stats:
    """``lstat`` of N files (``stat`` of a symlink's target): inode, size, mtime_ns and which are links."""

    ino: np.ndarray  # (N,) uint64
    size: np.ndarray  # (N,) int64
    mtime: np.ndarray  # (N,) int64 ns
    link: np.ndarray  # (N,) bool: the path itself is a symbolic link
    # the real paths of the folders the files are in, when the walk that stat'ed them knows them (else None)
    dirs: Optional[list] = None


def stat_files(root: str | os.PathLike, relpaths: Sequence[str]) -> Stats:
    """Stat ``root/relpath`` for each relpath: one ``lstat`` per file (plus a ``stat`` per symlink), nothing
    read. Raises ``FileNotFoundError`` (with ``filename``) for a missing file."""
    pre = os.path.abspath(root) + os.sep  # plain strings: pathlib or os.path.join cost ~1 us per file
    lstat, islnk = os.lstat, stat_mod.S_ISLNK
    n = len(relpaths)
    ino, size, mtime, link = np.zeros(n, np.uint64), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool)
    for i, r in enumerate(relpaths):
        st = lstat(pre + r)
        if islnk(st.st_mode):
            link[i] = True
            st = os.stat(pre + r)  # the target's identity: a re-pointed link changes it
        ino[i], size[i], mtime[i] = st.st_ino, st.st_size, st.st_mtime_ns
    return Stats(ino=ino, size=size, mtime=mtime, link=link)


class Scan:
    """The result of :func:`scan_files`, column by column: ``fingerprints`` (list of ``"xxh3:<hex>"``) and
    ``column(key)``, an (N, ...) array of one probe result. Indexing gives a :class:`FileInfo`."""

    def __init__(self, fingerprints: list[str], columns: dict[str, np.ndarray], stats: Stats) -> None:
        self.fingerprints, self._columns, self.stats = fingerprints, columns, stats

    def __len__(self) -> int:
        return len(self.fingerprints)

    def column(self, key: str) -> np.ndarray:
        return self._columns[key]

    def __getitem__(self, i: int) -> FileInfo:
        extra = {}
        for k, col in self._columns.items():
            v = col[i]
            extra[k] = v.tolist() if isinstance(v, np.ndarray) else (v.item() if isinstance(v, np.generic) else v)
        return FileInfo(self.fingerprints[i], extra)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


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
    stats: Optional[Stats] = None,
) -> Scan:
    """Fingerprint ``root/relpath`` for each relpath (in order), reading only files the memo cannot vouch for.

    Every file is ``stat``ed (or ``stats`` from :func:`stat_files` is used); a file whose (inode, size,
    mtime_ns) match the memo's row for it, with every key of ``probe_keys`` recorded, is not read. ``probe``
    (with the keys it returns, ``probe_keys``) runs on the first bytes of each file that is read; its results
    are memoised with the hash. Raises ``FileNotFoundError``/``OSError`` for a missing or unreadable file
    (callers turn it into a named error). Saves the memo at the end.
    """
    root_s = os.path.abspath(root)  # memo keys are absolute; plain strings: pathlib costs ~20 us per file
    n = len(relpaths)
    now_ns = time.time_ns()
    st = stats if stats is not None else stat_files(root_s, relpaths)
    blob = names_blob(relpaths)
    seg = memo.segment(segment_id(root_s, desc)) if memo is not None else None

    xxh3 = np.zeros(n, dtype="S37")
    hit = np.zeros(n, dtype=bool)
    known: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # key -> (values, has) carried from the memo
    if seg is not None and n:
        rows = seg.rows_for(relpaths, blob)
        r = np.where(rows >= 0, rows, 0)
        hit = ((rows >= 0) & seg.ok[r] & (seg.ino[r] == st.ino) & (seg.size[r] == st.size)
               & (seg.mtime[r] == st.mtime))
        for key in probe_keys:
            hit &= seg.has[key][r] if key in seg.has else False
        xxh3[hit] = seg.xxh3[r[hit]]
        for key, v in seg.extras.items():
            known[key] = (v[r], seg.has[key][r] & hit)

    # the columns: probe results carried from the memo where it vouched, filled in below for the files read
    columns: dict[str, np.ndarray] = {key: v.copy() for key, (v, _) in known.items()}
    has: dict[str, np.ndarray] = {key: h.copy() for key, (_, h) in known.items()}
    misses = np.flatnonzero(~hit).tolist()
    bar = _progress_bar(len(misses), desc) if progress and misses else None
    task = bar.add_task(desc, total=len(misses)) if bar is not None else None
    try:
        if bar is not None:
            bar.start()
        for k, i in enumerate(misses):
            p = os.path.join(root_s, relpaths[i])
            rec = None
            if memo is not None and memo.has_entries:  # an older memo's entries, moved into this segment
                rec = memo.take(p, os.stat(p))
                if rec is not None and ("xxh3" not in rec or any(key not in rec for key in probe_keys)):
                    rec = None
            if rec is None:
                try:
                    rec = _read_and_digest(p, probe=probe)
                except ValueError as e:  # a probe's verdict, e.g. not an image: say which file
                    raise ValueError(f"{p}: {e}") from None
            xxh3[i] = rec["xxh3"].encode("ascii")
            for key, v in rec.items():  # into arrays at once: a million dicts kept until the end would be ~0.5 GB
                if key not in ("xxh3", "sha256"):
                    _put(columns, has, key, i, v, n)
            if bar is not None and (k % 256 == 255 or k == len(misses) - 1):
                bar.update(task, completed=k + 1)
    finally:
        if bar is not None:
            bar.stop()

    for key in probe_keys:
        columns.setdefault(key, np.zeros(n, dtype=np.int64))
        has.setdefault(key, np.zeros(n, dtype=bool))
    missing = [key for key in probe_keys if not has[key].all()]
    if missing:  # only a probe that does not return its key gets here
        raise ValueError(f"probe did not return {missing[0]!r} for every file")

    unchanged = (seg is not None and not misses and blob == seg.names
                 and all(key in seg.extras for key in columns))  # a no-op rebuild writes nothing
    if memo is not None and not unchanged:
        # files written this recently are not vouched for (those the memo vouched for were older already)
        ok = hit | (st.mtime < now_ns - RACY_WINDOW_NS)
        memo.put_segment(root_s, desc, Segment(names=blob, ino=st.ino, size=st.size, mtime=st.mtime, ok=ok,
                                                xxh3=xxh3, extras=columns, has=has))
        memo.save()
    return Scan(_strings(xxh3), {k: columns[k] for k in probe_keys}, st)


def _strings(fixed: np.ndarray) -> list[str]:
    """The "xxh3:<hex>" strings of an (N,) "S37" array: one decode and one split of a newline-joined buffer,
    3x faster than ``astype(str).tolist()`` at a million."""
    n = len(fixed)
    if n == 0:
        return []
    buf = np.empty((n, 38), dtype=np.uint8)
    buf[:, :37] = fixed.view(np.uint8).reshape(n, 37)
    buf[:, 37] = ord("\n")
    return buf.tobytes()[:-1].decode("ascii").split("\n")


def _put(columns: dict, has: dict, key: str, i: int, value: Any, n: int) -> None:
    """Store probe result ``value`` of file ``i`` in column ``key`` (made on first use: int64 for ints and lists of
    ints, object otherwise; widened to object if a value does not fit)."""
    col = columns.get(key)
    if col is None:
        if isinstance(value, (list, tuple)):
            col = np.zeros((n, len(value)), dtype=np.int64)
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            col = np.zeros(n, dtype=np.int64)
        else:
            col = np.full(n, None, dtype=object)
        columns[key], has[key] = col, np.zeros(n, dtype=bool)
    elif col.dtype != object and not _fits(col, value):
        # an (N, L) column becomes (N,) objects, one list per row: a list of another length (a video's frame
        # times) fits then
        col = columns[key] = object_array(col.tolist()) if col.ndim > 1 else col.astype(object)
    col[i] = value
    has[key][i] = True


def _fits(col: np.ndarray, value: Any) -> bool:
    """Whether ``value`` can be stored in the int64 column ``col`` as it is."""
    v = np.asarray(value)
    return v.dtype.kind in "iub" and v.shape == col.shape[1:]


def fingerprint_files(
    root: str | os.PathLike, relpaths: Sequence[str], memo: Optional[FingerprintMemo], progress: bool = True
) -> list[str]:
    """``"xxh3:<hex>"`` of each ``root/relpath``, in order; unchanged files are answered from ``memo``."""
    return scan_files(root, relpaths, memo, progress=progress).fingerprints


def sha256_file_memo(path: str | os.PathLike, memo: Optional[FingerprintMemo] = None) -> str:
    """``"sha256:<hex>"`` of a (weights) file, memoised like frames (default memo:
    ``<cache>/fingerprints/files.npz``)."""
    p = Path(path).resolve()
    if memo is None:
        memo = FingerprintMemo(default_cache_dir() / "fingerprints" / "files.npz")
    st = os.stat(p)
    rec = memo.lookup(p, st)
    if rec is None or "sha256" not in rec:
        rec = _read_and_digest(p, sha256=True)
        if st.st_mtime_ns < time.time_ns() - RACY_WINDOW_NS:
            memo.store(p, st, rec)
            memo.save()
    return rec["sha256"]


def file_digest(path: Optional[str]) -> Optional[str]:
    """``"sha256:<hex>"`` of a weights file named by a config (memoised by inode, size and mtime like frame
    fingerprints), ``"missing:<path>"`` when it is not there (so `status` still plans), None when none is named."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        return f"missing:{p}"
    return sha256_file_memo(p)
