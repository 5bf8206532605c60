"""pipeline.store.io: the shared canonical JSON, hashing and atomic-write helpers.

The canonical-JSON options are pinned against the literal ``json.dumps`` calls each key was computed with
before the helpers were merged (artifact keys, depth-cache specs, the manifest's description digest, the
training config digest), so a change of default that would move a key fails here by name.
"""
import hashlib
import json
import math
import os
from pathlib import Path

import pytest

from pipeline.store import io

VALUES = [{"b": 1, "a": {"d": [1.5, None, True], "c": "é ü 日本"}}, [0.1, 1e-30, -0.0, 2**70], "x", 3, None]


@pytest.mark.parametrize("obj", VALUES)
def test_canonical_json_matches_each_former_variant(obj):
    compact = {"sort_keys": True, "separators": (",", ":")}
    assert io.canonical_json(obj) == json.dumps(obj, **compact, ensure_ascii=True, allow_nan=False)  # artifacts
    assert io.canonical_json(obj) == json.dumps(obj, **compact, allow_nan=False)  # depth cache
    assert io.canonical_json(obj, allow_nan=True) == json.dumps(obj, **compact)  # manifest description
    assert io.canonical_json(obj, allow_nan=True, default=str) == json.dumps(obj, **compact, default=str)  # train
    assert io.json_digest(obj, allow_nan=True) == hashlib.sha256(json.dumps(obj, **compact).encode()).hexdigest()


def test_canonical_json_options_are_the_callers():
    with pytest.raises(ValueError):
        io.canonical_json({"x": math.nan})  # keys refuse NaN unless the caller always allowed it
    assert io.canonical_json({"x": math.nan}, allow_nan=True) == '{"x":NaN}'
    with pytest.raises(TypeError):
        io.canonical_json({"p": Path("a")})
    assert io.canonical_json({"p": Path("a")}, default=str) == '{"p":"a"}'
    assert io.pretty_json({"b": 1, "a": 2}, indent=1) == '{\n "a": 2,\n "b": 1\n}\n'


def test_sha256_file_streams_in_chunks(tmp_path):
    data = os.urandom(2 * io.HASH_CHUNK + 5)
    p = tmp_path / "w.bin"
    p.write_bytes(data)
    hexd = hashlib.sha256(data).hexdigest()
    assert io.sha256_file(p) == "sha256:" + hexd and io.sha256_file(p, prefix="") == hexd
    a, b = hashlib.sha256(), hashlib.md5()
    assert io.stream_file(p, a, b) == data[:io.HASH_CHUNK]  # the head probes look at
    assert a.hexdigest() == hexd and b.hexdigest() == hashlib.md5(data).hexdigest()
    assert io.sha256_text("é") == hashlib.sha256("é".encode("utf-8")).hexdigest()


def test_durable_writes_fsync_and_quick_ones_do_not(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    io.write_atomic(tmp_path / "a", "x", durable=False)
    assert calls == [] and (tmp_path / "a").read_text() == "x"
    io.write_json_atomic(tmp_path / "b.json", {"p": Path("q")})
    assert len(calls) == 2  # the file, then its directory
    assert (tmp_path / "b.json").read_text() == '{\n  "p": "q"\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.json"]


def test_fsync_path_reports_errors_and_fsync_dir_does_not(tmp_path):
    with pytest.raises(FileNotFoundError):
        io.fsync_path(tmp_path / "missing")
    io.fsync_dir(tmp_path / "missing")  # best effort: a file system without directory fsync is not an error


def test_replace_durably_and_remove_temporaries_of(tmp_path):
    tmp, final = tmp_path / ".f.tmp-1", tmp_path / "f"
    tmp.write_text("new")
    io.replace_durably(tmp, final)
    assert final.read_text() == "new" and not tmp.exists()
    (tmp_path / "sub").mkdir()
    left = [tmp_path / ".g.tmp-4242", tmp_path / "sub" / "h.tmp-4242"]
    for p in left:
        p.write_text("half")
    (tmp_path / ".k.tmp-77").write_text("a live writer's")
    assert sorted(io.remove_temporaries_of(tmp_path, 4242)) == sorted(left)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [".k.tmp-77", "f"]


def test_replace_durably_strict_or_best_effort_directory_fsync(tmp_path, monkeypatch):
    def refuse(path):
        raise OSError(22, "Invalid argument")  # e.g. a file system without directory fsync

    monkeypatch.setattr(io, "fsync_path", refuse)
    (tmp_path / "a.tmp").write_text("a")
    with pytest.raises(OSError):
        io.replace_durably(tmp_path / "a.tmp", tmp_path / "a")
    (tmp_path / "b.tmp").write_text("b")
    io.replace_durably(tmp_path / "b.tmp", tmp_path / "b", strict_dir=False)
    assert (tmp_path / "b").read_text() == "b"
