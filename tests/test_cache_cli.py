"""`dkp-pipeline cache verify|export|import` on the tiny experiment's depth cache (provider files).

verify: exit 0 on a good cache, 2 naming shard and frame on a corrupted chunk; export -> import into another
store puts the cache under the key `status` and `teach` look up (so teach never runs the depth stage); a
cache that does not fit the config, a tampered record or a foreign file is refused naming what differs.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import h5py
import pytest

from tests.conftest import quiet_console, run_cli, tiny_folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Data, experiment YAML and a store holding the depth cache, built once in-process."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    with tiny_folder(tmp_path_factory, "built", data=True) as tmp:
        run_pipeline(load_config(str(tmp / "tiny.yaml")), str(tmp / "store"), until="depth", console=quiet_console())
    return tmp


def _copy(built, tmp_path) -> dict:
    shutil.copytree(built / "store", tmp_path / "store")
    (depth,) = list((tmp_path / "store" / "depth").iterdir())
    return {"yaml": str(built / "tiny.yaml"), "store": str(tmp_path / "store"), "depth": depth}


def _ok(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_verify_good_then_corrupted_chunk(built, tmp_path):
    exp = _copy(built, tmp_path)
    r = _ok(run_cli(["cache", "verify", str(exp["depth"])]))
    assert "48 frames in 3 shards verified" in r.stdout and "against its manifest" in r.stdout
    shard = exp["depth"] / "shards" / "shard-00001.h5"  # frames 16..31
    with h5py.File(shard, "r") as f:
        info = f["depth"].id.get_chunk_info(4)  # row 4 = frame 20
        fid = f["frame_id"].asstr()[4]
    raw = bytearray(shard.read_bytes())
    raw[info.byte_offset + info.size // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    r = run_cli(["cache", "verify", str(exp["depth"])])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "shards/shard-00001.h5: frame 20" in r.stderr.replace("\n", "") and fid in r.stderr
    assert "shard-00000" not in r.stderr and "shard-00002" not in r.stderr  # the others are fine


def test_verify_catches_frames_that_are_not_the_manifests(built, tmp_path):
    """The cache's frame hashes are checked against the manifest artifact it was built from."""
    exp = _copy(built, tmp_path)
    (mfile,) = (Path(exp["store"]) / "manifest").glob("*/manifest.json")  # the one manifest of the store
    m = json.loads(mfile.read_text())
    m["frames"]["fingerprint"][7] = "xxh3:" + "0" * 32
    from pipeline.store.fingerprint import combine

    m["fingerprint"] = combine(m["frames"]["fingerprint"])
    mfile.write_text(json.dumps(m))
    r = run_cli(["cache", "verify", str(exp["depth"])])
    assert r.returncode == 2 and "frame 7" in r.stderr and "the frame file differs" in r.stderr, r.stderr


def _export_import(built, tmp_path):
    exp = _copy(built, tmp_path)
    out = tmp_path / "share" / "depth.h5"
    out.parent.mkdir()
    _ok(run_cli(["cache", "export", exp["yaml"], "--store", exp["store"], "-o", str(out)]))
    assert out.is_file() and (out.parent / "depth.h5.sha256").read_text().split()[1] == "depth.h5"
    key = json.loads((exp["depth"] / "artifact.json").read_text())["key"]
    with h5py.File(out, "r") as f:
        rec = json.loads(f.attrs["artifact_json"])
    assert rec["key"] == key and rec["inputs"]["stage"] == "depth" and "cache_spec" in rec

    other = tmp_path / "other"
    r = _ok(run_cli(["cache", "import", str(out), "--store", str(other), "--config", exp["yaml"]]))
    assert "imported depth cache" in r.stdout
    installed = other / "depth" / key[:16]
    assert (installed / "COMPLETE").read_text().strip() == key
    assert json.loads((installed / "artifact.json").read_text())["imported_from"] == str(out.resolve())
    return exp, out, other, key, installed


def test_export_import_into_another_store_is_fresh_there(built, tmp_path):
    from pipeline.depth_cache import DepthCacheReader

    exp, out, other, key, installed = _export_import(built, tmp_path)
    r = _ok(run_cli(["status", exp["yaml"], "--store", str(other), "--json"]))
    st = {s["stage"]: s for s in json.loads(r.stdout)}
    assert st["depth"]["state"] == "fresh" and st["depth"]["key"] == key

    before = {p: p.stat().st_mtime_ns for p in installed.rglob("*")}
    r = _ok(run_cli(["run", exp["yaml"], "--store", str(other), "--until", "depth"]))
    assert "depth    fresh" in r.stdout and "reused" in r.stdout and "depth    built" not in r.stdout
    assert {p: p.stat().st_mtime_ns for p in installed.rglob("*")} == before  # untouched: depth never ran
    with DepthCacheReader(installed) as a, DepthCacheReader(exp["depth"]) as b:
        assert len(a) == len(b) == 48
        for i in range(48):
            assert (a.read(i) == b.read(i)).all() and a.frame_hash(i) == b.frame_hash(i)

    r = _ok(run_cli(["cache", "import", str(out), "--store", str(other)]))
    assert "already in" in r.stdout


@pytest.mark.slow  # teach on 2 busy cores: ~40 s
def test_teach_after_import_never_runs_depth(built, tmp_path):
    exp, out, other, key, installed = _export_import(built, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in installed.rglob("*")}
    r = _ok(run_cli(["teach", exp["yaml"], "--store", str(other)]))
    assert "teach    built" in r.stdout and "depth    " not in r.stdout
    assert sorted(p.name for p in (other / "depth").iterdir()) == [key[:16]]  # no second depth artifact
    assert {p: p.stat().st_mtime_ns for p in installed.rglob("*")} == before


def test_import_refuses_a_cache_the_config_does_not_need(built, tmp_path):
    from rich.console import Console

    from pipeline.stages.depth.share import export_command, import_command
    from pipeline.config import load_config
    from pipeline.errors import CacheError

    exp = _copy(built, tmp_path)
    out = tmp_path / "d.h5"
    from pipeline.graph import build_plan
    from pipeline.store.artifacts import Store

    export_command(build_plan(load_config(exp["yaml"]), Store(exp["store"]), progress=False), out,
                   Console(file=io.StringIO()))
    r = run_cli(["cache", "import", str(out), "--store", str(tmp_path / "o1"), "--config", exp["yaml"],
                 "--set", "depth.storage_dtype=float32"])
    assert r.returncode == 2 and "storage_dtype: cache 'float16', expected 'float32'" in r.stderr, r.stderr
    assert not (tmp_path / "o1" / "depth").exists() or not any((tmp_path / "o1" / "depth").iterdir())

    # A record whose key does not match its inputs (hand-edited) is refused.
    bad = tmp_path / "bad.h5"
    shutil.copy(out, bad)
    with h5py.File(bad, "r+") as f:
        rec = json.loads(f.attrs["artifact_json"])
        rec["inputs"]["config"]["storage_dtype"] = "float32"
        f.attrs["artifact_json"] = json.dumps(rec)
    with pytest.raises(CacheError, match="does not match the inputs it records"):
        import_command(bad, tmp_path / "o2", Console(file=io.StringIO()))
    # ... and so is a damaged download (the .sha256 sidecar no longer fits).
    shutil.copy(out.with_name("d.h5.sha256"), bad.with_name("bad.h5.sha256"))
    rec["inputs"]["config"]["storage_dtype"] = "float16"
    with h5py.File(bad, "r+") as f:
        f.attrs["artifact_json"] = json.dumps(rec)
    with pytest.raises(CacheError, match="download is damaged"):
        import_command(bad, tmp_path / "o3", Console(file=io.StringIO()))
    assert not (tmp_path / "o3" / "depth").exists() or not any((tmp_path / "o3" / "depth").iterdir())

    not_export = tmp_path / "plain.h5"
    with h5py.File(not_export, "w") as f:
        f["x"] = [1]
    r = run_cli(["cache", "import", str(not_export), "--store", str(tmp_path / "o4")])
    assert r.returncode == 2 and "is not a depth cache export" in r.stderr


def test_export_without_a_built_cache_is_exit_2(built, tmp_path):
    exp = _copy(built, tmp_path)
    r = run_cli(["cache", "export", exp["yaml"], "--store", exp["store"], "--set", "depth.storage_dtype=float32",
                 "-o", str(tmp_path / "x.h5")])
    assert r.returncode == 2 and "no finished depth cache" in r.stderr and "dkp-pipeline depth" in r.stderr
    assert not (tmp_path / "x.h5").exists()
