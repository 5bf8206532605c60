"""Path safety for dataset roots: relative paths that cannot escape the root, symlinks that stay inside it,
and the image walk every layout shares. Each refusal is a :class:`~pipeline.errors.ManifestError` naming the
dataset, the path and the fix."""
from __future__ import annotations

import array
import itertools
import operator
import os
import stat as _stat
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

import numpy as np

from pipeline.data.spec import DatasetSpec
from pipeline.errors import ManifestError
from pipeline.store.fingerprint import Stats


def fail(spec: DatasetSpec, msg: str) -> ManifestError:
    """The error to raise for ``msg`` about dataset ``spec`` (every message names the dataset)."""
    return ManifestError(f"dataset {spec.name}: {msg}")


def refuse_duplicate_ids(spec: DatasetSpec, ids: list[str], message) -> None:
    """A named error for the first id listed twice: ``message(fid, first, second)`` gets the id and the indices of
    its two entries. One set when there is none (a per-frame loop costs seconds at a million frames)."""
    if len(set(ids)) == len(ids):
        return
    first: dict[str, int] = {}
    for i, fid in enumerate(ids):
        j = first.setdefault(fid, i)
        if j != i:
            raise fail(spec, message(fid, j, i))


def safe_relpath(spec: DatasetSpec, root: Path, rel: str, where: str) -> str:
    """``rel`` as a clean POSIX relative path, refusing absolute paths and ``..`` (paths escaping the root)."""
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise fail(spec, f"path {rel!r} in {where} escapes the root {root} (absolute or '..'); "
                         f"paths must be relative to the dataset root")
    return str(p)


class Inside:
    """Checks that files resolve inside the root (symlinks included), caching directory results."""

    def __init__(self, spec: DatasetSpec, root: Path) -> None:
        self.spec, self.root = spec, root
        self.real_root = os.path.realpath(root)
        self._dirs: dict[str, bool] = {}

    def _ok(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)

    def check(self, rel: str, what: str) -> None:
        full = os.path.join(self.root, rel)
        parent = os.path.dirname(full)
        ok = self._dirs.get(parent)
        if ok is None:
            ok = self._dirs[parent] = self._ok(os.path.realpath(parent))
        try:
            is_link = _stat.S_ISLNK(os.lstat(full).st_mode)
        except FileNotFoundError:
            raise fail(self.spec, f"{what} {rel!r} not found under root {self.root} "
                                  f"(did you pass the right --root?)") from None
        if not ok or (is_link and not self._ok(os.path.realpath(full))):
            raise fail(self.spec, f"{what} {rel!r} resolves to {os.path.realpath(full)}, outside the root "
                                  f"{self.root} (a symlink leaving the dataset); copy the file into the root "
                                  f"or point --root at a directory that contains it")

    def check_all(self, rels: Sequence[str], link, what: str, dirs: Optional[Sequence[str]] = None) -> None:
        """:meth:`check` for many files whose ``lstat`` is known (``link``: (N,) bool, which are symlinks): one
        ``realpath`` per directory and per symlink, no system call per plain file. ``dirs``: the real paths of the
        folders the files are in, when the caller walked them (then the files' paths are not split)."""
        if dirs is not None:
            bad = [d for d in dirs if not self._ok(d)]
            if bad:
                rel = next(r for r in rels if self._ok(os.path.realpath(os.path.join(self.root, r))) is False)
                self._refuse(rel, what)
            dirs_to_check: list = []
        else:
            dirs_to_check = sorted({r.rpartition("/")[0] for r in rels})
        for parent in dirs_to_check:
            full = os.path.join(self.root, parent) if parent else str(self.root)
            ok = self._dirs.get(full)
            if ok is None:
                ok = self._dirs[full] = self._ok(os.path.realpath(full))
            if not ok:
                rel = next(r for r in rels if r.rpartition("/")[0] == parent)
                self._refuse(rel, what)
        for i in np.flatnonzero(link).tolist():
            if not self._ok(os.path.realpath(os.path.join(self.root, rels[i]))):
                self._refuse(rels[i], what)

    def _refuse(self, rel: str, what: str) -> None:
        full = os.path.join(self.root, rel)
        raise fail(self.spec, f"{what} {rel!r} resolves to {os.path.realpath(full)}, outside the root "
                              f"{self.root} (a symlink leaving the dataset); copy the file into the root "
                              f"or point --root at a directory that contains it")


def require_dir(spec: DatasetSpec, root: Path, rel: str, hint: str) -> Path:
    p = root / rel
    if not p.is_dir():
        raise fail(spec, f"directory {rel!r} not found under root {root} ({hint})")
    return p


def walk_images(spec: DatasetSpec, root: Path, top: Path, exts: Sequence[str]) -> list[str]:
    """Sorted POSIX paths (relative to ``root``) of image files below ``top``, following in-root symlinks."""
    return walk_images_stat(spec, root, top, exts)[0]


def walk_images_stat(spec: DatasetSpec, root: Path, top: Path, exts: Sequence[str]) -> tuple[list[str], Stats]:
    """:func:`walk_images` and the ``lstat`` of every file it lists (a symlink's target's for links), aligned
    with the list: the stat comes from the directory walk itself (one ``fstatat`` per entry), so the
    fingerprint memo's change detection costs no second pass over a million paths.

    Like ``os.walk(top, followlinks=True)``: symbolic links to folders are followed (a folder met twice, a
    symlink loop, is walked once), unreadable folders are skipped; hidden entries (:func:`hidden`) are not
    listed. A dangling symlink is listed with the stat of the link itself (the scan then names it missing).
    """
    exts = tuple(e.lower() for e in exts)
    root_s, top_s = os.path.abspath(root), os.path.abspath(top)
    rel_top = Path(os.path.relpath(top_s, root_s)).as_posix()
    out: list[str] = []
    # stat fields straight into packed arrays: a million os.stat_result objects would hold ~200 MB
    ino, size, mtime = array.array("Q"), array.array("q"), array.array("q")
    links: list[int] = []  # positions in `out` of symbolic links (checked to stay inside the root)
    seen: set[str] = set()
    file_dirs: list[str] = []  # real paths of the folders that hold listed files (checked to be in the root)
    stack = [(top_s, "" if rel_top == "." else rel_top + "/")]
    islnk = _stat.S_ISLNK
    while stack:
        d, pre = stack.pop()
        real = os.path.realpath(d)
        if real in seen:  # a symlink loop inside the root
            continue
        seen.add(real)
        files, dirs = [], []
        # Through a descriptor of the folder where the OS allows: each stat is then fstatat(fd, name), ~25 %
        # cheaper than resolving the full path again for every file.
        fd = None
        try:
            if _SCANDIR_FD:
                fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            with os.scandir(d if fd is None else fd) as it:
                # comprehensions, not a loop with branches per entry: ~2x faster over a million entries
                entries = [e for e in it if e.name[0] != "." and e.name != "__MACOSX"]  # hidden(), inlined
            image = [e.name.lower().endswith(exts) for e in entries]
            files = [e for e, im in zip(entries, image) if im]
            dirs = [e.name for e, im in zip(entries, image) if not im and _is_dir(e)]
            files.sort(key=_name)
            try:
                sts = [e.stat(follow_symlinks=False) for e in files]
            except OSError:  # a file removed since the folder was listed: not listed either
                files, sts = _still_there(files)
            lk = [islnk(st.st_mode) for st in sts]
            for k in [k for k, is_link in enumerate(lk) if is_link]:
                try:
                    sts[k] = os.stat(files[k].name, dir_fd=fd) if fd is not None else os.stat(files[k].path)
                except OSError:
                    pass  # a dangling link: listed (as os.walk does), named missing by the scan
            if any(_stat.S_ISDIR(st.st_mode) for st in sts):  # a folder named like an image ("x.png/")
                keep = [not _stat.S_ISDIR(st.st_mode) for st in sts]
                dirs += [e.name for e, k in zip(files, keep) if not k]
                files, sts, lk = ([x for x, k in zip(v, keep) if k] for v in (files, sts, lk))
            links += [len(out) + k for k, is_link in enumerate(lk) if is_link]
        except OSError:
            continue  # os.walk's default: an unreadable folder is skipped
        finally:
            if fd is not None:
                os.close(fd)
        if files:
            file_dirs.append(real)
        out += [pre + e.name for e in files]
        ino.extend([st.st_ino for st in sts])
        size.extend([st.st_size for st in sts])
        mtime.extend([st.st_mtime_ns for st in sts])
        stack.extend((os.path.join(d, name), pre + name + "/") for name in sorted(dirs, reverse=True))
    n = len(out)
    stats = Stats(ino=np.frombuffer(ino, dtype=np.uint64).copy(), size=np.frombuffer(size, dtype=np.int64).copy(),
                  mtime=np.frombuffer(mtime, dtype=np.int64).copy(), link=np.zeros(n, dtype=bool), dirs=file_dirs)
    stats.link[links] = True
    if n and not all(a < b for a, b in zip(out, itertools.islice(out, 1, None))):
        # The walk's order is not the sorted one (a folder holding both files and sub-folders, names with
        # characters below "/"): sort, and the stats with it.
        order = np.array(sorted(range(n), key=out.__getitem__), dtype=np.int64)
        out = [out[i] for i in order.tolist()]
        stats = Stats(stats.ino[order], stats.size[order], stats.mtime[order], stats.link[order], stats.dirs)
    return out, stats


_name = operator.attrgetter("name")


def _is_dir(e) -> bool:
    try:
        return e.is_dir()
    except OSError:
        return False


def _still_there(entries: list) -> tuple[list, list]:
    kept, sts = [], []
    for e in entries:
        try:
            sts.append(e.stat(follow_symlinks=False))
            kept.append(e)
        except FileNotFoundError:
            pass
    return kept, sts
_SCANDIR_FD = os.scandir in os.supports_fd and os.stat in os.supports_dir_fd


def hidden(name: str) -> bool:
    """Hidden files and folders (".x"), macOS AppleDouble companions ("._x.jpg": resource forks, not images)
    and the "__MACOSX" folder of zip files: never frames or depth maps."""
    return name.startswith(".") or name == "__MACOSX"


def strip_ext(rel: str) -> str:
    return os.path.splitext(rel)[0]  # only the last component's extension ("a.b/c.png" -> "a.b/c")
