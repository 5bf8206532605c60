import json
import multiprocessing as mp
import os
import subprocess
import sys

import pytest

from pipeline.store.artifacts import COMPLETE, Lock, Store, artifact_key
from pipeline.store.io import atomic_file, canonical_json, write_atomic
from pipeline.config import ExperimentConfig, load_config, semantic_dict
from pipeline.errors import DkpError, LockError

# Pinned: a deliberate change of key semantics (what is hashed, or how) must update these.
GOLDEN_TEACH_DEFAULTS = "10391cf12852c311eceb35fe45f7c97bf2f89fe872b0139879536bcc3f33f75a"  # teach schema 2 (issue 13); lr_schedule, warmup_steps (issue 11)
GOLDEN_SIMPLE = "9bd2a7e99e50183538dc64c78e5fe808fbacc107ca0f83c4b3be12173296fbc0"


def test_golden_keys():
    assert artifact_key("depth", {"provider": "midas", "model_type": "dpt_beit_large_512"},
                        {"manifest": "m" * 64}, "xxh3:0123", schema=1) == GOLDEN_SIMPLE
    cfg = ExperimentConfig()
    # teach's key config (stages/trained.py: the semantic section, fields added later left out at their old value),
    # without the VGG weights' digest it adds (this golden hashes the section alone)
    from pipeline.stages.trained import key_config

    sem = {k: v for k, v in key_config(cfg.teach).items() if k != "vgg_sha256"}
    assert artifact_key("teach", sem, {"depth": "d" * 64}, None, schema=2) == GOLDEN_TEACH_DEFAULTS


def test_canonical_json_is_order_independent():
    assert canonical_json({"b": 1, "a": {"d": 2, "c": 3}}) == '{"a":{"c":3,"d":2},"b":1}'


def _teach_key(overrides):
    cfg = load_config("synthetic", overrides)
    return artifact_key("teach", semantic_dict(cfg.teach), {"depth": "d" * 64}, None, schema=2)


@pytest.mark.parametrize("field", ["teach.lr=0.5", "teach.model.n_keypoints=7", "teach.seed=3", "teach.steps=11"])
def test_key_changes_with_semantic_field(field):
    assert _teach_key([field]) != _teach_key([])


@pytest.mark.parametrize("field", ["teach.num_workers=7", "teach.log_every=3", "teach.device=cpu",
                                   "teach.checkpoint_every=9", "teach.eval_every=2", "name=other"])
def test_key_ignores_excluded_field(field):
    assert _teach_key([field]) == _teach_key([])


def test_key_changes_with_upstream_and_fingerprint():
    base = artifact_key("depth", {}, {"manifest": "a"}, "xxh3:1", schema=1)
    assert artifact_key("depth", {}, {"manifest": "b"}, "xxh3:1", schema=1) != base
    assert artifact_key("depth", {}, {"manifest": "a"}, "xxh3:2", schema=1) != base
    assert artifact_key("teach", {}, {"manifest": "a"}, "xxh3:1", schema=1) != base


def test_interrupted_publish_is_in_progress_never_fresh(tmp_path):
    store = Store(tmp_path)
    key = "a" * 64
    assert store.state("teach", key).state == "missing"
    with pytest.raises(RuntimeError):
        with store.open_for_write("teach", key, inputs={}, config={}) as w:
            (w.path / "partial.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    st = store.state("teach", key)
    assert st.state == "in_progress"
    assert not (st.path / COMPLETE).exists()
    with store.open_for_write("teach", key, inputs={}, config={}) as w:
        assert (w.path / "partial.bin").exists()  # resume point kept
        w.publish(steps=3)
    st = store.state("teach", key)
    assert st.state == "fresh"
    rec = json.loads((st.path / "artifact.json").read_text())
    assert rec["key"] == key and rec["status"] == "complete" and rec["steps"] == 3
    assert {"python", "torch", "numpy", "h5py", "timm"} <= set(rec["versions"])
    assert "command" in rec and "timings" in rec


def test_complete_marker_without_matching_record_is_not_fresh(tmp_path):
    store = Store(tmp_path)
    key = "b" * 64
    p = store.path("teach", key)
    p.mkdir(parents=True)
    (p / COMPLETE).write_text(key)
    # issue 24: a published artifact that lost its record is damaged (rebuilt by `run`), never fresh
    st = store.state("teach", key)
    assert st.state == "damaged" and st.damage == [{"file": "artifact.json", "problem": "missing or unreadable"}]
    # a record of another key (a 16-hex prefix collision) is not ours to repair: not fresh, left alone
    (p / "artifact.json").write_text(json.dumps({"key": "f" * 64}))
    assert store.state("teach", key).state == "in_progress"


def test_second_writer_gets_lock_error(tmp_path):
    store = Store(tmp_path)
    key = "c" * 64
    with store.open_for_write("teach", key, inputs={}, config={}):
        with pytest.raises(LockError, match=f"pid {os.getpid()}"):
            with store.open_for_write("teach", key, inputs={}, config={}):
                pass


def test_second_writer_in_another_process(tmp_path):
    store = Store(tmp_path)
    key = "d" * 64
    code = (
        "import sys; from pipeline.store.artifacts import Store\n"
        f"s = Store({str(tmp_path)!r})\n"
        "from pipeline.errors import LockError\n"
        "try:\n"
        f"    with s.open_for_write('teach', {key!r}, inputs={{}}, config={{}}): pass\n"
        "except LockError as e:\n"
        "    print(e); sys.exit(2)\n"
    )
    with store.open_for_write("teach", key, inputs={}, config={}):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2 and "being written by pid" in r.stdout


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead_pid = p.pid
    import socket

    lock = tmp_path / "LOCK"
    lock.write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "started": "x"}))
    with Lock(lock) as l:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_lock_of_other_host_is_not_broken(tmp_path):
    lock = tmp_path / "LOCK"
    lock.write_text(json.dumps({"pid": 1, "host": "some-other-host", "started": "x"}))
    with pytest.raises(LockError, match="some-other-host"):
        Lock(lock).acquire()


def test_write_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    f = tmp_path / "a.json"
    write_atomic(f, "old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(f, "new")
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_file_error_in_the_block_and_custom_temp_name(tmp_path):
    """The shared writer under write_atomic, checkpoint.save_atomic and the depth cache's JSON files."""
    f = tmp_path / "m.bin"
    f.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(f) as fh:
            fh.write(b"half of the new")
            assert (tmp_path / f".m.bin.tmp-{os.getpid()}").exists()  # the default temp name
            raise RuntimeError("serialiser failed")
    assert f.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]
    with atomic_file(f, tmp_path / "mine.part") as fh:
        fh.write(b"new")
        assert (tmp_path / "mine.part").exists() and f.read_bytes() == b"old"  # not visible before the rename
    assert f.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]


def test_already_complete_cannot_be_rewritten(tmp_path):
    store = Store(tmp_path)
    key = "e" * 64
    with store.open_for_write("teach", key, inputs={}, config={}) as w:
        w.publish()
    with pytest.raises(DkpError, match="already complete"):
        with store.open_for_write("teach", key, inputs={}, config={}):
            pass
