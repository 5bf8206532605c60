"""`dkp-pipeline cache verify|export|import|info`: check a depth cache and share it under its artifact key (the
depth stage's sharing: a colleague who imports a cache never runs MiDaS).

An export is the one-file form of :func:`pipeline.depth_cache.export_cache` plus one root attribute,
``artifact_json``: the depth artifact's record (key, the inputs that key hashes, resolved config,
cache spec, skipped frames). Import rebuilds and verifies the cache in a temporary directory of the
store and installs it with that record (``Store.install``: the record, ``COMPLETE``, one rename) as
``STORE/depth/<key[:16]>/`` —
exactly where ``status``/``teach`` look for the depth stage of the config that built it, so whoever
imports it never runs MiDaS.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

from pipeline.errors import CacheError

ARTIFACT_ATTR = "artifact_json"
# Fields of the exporter's artifact.json that travel with the cache (host paths, timings and pids do not).
_SHARED_FIELDS = ("key", "stage", "inputs", "config", "cache_spec", "n_frames", "n_valid", "n_shards",
                  "skipped_frames", "versions", "git_sha")


def _manifest_hashes_for(cache_dir: Path) -> Optional[list[str]]:
    """Frame fingerprints of a manifest artifact over the frames this cache was built from, when it sits in a
    store: found by the frames' fingerprint the cache records (a manifest's key also covers annotations and
    splits, which do not change depth, so the cache does not name one manifest key)."""
    from pipeline.data.manifest import Manifest

    try:
        rec = json.loads((cache_dir / "artifact.json").read_text())
        want = rec["cache_spec"]["manifest_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for mdir in sorted((cache_dir.parent.parent / "manifest").glob("*/")):
        try:
            mrec = json.loads((mdir / "artifact.json").read_text())
        except (OSError, ValueError):
            continue
        if mrec.get("fingerprint") == want and (mdir / "COMPLETE").exists():
            return Manifest.load(mdir / "manifest.json").fingerprints
    return None


def verify_command(cache_dir, console) -> None:
    """Re-check every shard, chunk and frame of ``cache_dir`` (and its frame hashes against its manifest)."""
    from pipeline.depth_cache import verify

    cache_dir = Path(cache_dir)
    expected = _manifest_hashes_for(cache_dir)
    report = verify(cache_dir, expected)
    report.raise_if_failed()
    against = "its manifest's frame fingerprints" if expected is not None else "no manifest (not found in a store)"
    console.print(f"ok: {cache_dir}: {report.frames_checked} frames in {report.n_shards} shards verified "
                  f"(checksums, chunks, shard sha256s; frame hashes against {against})")


def export_command(plan, output, console) -> None:
    """Write the published depth cache of ``plan`` (:func:`pipeline.graph.build_plan` of the config, in its store)
    as one HDF5 file (+ ``.sha256``) carrying its artifact record."""
    from pipeline.depth_cache.transfer import export_cache
    from pipeline.store.io import canonical_json

    cfg, store, sp = plan.cfg, plan.store.root, plan.stages["depth"]
    if sp.state != "fresh":
        why = f": {'; '.join(sp.why)}" if sp.state == "damaged" else ""
        raise CacheError(f"no finished depth cache for {cfg.name!r} in store {store} (depth is {sp.state}, key "
                         f"{sp.key[:16]}{why}); build it with `dkp-pipeline depth {cfg.name} --store {store}` first")
    rec = json.loads((sp.path / "artifact.json").read_text())
    shared = {k: rec[k] for k in _SHARED_FIELDS if k in rec}
    out = Path(output)
    digest = export_cache(sp.path, out, extra_attrs={ARTIFACT_ATTR: canonical_json(shared)})
    side = out.with_name(out.name + ".sha256")
    console.print(f"exported depth cache {sp.key[:16]} ({rec.get('n_frames')} frames) -> {out} "
                  f"({out.stat().st_size / 2**20:.1f} MiB, {digest}; sidecar {side.name})")


def _read_record(file: Path) -> dict:
    import h5py

    from pipeline.stages.depth import DEPTH
    from pipeline.store.artifacts import artifact_key

    try:
        with h5py.File(file, "r", locking=False) as f:
            raw = f.attrs.get(ARTIFACT_ATTR)
            fmt = f.attrs.get("format")
            spec_json = f.attrs.get("spec_json")
    except (OSError, ValueError) as exc:
        raise CacheError(f"{file} cannot be opened as HDF5 ({exc}); it is not a depth cache export or it is "
                         f"truncated, fetch it again") from exc
    if fmt != "dkp-depth-cache-export":
        raise CacheError(f"{file} is not a depth cache export (format {fmt!r}); create one with "
                         f"`dkp-pipeline cache export CONFIG -o FILE`")
    if raw is None:
        raise CacheError(f"{file} carries no artifact record ({ARTIFACT_ATTR} attribute): it was written by "
                         f"depth_cache.export_cache directly; export it with `dkp-pipeline cache export` so the "
                         f"importer can place it under its key")
    rec = json.loads(raw)
    inputs = rec.get("inputs") or {}
    if rec.get("stage") != "depth" or inputs.get("stage") != "depth":
        raise CacheError(f"{file}: the record is for stage {rec.get('stage')!r}, not depth")
    if inputs.get("schema") != DEPTH.schema:
        raise CacheError(f"{file}: exported with depth schema version {inputs.get('schema')}, this dkp-pipeline "
                         f"uses {DEPTH.schema}; rebuild the cache with this version")
    key = artifact_key("depth", inputs["config"], inputs["upstream"], inputs["fingerprint"], schema=DEPTH.schema)
    if key != rec.get("key"):
        raise CacheError(f"{file}: its key {str(rec.get('key'))[:16]}… does not match the inputs it records "
                         f"({key[:16]}…); the record was edited, export it again")
    if json.loads(spec_json) != rec.get("cache_spec"):
        raise CacheError(f"{file}: the cache spec differs from the artifact record's; export it again")
    return rec


def import_command(file, store, console, plan=None) -> None:
    """Verify an export and install it as ``STORE/depth/<key[:16]>/`` (artifact.json + COMPLETE).

    With ``plan`` (of a config, over ``store``): refused unless it is the depth cache the config asks for — the
    spec is compared field by field (the message names every differing field) and every frame hash against the
    local manifest.
    """
    from pipeline.depth_cache.format import CHECKSUMMED_IN_INDEX, spec_diff
    from pipeline.stages.depth import DEPTH
    from pipeline.store.artifacts import LOCK, Lock, Store
    from pipeline.depth_cache.transfer import import_cache

    file = Path(file)
    rec = _read_record(file)
    key = rec["key"]
    st = Store.from_option(store)
    expected_spec, expected_hashes = None, None
    cfg = plan.cfg if plan is not None else None
    if plan is not None:
        from pipeline.stages.depth.identity import expected_spec as spec_for

        sp = plan.stages["depth"]
        want = spec_for(cfg, plan.manifest)
        diffs = spec_diff(rec["cache_spec"], want)
        if diffs:
            raise CacheError(f"{file} is not the depth cache {cfg.name!r} needs: {'; '.join(diffs)}")
        if sp.key != key:
            from pipeline.stages.changes import explain_change

            why = explain_change("depth", rec["inputs"], sp.inputs)
            raise CacheError(f"{file} has depth key {key[:16]}, {cfg.name!r} needs {sp.key[:16]}: {'; '.join(why)}")
        expected_spec, expected_hashes = want, plan.manifest.fingerprints
    final = st.path("depth", key)
    state = st.state("depth", key, outputs=DEPTH.outputs, check=DEPTH.integrity)
    if state.state == "fresh":
        console.print(f"depth cache {key[:16]} is already in {st.root} ({final}); nothing to import")
        return
    if state.state == "damaged":
        from pipeline.store.artifacts import damage_text

        raise CacheError(f"{final} holds this depth cache, damaged ({damage_text(state.damage)}); delete that "
                         f"directory and import again, or re-run `dkp-pipeline depth` to rebuild the damaged shards")
    if final.exists():
        raise CacheError(f"{final} holds an unfinished depth run for the same key; let it finish (`dkp-pipeline "
                         f"depth`) or delete that directory, then import again")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".import-{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with Lock(tmp / LOCK):
            import_cache(file, tmp, expected_spec=expected_spec or rec["cache_spec"],
                         expected_frame_hashes=expected_hashes)
            import datetime as _dt

            record = dict(rec, imported_from=str(file.resolve()),
                          imported_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        try:  # the record listing its files, COMPLETE, then the rename into place: the store's one way to publish
            st.install("depth", key, tmp, record, unhashed=CHECKSUMMED_IN_INDEX)
        except OSError:
            raise CacheError(f"{final} appeared while importing (another import or depth run); nothing was "
                             f"changed, check `dkp-pipeline status`") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    checked = "spec and frame hashes checked against the config" if cfg is not None else "integrity verified"
    console.print(f"imported depth cache {key[:16]} ({rec.get('n_frames')} frames; {checked}) -> {final}")


def info_command(cache_dir, console, as_json: bool = False) -> None:
    """What a depth cache holds: frames, validity, spec (model, weights sha256, resize rule...), size on disk."""
    import json

    from pipeline.depth_cache import DepthCacheReader, progress, read_index

    cache_dir = Path(cache_dir)
    if not (cache_dir / "layout.json").exists() and not (cache_dir / "index.json").exists():
        from pipeline.errors import CacheError

        raise CacheError(f"{cache_dir} is not a depth cache (no layout.json or index.json); depth caches live "
                         "in STORE/depth/<key>/")
    done, total = progress(cache_dir)
    index = read_index(cache_dir)  # CacheError naming the fix when unfinished
    reader = DepthCacheReader(cache_dir)
    n_valid = int(len(reader.valid_indices()))
    size = sum(p.stat().st_size for p in (cache_dir / "shards").glob("*.h5"))
    rec = {}
    try:
        rec = json.loads((cache_dir / "artifact.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    out = {"cache": str(cache_dir), "key": rec.get("key"), "frames": index["n_frames"], "valid": n_valid,
           "shards": index["n_shards"], "storage_dtype": index["storage_dtype"], "values": index["values"],
           "bytes": size, "spec": index["spec"], "skipped_frames": len(rec.get("skipped_frames") or [])}
    reader.close()
    if as_json:
        console.print_json(json.dumps(out))
        return
    from rich.table import Table

    t = Table(title=f"depth cache {cache_dir}", show_header=False, title_justify="left")
    for k in ("key", "frames", "valid", "shards", "storage_dtype", "values", "skipped_frames"):
        t.add_row(k, str(out[k]))
    t.add_row("size on disk", f"{size / 2**20:.1f} MiB ({size / max(out['frames'], 1) / 1024:.1f} KiB/frame)")
    for k, v in sorted(out["spec"].items()):
        t.add_row(f"spec.{k}", str(v))
    console.print(t)
