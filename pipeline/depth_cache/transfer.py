"""Share a depth cache as one file: :func:`export_cache` writes a verified cache as one HDF5 file plus a
``.sha256`` sidecar; :func:`import_cache` rebuilds and verifies a cache directory from it."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py

from pipeline.depth_cache.format import (EXPORT_FORMAT, INDEX_FILE, LAYOUT_FILE, SCHEMA_VERSION, SHARD_DIR, VALUES,
                                         load_index, normalize_spec, shard_name, spec_diff, tmp_name, write_json)
from pipeline.depth_cache.verify import verify
from pipeline.depth_cache.writer import CacheWriter, finalize
from pipeline.errors import CacheError
from pipeline.store.io import canonical_json, h5_written, sha256_file, write_atomic


def export_cache(cache_dir: str | os.PathLike, out_file: str | os.PathLike, *,
                 extra_attrs: Mapping[str, str] | None = None) -> str:
    """Write the whole (verified) cache as ONE HDF5 file plus ``<out_file>.sha256``; returns ``'sha256:<hex>'``.

    Layout of the file: root attrs ``format``, ``schema_version``, ``values``, ``index_json`` (the cache's
    index.json), ``spec_json`` and ``spec.*`` (and ``extra_attrs``, e.g. the artifact record); one group
    ``shards/shard-NNNNN`` per shard holding its datasets (compressed chunks copied as they are) and attributes.
    A full disk is a :class:`~pipeline.errors.StorageError` naming ``out_file``; nothing is left at that name.
    """
    cache_dir, out_file = Path(cache_dir), Path(out_file)
    report = verify(cache_dir)
    report.raise_if_failed()
    index = load_index(cache_dir)
    tmp = tmp_name(out_file)
    side = out_file.with_name(out_file.name + ".sha256")
    needed = sum(int(e["bytes"]) for e in index["shards"])
    with h5_written(out_file, tmp, what="depth cache export", needed=needed) as (dst, guard):
        side.unlink(missing_ok=True)  # an older export's sidecar must never vouch for this file
        dst.attrs["format"] = EXPORT_FORMAT
        dst.attrs["schema_version"] = SCHEMA_VERSION
        dst.attrs["values"] = VALUES
        dst.attrs["index_json"] = canonical_json(index)
        dst.attrs["spec_json"] = canonical_json(index["spec"])
        for key, value in sorted(index["spec"].items()):
            if isinstance(value, (str, bool, int, float)):
                dst.attrs[f"spec.{key}"] = value
        for key, value in (extra_attrs or {}).items():
            dst.attrs[key] = value
        shards = dst.create_group("shards")
        for entry in index["shards"]:
            with h5py.File(cache_dir / entry["file"], "r", locking=False) as src:
                group = shards.create_group(shard_name(entry["shard"]))
                for key, value in src.attrs.items():
                    group.attrs[key] = value
                group.attrs["entry_json"] = canonical_json(entry)
                for name in src:
                    src.copy(src[name], group, name=name)
            guard.check()  # disk full: stop here rather than copy the rest into memory
    digest = sha256_file(out_file)
    write_sidecar(out_file, digest)
    return digest


def write_sidecar(file: Path, digest: str) -> Path:
    """Write ``<file>.sha256`` (``sha256sum`` format: ``<hex>  <name>``) for ``digest`` = ``'sha256:<hex>'``."""
    side = file.with_name(file.name + ".sha256")
    write_atomic(side, f"{digest.split(':', 1)[1]}  {file.name}\n", tmp=tmp_name(side), what="the export's checksum")
    return side


def import_cache(file: str | os.PathLike, dest_dir: str | os.PathLike, *,
                 expected_spec: Mapping[str, Any] | None = None,
                 expected_frame_hashes: Sequence[str] | None = None) -> dict:
    """Rebuild a cache directory from an exported file and verify it; returns the cache's spec.

    Checks, before anything is trusted: the ``.sha256`` file beside ``file`` (when present), the export
    format, ``expected_spec`` (field by field) and, after rebuilding, a full :func:`verify` including
    ``expected_frame_hashes`` (the local manifest's). On any failure nothing is left in ``dest_dir``.
    """
    file, dest_dir = Path(file), Path(dest_dir)
    side = file.with_name(file.name + ".sha256")
    if side.exists():
        want = "sha256:" + side.read_text(encoding="utf-8").split()[0]
        have = sha256_file(file)
        if have != want:
            raise CacheError(f"{file}: {have} does not match {side} ({want}); the download is damaged, "
                             f"fetch the export again")
    try:
        src = h5py.File(file, "r", locking=False)
    except (OSError, ValueError) as exc:
        raise CacheError(f"{file} cannot be opened as HDF5 ({exc}); it is not a depth cache export or it is "
                         f"truncated, fetch it again") from exc
    with src:
        if src.attrs.get("format") != EXPORT_FORMAT:
            raise CacheError(f"{file} is not a depth cache export (format attribute {src.attrs.get('format')!r}); "
                             f"create one with `dkp-pipeline cache export`")
        index = json.loads(src.attrs["index_json"])
        if index.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(f"{file}: schema_version {index.get('schema_version')!r}, this tool reads "
                             f"{SCHEMA_VERSION}; export it again with this version of dkp-pipeline")
        if expected_spec is not None:
            diffs = spec_diff(index["spec"], normalize_spec(expected_spec))
            if diffs:
                raise CacheError(f"{file} was built with another spec: {'; '.join(diffs)}; it cannot stand in for "
                                 f"this config's depth cache")
        if (dest_dir / INDEX_FILE).exists() or (dest_dir / LAYOUT_FILE).exists() or (
                (dest_dir / SHARD_DIR).is_dir() and any((dest_dir / SHARD_DIR).iterdir())):
            raise CacheError(f"{dest_dir} already holds a depth cache; delete it first or import elsewhere")
        created = [dest_dir / LAYOUT_FILE, dest_dir / INDEX_FILE, dest_dir / SHARD_DIR]
        try:
            writer = CacheWriter(dest_dir, spec=index["spec"], n_frames=index["n_frames"],
                                 shard_size=index["shard_size"], storage_dtype=index["storage_dtype"])
            for entry in index["shards"]:
                _import_shard(src, writer, entry)
            finalize(dest_dir)
            report = verify(dest_dir, expected_frame_hashes)
            report.raise_if_failed()
        except BaseException:
            for path in created:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            raise
    return index["spec"]


def _import_shard(src: h5py.File, writer: CacheWriter, entry: dict) -> None:
    plan = writer.plan(entry["shard"])
    name = f"shards/{plan.name}"
    if name not in src or entry.get("frames") != [plan.start, plan.stop]:
        raise CacheError(f"{src.filename}: group {name} missing or its frame range differs from the index; "
                         f"the export is damaged, export it again")
    group = src[name]
    final = writer.cache_dir / SHARD_DIR / f"{plan.name}.h5"
    tmp = tmp_name(final)
    with h5_written(final, tmp, what=f"imported depth cache shard, frames {plan.start}..{plan.stop - 1}",
                    needed=int(entry.get("bytes", 0)) or None) as (dst, _guard):
        for key, value in group.attrs.items():
            if key != "entry_json":
                dst.attrs[key] = value
        for ds_name in group:
            src.copy(group[ds_name], dst, name=ds_name)
    size, digest = final.stat().st_size, sha256_file(final)
    # Copied files are not byte-identical to the sender's, so sha256/bytes are this file's own; the data
    # itself is checked frame by frame (checksums + frame hashes digest) by verify() afterwards.
    new_entry = dict(entry, bytes=size, sha256=digest)
    write_json(final.with_suffix(".json"), new_entry)
