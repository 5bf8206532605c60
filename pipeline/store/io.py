"""The one home of the byte-level helpers every writer shares: canonical JSON, sha256 of files and text,
fsync, and atomic replacement of a file.

Why these exist (and must stay byte-stable): artifact keys, the manifest's description digest, config digests
and depth-cache consistency checks are sha256 of :func:`canonical_json`, and golden values of them are pinned
in tests. The options a caller passes (``allow_nan``, ``default``) are exactly those its key was always
computed with; changing one changes keys.

Atomic writes: a file is written to a temporary name in the same directory (``os.replace`` must not cross
file systems), flushed and fsynced, renamed over the final name, and the directory is fsynced, so a crash
or ``kill -9`` leaves either the old file or the new one, never a torn one.

Storage errors (issue 24): a write the file system refuses (full, over quota, read-only, failing disk) becomes
one :class:`~pipeline.errors.StorageError` naming the file, the space needed where known and the fix
(:func:`storage_error`); :class:`GuardedFile` keeps those errors away from HDF5, whose handles h5py cannot
close safely after a failed write.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from pipeline.errors import StorageError

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
def atomic_file(path: Path, tmp: Optional[Path] = None, *, durable: bool = True, what: str = "",
                needed: Optional[int] = None) -> Iterator[Any]:
    """The one way this package replaces a file: yield a binary file open on a temporary name in the same
    directory (default :func:`default_tmp`, which :func:`remove_temporaries_of` knows), then flush,
    fsync, rename over ``path`` and fsync the directory.

    A crash leaves either the old file or the new one, never a torn one; an exception in the block or
    a failed write (disk full) leaves the old file untouched and removes the temporary. ``durable=False``
    skips both fsyncs: still safe against a killed process (what a re-run recovers from), not a power cut.
    A storage error (:data:`STORAGE_ERRNOS`) leaves as a :class:`StorageError` naming ``path``, ``what`` it is
    and the bytes it ``needed`` (when the caller knows).
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
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = storage_cause(e)
        if cause is not None:
            raise storage_error(cause, path, what=what, needed=needed) from e
        raise
    if durable:
        fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | str, *, tmp: Optional[Path] = None, durable: bool = True,
                 what: str = "") -> None:
    """Replace ``path`` with ``data`` (str: UTF-8) atomically (see :func:`atomic_file`)."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_file(path, tmp, durable=durable, what=what, needed=len(raw)) as f:
        f.write(raw)


def write_json_atomic(path: Path, obj: Any, *, indent: int = 2, default: Optional[Callable[[Any], Any]] = str,
                      tmp: Optional[Path] = None, what: str = "") -> None:
    """Replace ``path`` with :func:`pretty_json` of ``obj`` atomically."""
    write_atomic(path, pretty_json(obj, indent=indent, default=default), tmp=tmp, what=what)


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


# ---------------------------------------------------------------------------------------------- storage errors
# What a file system says when it cannot take a write. Each gets the same treatment (issue 24): one message naming
# the file, the artifact, the space needed where known and the fix; exit 2; nothing partial left behind.
STORAGE_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EIO)
                           if e is not None)
_HEADS = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system",
          errno.EIO: "input/output error (the disk or network file system failed)"}
if hasattr(errno, "EDQUOT"):
    _HEADS[errno.EDQUOT] = "disk quota exceeded"
RESUME = ("then rerun the same command: finished shards are kept, and so are training checkpoints and published "
          "artifacts; it resumes from there")


def is_storage_error(e: BaseException) -> bool:
    """True for an OSError a full, over-quota, read-only or failing file system raises."""
    return isinstance(e, OSError) and e.errno in STORAGE_ERRNOS


def storage_cause(e: BaseException) -> Optional[OSError]:
    """The storage error behind ``e``: ``e`` itself, or one it was raised from or while handling. A library may
    turn a failed write into its own error: ``torch.save`` onto a full disk ends in ``RuntimeError: [enforce
    fail at inline_container.cc] unexpected pos``, raised while handling the OSError."""
    seen: set[int] = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        if is_storage_error(cur):
            return cur  # type: ignore[return-value]
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def storage_error(e: OSError, path: Optional[str | os.PathLike] = None, *, what: str = "",
                  needed: Optional[int | str] = None, artifact: str = "",
                  cls: type[StorageError] = StorageError) -> StorageError:
    """``e`` (a storage error) as a :class:`StorageError` (or subclass ``cls``) about ``path`` (default: the file
    ``e`` names).

    One already translated lower down keeps its file and description; what the caller adds (the artifact,
    the space needed) fills what it lacked. ``needed``: bytes the write needed, when known."""
    if isinstance(e, StorageError):
        e.artifact = e.artifact or artifact
        e.what = e.what or what
        e.needed = e.needed if e.needed is not None else needed
        return e
    # a copy (shutil) names its source as filename and the file it was writing as filename2
    target = next((t for t in (path, getattr(e, "filename2", None), e.filename) if t is not None), "?")
    return cls(e.errno, os.strerror(e.errno), os.fsdecode(target), what=what, needed=needed, artifact=artifact)


def human_bytes(n: float) -> str:
    """``1.2 MiB``: a size for people."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _existing(path: Path) -> Optional[Path]:
    p = Path(os.path.abspath(path))
    for q in (p, *p.parents):
        if q.exists():
            return q
    return None


def mount_point(path: str | os.PathLike) -> str:
    """The mount point of the file system holding ``path`` (or its nearest existing parent)."""
    p = _existing(Path(path))
    if p is None:
        return os.path.abspath(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def free_bytes(path: str | os.PathLike) -> Optional[int]:
    """Bytes free for this user on the file system holding ``path``; None when that cannot be asked."""
    p = _existing(Path(path))
    try:
        return shutil.disk_usage(p).free if p is not None else None
    except OSError:
        return None


def describe_storage_error(e: StorageError) -> str:
    """The one message of a :class:`StorageError`: what failed where, the space, the fix."""
    code, path = e.errno, e.filename
    mount = mount_point(path)
    what = f" ({e.what})" if e.what else ""
    of = f" of {e.artifact}" if e.artifact else ""
    text = f"{_HEADS.get(code, 'write failed')}: writing {path}{what}{of} failed ([Errno {code}] {e.strerror})"
    space = []
    if e.needed is not None:  # bytes, or a sentence when only a bound is known (a shard before compression)
        space.append(f"this write needed {e.needed if isinstance(e.needed, str) else 'about ' + human_bytes(e.needed)}")
    if code == errno.ENOSPC:
        free = free_bytes(path)
        if free is not None:
            space.append(f"{mount} has {human_bytes(free)} free now")
    if space:
        text += "; " + ", ".join(space)
    fix = {errno.ENOSPC: f"free disk space on {mount}",
           errno.EROFS: f"make {mount} writable again (remount it read-write)",
           errno.EIO: f"check the disk holding {mount} (`dmesg` lists device errors; `dkp-pipeline status CONFIG "
                      f"--verify` finds damaged files)"}.get(code, f"free space within your disk quota on {mount} "
                                                              f"(or ask for a larger quota)")
    return f"{text}. Fix: {fix}, {RESUME}"


StorageError.describe = staticmethod(describe_storage_error)  # the errors module's message, written here


# ---------------------------------------------------------------------------------------------- HDF5 writes
class GuardedFile:
    """A binary file for a C library that writes through Python (h5py's ``fileobj`` driver): the first OSError
    of a write is recorded in :attr:`error` instead of being raised into the library.

    Why: when HDF5 itself sees a failed write (disk full), closing the h5py file fails and leaves HDF5 holding a
    half-closed file, which a second close or the interpreter's exit turns into a segmentation fault (seen with
    h5py 3.16 on a full tmpfs). Through this file HDF5 never sees the failure: once a write failed, every later
    write is kept in memory (reads of those bytes are answered from it, so HDF5's metadata stays consistent) and
    nothing more reaches the disk; the caller closes the h5py file normally, then calls :meth:`check`, and
    deletes the temporary. Writes are unbuffered, so an error belongs to the write that caused it.
    """

    _MAX_HELD = 256 << 20  # bytes of failed writes held for read-back; beyond that they are dropped

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._f = open(self.path, "w+b", buffering=0)
        self.error: Optional[OSError] = None
        self._held: dict[int, bytes] = {}  # offset -> bytes written after the first failure
        self._held_bytes = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            pos, done = self._f.tell(), 0
            try:
                while done < len(view):
                    done += self._f.write(view[done:])
                return done
            except OSError as e:
                self.error = e
                self._f.seek(pos)
        pos = self._f.tell()
        if self._held_bytes + len(view) <= self._MAX_HELD:
            self._held[pos] = bytes(view)
            self._held_bytes += len(view)
        self._f.seek(pos + len(view))
        return len(view)

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        pos = self._f.tell()
        n = self._f.readinto(view) or 0
        for off, data in self._held.items():  # bytes that never reached the disk
            lo, hi = max(pos, off), min(pos + len(view), off + len(data))
            if lo < hi:
                view[lo - pos:hi - pos] = data[lo - off:hi - off]
                n = max(n, hi - pos)
        self._f.seek(pos + n)
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._f.seek(0, os.SEEK_END) - self._f.tell())
        buf = bytearray(size)
        return bytes(buf[:self.readinto(buf)])

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def truncate(self, size: Optional[int] = None) -> int:
        if self.error is None:
            try:
                return self._f.truncate(size)
            except OSError as e:
                self.error = e
        return self._f.tell() if size is None else size

    def flush(self) -> None:  # unbuffered: nothing to flush
        return None

    def fileno(self) -> int:
        return self._f.fileno()

    def check(self) -> None:
        """Raise the write error the file system gave, if any."""
        if self.error is not None:
            raise self.error

    def sync(self) -> None:
        """fsync what was written (after the h5py file is closed); raises a recorded or new write error."""
        self.check()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


@contextlib.contextmanager
def h5_written(path: Path, tmp: Path, *, what: str = "", needed: Optional[int] = None, strict_dir: bool = True,
               **h5_options) -> Iterator[Any]:
    """Write an HDF5 file to ``tmp`` through a :class:`GuardedFile` and publish it as ``path``: yields
    ``(h5py.File, guard)`` (``guard.check()`` between large steps stops early on a full disk); on leaving,
    closes the file, fsyncs, renames (:func:`replace_durably` with ``strict_dir``). Any error removes ``tmp``; a
    storage error leaves as a :class:`StorageError` naming ``path``."""
    import h5py

    guard = GuardedFile(tmp)
    try:
        try:
            with h5py.File(guard, "w", **h5_options) as f:
                yield f, guard
            guard.sync()
        finally:
            guard.close()
        replace_durably(tmp, path, strict_dir=strict_dir)
    except BaseException as e:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        if guard.error is not None and not is_storage_error(e):
            e = guard.error  # the failure that stopped the data, not what came of it
        if is_storage_error(e):
            raise storage_error(e, path, what=what, needed=needed) from None
        raise
