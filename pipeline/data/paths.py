"""Path safety for dataset roots: relative paths that cannot escape the root, symlinks that stay inside it,
and the image walk every layout shares. Each refusal is a :class:`~pipeline.errors.ManifestError` naming the
dataset, the path and the fix."""
from __future__ import annotations

import os
import stat as _stat
from pathlib import Path, PurePosixPath
from typing import Sequence

from pipeline.data.spec import DatasetSpec
from pipeline.errors import ManifestError


def fail(spec: DatasetSpec, msg: str) -> ManifestError:
    """The error to raise for ``msg`` about dataset ``spec`` (every message names the dataset)."""
    return ManifestError(f"dataset {spec.name}: {msg}")


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


def require_dir(spec: DatasetSpec, root: Path, rel: str, hint: str) -> Path:
    p = root / rel
    if not p.is_dir():
        raise fail(spec, f"directory {rel!r} not found under root {root} ({hint})")
    return p


def walk_images(spec: DatasetSpec, root: Path, top: Path, exts: Sequence[str]) -> list[str]:
    """Sorted POSIX paths (relative to ``root``) of image files below ``top``, following in-root symlinks."""
    exts = tuple(e.lower() for e in exts)
    out: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop inside the root
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        rel_dir = Path(os.path.relpath(dirpath, root)).as_posix()  # string joins below: pathlib is slow per file
        pre = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [d for d in dirnames if not hidden(d)]
        out.extend(pre + fn for fn in filenames if fn.lower().endswith(exts) and not hidden(fn))
    return sorted(out)


def hidden(name: str) -> bool:
    """Hidden files and folders (".x"), macOS AppleDouble companions ("._x.jpg": resource forks, not images)
    and the "__MACOSX" folder of zip files: never frames or depth maps."""
    return name.startswith(".") or name == "__MACOSX"


def strip_ext(rel: str) -> str:
    return os.path.splitext(rel)[0]  # only the last component's extension ("a.b/c.png" -> "a.b/c")
