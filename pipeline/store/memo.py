"""The fingerprint memo: (path, inode, size, mtime_ns) -> digests and probe results, one file per dataset root.

A disposable accelerator of :mod:`pipeline.store.fingerprint` (see its docstring for the rules: a corrupt memo is
a logged miss, it is replaced atomically, files inside the racy window are not vouched for). Columnar, so that a
million unchanged frames are matched with one buffer comparison and a few array comparisons.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from pipeline.store.io import write_atomic

log = logging.getLogger("pipeline.store.fingerprint")  # one logger for the memo and the scans that use it

MEMO_SCHEMA = "dkp.fingerprint-memo/2"  # columnar .npz (FingerprintMemo)
LEGACY_SCHEMA = "dkp.fingerprint-memo/1"  # one JSON object per file: still read, never written


def default_cache_dir() -> Path:
    """The dkp cache root: ``$DKP_CACHE_DIR``, else ``$XDG_CACHE_HOME/dkp``, else ``~/.cache/dkp``."""
    env = os.environ.get("DKP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dkp"


def names_blob(relpaths: Sequence[str]) -> bytes:
    """The paths joined by NUL (never in a file name), UTF-8 with lone surrogates kept (undecodable names): one
    buffer whose equality says "the same files in the same order" in one comparison."""
    return "\0".join(relpaths).encode("utf-8", "surrogatepass")


# A memo segment's per-file columns, besides its probe results (see Segment).
_COLUMNS = ("ino", "size", "mtime", "ok", "xxh3")


@dataclass
class Segment:
    """What one scan (one root, one ``desc``: frames, masks, depth files, ...) learnt, one row per file in scan
    order: stat identity, whether the row may vouch for the file (False: hashed inside the racy window),
    the digest and the probe results (``extras[key]`` values, ``has[key]`` where recorded)."""

    names: bytes  # names_blob of the relative paths
    ino: np.ndarray  # (N,) uint64
    size: np.ndarray  # (N,) int64 bytes
    mtime: np.ndarray  # (N,) int64 ns
    ok: np.ndarray  # (N,) bool
    xxh3: np.ndarray  # (N,) "S37" b"xxh3:<hex>"
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (N, ...) int64 or object (str)
    has: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (N,) bool

    def __len__(self) -> int:
        return len(self.ino)

    def rows_for(self, relpaths: Sequence[str], blob: bytes) -> np.ndarray:
        """(N,) int64 row of each path in this segment, -1 where it has none. One buffer comparison when
        the files are those of the last scan, in the same order (a no-op rebuild); a dict otherwise."""
        if blob == self.names and len(relpaths) == len(self):
            return np.arange(len(relpaths), dtype=np.int64)
        known = self.names.decode("utf-8", "surrogatepass").split("\0") if len(self) else []
        index = dict(zip(known, range(len(known))))
        return np.fromiter((index.get(r, -1) for r in relpaths), dtype=np.int64, count=len(relpaths))


def object_array(values: list) -> np.ndarray:
    """An (N,) object array holding ``values`` as they are (lists stay lists, whatever their lengths)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def segment_id(root: str, desc: str) -> str:
    return f"{desc}\0{root}"


class FingerprintMemo:
    """(path, inode, size, mtime_ns) -> digests (+ probe results), in one file per dataset root.

    Columnar (``dkp.fingerprint-memo/2``, an ``.npz`` of plain arrays, no pickles): each scan of
    :func:`scan_files` keeps one *segment* per (root, ``desc``) with a row per file in scan order, so
    a rebuild over the same files matches a million paths with one buffer comparison and their stats
    with array comparisons. Single files (weights: :func:`sha256_file_memo`) keep a small dict
    (:meth:`lookup`/:meth:`store`). A memo of the older JSON format (``dkp.fingerprint-memo/1``, read from
    the same path or from the ``.json`` beside a ``.npz`` path) is read as single-file entries, so
    nothing is hashed twice after an upgrade; the next save writes the new format.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._entries: dict[str, list] = {}
        self._segments: dict[str, Segment] = {}
        self._npz: Any = None  # the loaded file, segments read from it on first use
        self._on_disk: dict[str, int] = {}  # segment id -> its number in the file
        self._legacy: Optional[Path] = None
        self._dirty = False
        self._load()

    @classmethod
    def for_root(cls, root: str | os.PathLike, *, cache_dir: Optional[Path] = None) -> "FingerprintMemo":
        """The memo for files under ``root``: ``<cache_dir>/fingerprints/<sha256(abs root)[:16]>.npz``."""
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        tag = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
        return cls(base / "fingerprints" / f"{tag}.npz")

    # ---- reading
    def _load(self) -> None:
        path = self.path
        if not path.exists() and path.suffix == ".npz" and path.with_suffix(".json").exists():
            path = self._legacy = path.with_suffix(".json")
        try:
            with open(path, "rb") as f:
                magic = f.read(2)
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("fingerprint memo %s unreadable (%s); every file will be hashed", path, e)
            return
        try:
            if magic == b"PK":
                self._load_npz(path)
            else:
                self._load_json(path)
                self._legacy = path if path != self.path else self._legacy
        except Exception as e:  # noqa: BLE001 - any damage (zip, JSON, array) is a logged miss, never an error
            log.warning("fingerprint memo %s is corrupt (%s); ignoring it, every file will be hashed", path, e)
            self._entries, self._segments, self._on_disk, self._npz = {}, {}, {}, None

    def _load_json(self, path: Path) -> None:
        data = json.loads(path.read_text())
        if data.get("schema") != LEGACY_SCHEMA or not isinstance(data.get("entries"), dict):
            raise ValueError(f"schema {data.get('schema')!r}, expected {LEGACY_SCHEMA!r}")
        self._entries = data["entries"]

    def _load_npz(self, path: Path) -> None:
        npz = np.load(path, allow_pickle=False)
        header = json.loads(str(npz["header"]))
        if header.get("schema") != MEMO_SCHEMA:
            raise ValueError(f"schema {header.get('schema')!r}, expected {MEMO_SCHEMA!r}")
        self._entries = dict(header.get("entries") or {})
        self._on_disk = {sid: int(k) for sid, k in header.get("segments", {}).items()}
        self._extras_of = {sid: list(v) for sid, v in header.get("extras", {}).items()}
        self._json_of = {sid: set(v) for sid, v in header.get("json", {}).items()}
        self._npz = npz

    def segment(self, sid: str) -> Optional[Segment]:
        if sid in self._segments:
            return self._segments[sid]
        k = self._on_disk.get(sid)
        if k is None or self._npz is None:
            return None
        try:
            z = self._npz
            seg = Segment(names=z[f"s{k}.names"].tobytes(), **{c: z[f"s{k}.{c}"] for c in _COLUMNS})
            for key in self._extras_of.get(sid, []):
                seg.extras[key] = z[f"s{k}.x.{key}"]
                seg.has[key] = z[f"s{k}.h.{key}"]
                if key in self._json_of.get(sid, ()):
                    seg.extras[key] = object_array([json.loads(s) for s in seg.extras[key].tolist()])
                elif seg.extras[key].dtype.kind == "U":
                    seg.extras[key] = seg.extras[key].astype(object)
            n = len(seg.ino)
            if any(len(getattr(seg, c)) != n for c in _COLUMNS) or any(len(v) != n for v in seg.has.values()):
                raise ValueError("columns of different lengths")
        except Exception as e:  # noqa: BLE001 - a damaged segment is a miss
            log.warning("fingerprint memo %s: segment %d is corrupt (%s); its files will be hashed", self.path, k, e)
            seg = None
        self._segments[sid] = seg
        return seg

    def __len__(self) -> int:
        return len(self._entries) + sum(len(s) for s in (self.segment(sid) for sid in self._sids()) if s)

    def _sids(self) -> list[str]:
        return list(dict.fromkeys([*self._on_disk, *self._segments]))

    # ---- single files
    @staticmethod
    def _stat_key(st: os.stat_result) -> list[int]:
        return [st.st_ino, st.st_size, st.st_mtime_ns]

    def lookup(self, path: str | os.PathLike, st: os.stat_result) -> Optional[dict]:
        """The digests stored for ``path`` if its (inode, size, mtime_ns) still match ``st``, else None."""
        e = self._entries.get(str(path))
        if not isinstance(e, list) or len(e) != 2 or e[0] != self._stat_key(st) or not isinstance(e[1], dict):
            return None
        return e[1]

    @property
    def has_entries(self) -> bool:
        """Whether single-file entries (an older memo's, or :meth:`store`'s) are held."""
        return bool(self._entries)

    def take(self, path: str | os.PathLike, st: os.stat_result) -> Optional[dict]:
        """:meth:`lookup`, the entry then dropped (moved into a segment by the caller)."""
        rec = self.lookup(path, st)
        self._entries.pop(str(path), None)
        return rec

    def store(self, path: str | os.PathLike, st: os.stat_result, record: Mapping[str, Any]) -> None:
        self._entries[str(path)] = [self._stat_key(st), dict(record)]
        self._dirty = True

    # ---- writing
    def put_segment(self, root: str, desc: str, seg: Segment) -> None:
        self._segments[segment_id(root, desc)] = seg
        self._dirty = True

    def save(self) -> None:
        """Write the memo atomically if it changed; failures are logged (the memo is optional)."""
        if not self._dirty:
            return
        import io

        arrays: dict[str, np.ndarray] = {}
        segments: dict[str, int] = {}
        extras: dict[str, list[str]] = {}
        as_json: dict[str, list[str]] = {}  # segment -> its extras stored as JSON text (lists of varying lengths)
        for k, sid in enumerate(self._sids()):
            seg = self.segment(sid)
            if seg is None:
                continue
            segments[sid] = k
            arrays[f"s{k}.names"] = np.frombuffer(seg.names, dtype=np.uint8)
            for c in _COLUMNS:
                arrays[f"s{k}.{c}"] = getattr(seg, c)
            extras[sid] = sorted(seg.extras)
            for key, v in seg.extras.items():
                if v.dtype == object and any(isinstance(x, (list, tuple)) for x in v):
                    # a list per file whose length varies (a video's frame times): JSON text each, decoded on load
                    arrays[f"s{k}.x.{key}"] = np.array([json.dumps(x) for x in v.tolist()], dtype=str)
                    as_json.setdefault(sid, []).append(key)
                else:
                    arrays[f"s{k}.x.{key}"] = v.astype(str) if v.dtype == object else v
                arrays[f"s{k}.h.{key}"] = seg.has[key]
        header = {"schema": MEMO_SCHEMA, "segments": segments, "extras": extras, "json": as_json,
                  "entries": self._entries}
        arrays["header"] = np.array(json.dumps(header, separators=(",", ":")))
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, buf.getvalue())
            self._dirty = False
        except OSError as e:
            log.warning("could not write fingerprint memo %s (%s); next run hashes again", self.path, e.strerror or e)
            return
        if self._legacy is not None and self._legacy != self.path:
            with contextlib.suppress(OSError):
                self._legacy.unlink()
            self._legacy = None
