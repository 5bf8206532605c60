"""The one home of the byte-level helpers every writer shares: canonical JSON, sha256 of files and text,
fsync, and atomic replacement of a file.

Why these exist (and must stay byte-stable): artifact keys, the manifest's description digest, config digests
and depth-cache consistency checks are sha256 of :func:`canonical_json`, and golden values of them are pinned
in tests. The options a caller passes (``allow_nan``, ``default``) are exactly those its key was always
computed with; changing one changes keys.

Atomic writes: a file is written to a temporary name in the same directory (``os.replace`` must not cross
file systems), flushed and fsynced, renamed over the final name, and the directory is fsynced, so a crash
or ``kill -9`` leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

HASH_CHUNK = 1 << 20  # read size when streaming a file through a hash


# ---------------------------------------------------------------------------------------------- JSON
def canonical_json(obj: Any, *, allow_nan: bool = False, default: Optional[Callable[[Any], Any]] = None) -> str:
    """JSON with sorted keys, no whitespace and ASCII only: the exact text that is hashed.

    ``allow_nan=False`` refuses NaN/inf (not JSON); ``default`` converts values JSON does not know (e.g.
    ``str``). Both only matter for inputs that would otherwise fail, so valid JSON data gives the same bytes.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=allow_nan,
                      default=default)


def sha256_text(text: str) -> str:
    """Hex sha256 of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode()).hexdigest()


def json_digest(obj: Any, *, allow_nan: bool = False, default: Optional[Callable[[Any], Any]] = None) -> str:
    """Hex sha256 of :func:`canonical_json` of ``obj`` (same options): the identity of a JSON value."""
    return sha256_text(canonical_json(obj, allow_nan=allow_nan, default=default))


def pretty_json(obj: Any, *, indent: int = 2, default: Optional[Callable[[Any], Any]] = str) -> str:
    """Human-readable JSON with sorted keys and a final newline (records, layouts, indexes)."""
    return json.dumps(obj, indent=indent, sort_keys=True, default=default) + "\n"


# ---------------------------------------------------------------------------------------------- hashing
def stream_file(path: str | os.PathLike, *hashers: Any) -> bytes:
    """Read ``path`` once in :data:`HASH_CHUNK` blocks, feeding every block to each hasher's ``update``;
    returns the first block (what header probes look at)."""
    head = b""
    with open(path, "rb") as fh:
        while block := fh.read(HASH_CHUNK):
            if not head:
                head = block
            for h in hashers:
                h.update(block)
    return head


def sha256_file(path: str | os.PathLike, *, prefix: str = "sha256:") -> str:
    """``prefix + <hex>`` sha256 of a file's bytes, streamed (``prefix=""`` for the bare hex)."""
    h = hashlib.sha256()
    stream_file(path, h)
    return prefix + h.hexdigest()


# ---------------------------------------------------------------------------------------------- fsync
def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory by path; errors propagate (a full disk must fail the write)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename in it survives a power cut; best effort (some file systems refuse)."""
    with contextlib.suppress(OSError):
        fsync_path(path)


def replace_durably(tmp: Path, path: Path, *, strict_dir: bool = True) -> None:
    """Publish the already written and fsynced ``tmp`` as ``path``: rename, then fsync the directory.

    ``strict_dir``: a failed directory fsync propagates (for a file the caller must not count as published
    unless the rename is durable, e.g. a depth-cache shard); otherwise it is best effort (:func:`fsync_dir`).
    """
    os.replace(tmp, path)
    (fsync_path if strict_dir else fsync_dir)(Path(path).parent)


# ---------------------------------------------------------------------------------------------- atomic writes
def default_tmp(path: Path) -> Path:
    """The temporary name :func:`atomic_file` uses: ``.<name>.tmp-<pid>`` beside ``path``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: Path, tmp: Optional[Path] = None, *, durable: bool = True) -> Iterator[Any]:
    """The one way this package replaces a file: yield a binary file open on a temporary name in the same
    directory (default :func:`default_tmp`, which :func:`remove_temporaries_of` knows), then flush,
    fsync, rename over ``path`` and fsync the directory.

    A crash leaves either the old file or the new one, never a torn one; an exception in the block or
    a failed write (disk full) leaves the old file untouched and removes the temporary. ``durable=False``
    skips both fsyncs: still safe against a killed process (what a re-run recovers from), not a power cut.
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else default_tmp(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | str, *, tmp: Optional[Path] = None, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` (str: UTF-8) atomically (see :func:`atomic_file`)."""
    with atomic_file(path, tmp, durable=durable) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json_atomic(path: Path, obj: Any, *, indent: int = 2, default: Optional[Callable[[Any], Any]] = str,
                      tmp: Optional[Path] = None) -> None:
    """Replace ``path`` with :func:`pretty_json` of ``obj`` atomically."""
    write_atomic(path, pretty_json(obj, indent=indent, default=default), tmp=tmp)


def remove_temporaries_of(directory: Path, pid: int) -> list[Path]:
    """Delete the ``[.]<name>.tmp-<pid>`` files that :func:`write_atomic` (or a stage writing its own temp
    file the same way, e.g. distill's ``teacher_embeddings.h5.tmp-<pid>``) left under ``directory``
    (sub-folders such as ``samples/`` included) when process ``pid`` was killed mid-write. Only for a pid
    known dead on this host (a stale lock we took over): on a shared file system other hosts' live
    writers use the same pattern with their own pids."""
    removed = []
    suffix = f".tmp-{pid}"
    for top, _dirs, files in os.walk(directory):
        for name in files:
            if name.endswith(suffix):
                p = Path(top) / name
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed
