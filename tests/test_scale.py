"""What makes a million frames cheap (issue 23): the folder walk's own stats, keypoints.csv checked in chunks of
rows and its parse cached, the manifest built once per torchrun job, and locks whose holder died on another node
explained in `status` and taken over. Speed itself is measured by `dkp-pipeline bench scale`, never asserted."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.build import build_manifest
from pipeline.data.layouts import folder as folder_layout
from pipeline.data.paths import walk_images, walk_images_stat
from pipeline.data.spec import load_spec
from pipeline.errors import LockError, ManifestError
from pipeline.store.artifacts import Lock, Store
from tests.test_manifest import OLD, _age, img

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# the walk


def _os_walk_listing(root: Path, top: Path, exts) -> list[str]:
    """What walk_images listed before issue 23 (os.walk, followlinks), for comparison."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        rel = Path(os.path.relpath(dirpath, root)).as_posix()
        pre = "" if rel == "." else rel + "/"
        out += [pre + f for f in filenames if f.lower().endswith(exts) and not f.startswith(".") and f != "__MACOSX"]
    return sorted(out)


def test_walk_lists_what_os_walk_did_with_the_stat_of_each_file(tmp_path):
    root = tmp_path / "ds"
    im = root / "images"
    for rel in ("a.png", "b/c.png", "b-x/d.JPG", "b/e/f.jpg", "g.png/h.png", ".hidden.png", "__MACOSX/i.png",
                "b/j.txt", "k.jpeg"):
        p = im / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rel.encode())
    os.symlink(im / "a.png", im / "b" / "link.png")  # an in-root file link
    os.symlink(im / "b", im / "b" / "e" / "loop")  # a folder link back up: walked once
    os.symlink(im / "missing.png", im / "dangling.png")
    exts = (".png", ".jpg", ".jpeg")
    names, st = walk_images_stat(load_spec("folder", root), root, im, exts)
    assert names == _os_walk_listing(root, im, exts) == walk_images(load_spec("folder", root), root, im, exts)
    assert names != sorted(names, key=lambda r: r.split("/"))  # "b-x/.." before "b/..": the re-sort ran
    for k, rel in enumerate(names):
        p = root / rel
        want = os.lstat(p) if rel.endswith("dangling.png") else os.stat(p)
        assert (int(st.ino[k]), int(st.size[k]), int(st.mtime[k])) == (want.st_ino, want.st_size, want.st_mtime_ns)
        assert bool(st.link[k]) == os.path.islink(p)


def test_a_symlinked_frame_leaving_the_root_is_refused_before_it_is_read(tmp_path, fingerprint_reads):
    root = tmp_path / "ds"
    img(root / "images" / "a.png", 8, 8)
    outside = img(tmp_path / "elsewhere.png", 8, 8)
    os.symlink(outside, root / "images" / "b.png")
    with pytest.raises(ManifestError, match="outside the root"):
        build_manifest("folder", root, progress=False)
    assert fingerprint_reads == []


# --------------------------------------------------------------------------------------------------
# keypoints.csv


def _csv_dataset(root: Path, n: int, rows: list[str]) -> Path:
    for i in range(n):
        img(root / "images" / f"f{i}.png", 10, 8)
    (root / "keypoints.csv").write_text("frame,split,x0,y0,x1,y1\n" + "".join(r + "\n" for r in rows))
    _age(root / "keypoints.csv")
    return root


@pytest.mark.parametrize("rows, message", [
    (["f0,train,1,1,2,2", "f1,train,1,1,2,2", "", "f2,test,1,1,,", "f0,test,1,1,2,2"],
     "line 6: duplicate frame id 'f0' (first on line 2)"),  # across chunks, a blank row between
    (["f0,train,1,1,2,2", "f1,train,1,1,2,2", "f2,train,1,1,2,2", "f3,val,1,1,2,2"],
     "line 5: split 'val' is not one of train, test"),
    (["f0,train,1,1,2,2", "f1,train,1,1,2,2", "f2,train,1,x,2,2", "f3,train,1,1,2,"],
     "line 4: joint 0 ('1', 'x') is not a number"),  # the first of two bad rows in one chunk
    (["f0,train,1,1,2,2", "f1,train,1,1,2,2", "f2,train,1,1,2,2", "f3,train,1,1,inf,2"],
     "line 5: joint 1 ('inf', '2') is not finite"),
    (["f0,train,1,1,2,2", "f1,train,1,1,2,2", "f2,train,1,1,2,2", "f3,train,1,1,2,2", "f9,train,1,1,2,2"],
     "line 6: frame 'f9' has no image"),
])
def test_csv_errors_in_any_chunk_name_the_first_bad_line(tmp_path, monkeypatch, rows, message):
    monkeypatch.setattr(folder_layout, "CHUNK_ROWS", 2)
    root = _csv_dataset(tmp_path / "ds", 5, rows)
    with pytest.raises(ManifestError, match="keypoints.csv") as e:
        build_manifest("folder", root, progress=False)
    assert message in str(e.value)


def test_csv_parse_is_cached_under_its_content_and_the_frames(tmp_path, monkeypatch):
    monkeypatch.setenv("DKP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(folder_layout, "CHUNK_ROWS", 2)
    root = _csv_dataset(tmp_path / "ds", 5, ["f3,test,1.5,2,,", "f0,train,3,4,5,6", "f4,train,,,7,0.5"])
    parses = []
    real = folder_layout._parse_csv
    monkeypatch.setattr(folder_layout, "_parse_csv", lambda *a: parses.append(1) or real(*a))
    m1 = build_manifest("folder", root, progress=False)
    m2 = build_manifest("folder", root, progress=False)
    assert len(parses) == 1 and m2.splits == m1.splits == ["train", "train", "train", "test", "train"]
    assert np.array_equal(m1.keypoints, m2.keypoints, equal_nan=True)
    assert m1.keypoints[3].tolist()[0] == [1.5, 2.0] and np.isnan(m1.keypoints[3][1]).all()
    assert m1.keypoints[4].tolist()[1] == [7.0, 0.5] and np.isnan(m1.keypoints[1]).all()
    (root / "keypoints.csv").write_text("frame,split,x0,y0,x1,y1\nf1,test,1,1,2,2\n")  # edited
    _age(root / "keypoints.csv")
    os.utime(root / "keypoints.csv", (OLD + 50, OLD + 50))
    m3 = build_manifest("folder", root, progress=False)
    assert len(parses) == 2 and m3.splits[1] == "test" and m3.splits[3] == "train"
    img(root / "images" / "f5.png", 10, 8)  # a new frame: the rows map to other indices
    m4 = build_manifest("folder", root, progress=False)
    assert len(parses) == 3 and len(m4) == 6 and m4.splits[1] == "test"


# --------------------------------------------------------------------------------------------------
# locks left by a crashed rank on another node


def _remote_lock(path: Path, age_s: float, heartbeat: bool = True) -> dict:
    owner = {"pid": 4242, "host": "node-that-died", "started": "2026-01-01T00:00:00+00:00"}
    if heartbeat:
        owner["heartbeat_s"] = 30.0
    path.write_text(json.dumps(owner))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return owner


def test_a_remote_lock_without_heartbeat_for_long_is_taken_over(tmp_path):
    lock = tmp_path / "LOCK"
    _remote_lock(lock, age_s=3600)
    owner = Lock(lock).read_owner()
    assert Lock(lock).stale(owner) and "crashed rank" in Lock(lock).describe(owner)
    with Lock(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_remote_lock_with_a_recent_heartbeat_or_none_at_all_is_left_alone(tmp_path):
    lock = tmp_path / "LOCK"
    _remote_lock(lock, age_s=20)
    with pytest.raises(LockError, match="node-that-died"):
        Lock(lock).acquire()
    assert "heartbeat 20 s ago" in Lock(lock).describe(Lock(lock).read_owner())
    _remote_lock(lock, age_s=36000, heartbeat=False)  # a lock of a version without heartbeats: never judged
    with pytest.raises(LockError, match="node-that-died"):
        Lock(lock).acquire()
    assert f"remove {lock}" in Lock(lock).describe(Lock(lock).read_owner())


def test_the_holder_renews_its_lock_and_never_publishes_once_taken_over(tmp_path):
    store = Store(tmp_path)
    key = "e" * 64
    with store.open_for_write("teach", key, inputs={}, config={}) as w:
        lock = w.lock
        assert lock.heartbeat_s == 30.0
        os.utime(lock.path, (OLD, OLD))
        lock._stop.set()  # this holder's heartbeat as if frozen, then another node takes the lock over
        _remote_lock(lock.path, age_s=0)
        with pytest.raises(LockError, match="taken over by pid 4242 on node-that-died"):
            w.publish()
    assert not (tmp_path / "teach" / key[:16] / "COMPLETE").exists()
    assert json.loads((lock.path).read_text())["host"] == "node-that-died"  # release left the new owner's lock


def test_a_holders_heartbeat_keeps_its_lock_fresh(tmp_path):
    lock = Lock(tmp_path / "LOCK", heartbeat_s=0.05)
    lock.acquire()
    try:
        os.utime(lock.path, (OLD, OLD))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 5
    finally:
        lock.release()


def test_status_explains_a_lock_left_on_another_node(tmp_path):
    store = Store(tmp_path)
    key = "f" * 64
    p = store.path("teach", key)
    p.mkdir(parents=True)
    _remote_lock(p / "LOCK", age_s=7200)
    st = store.state("teach", key)
    assert st.state == "in_progress" and "interrupted: pid 4242 on node-that-died" in st.locked_by["note"]
    _remote_lock(p / "LOCK", age_s=5)
    assert "being written by pid 4242 on node-that-died (heartbeat" in store.state("teach", key).locked_by["note"]
    assert socket.gethostname() != "node-that-died"


# --------------------------------------------------------------------------------------------------
# one manifest build per torchrun job

_RANK = """
import json, os, sys
from pipeline.store import fingerprint as F
from pipeline.data import build as B
reads, walks = [], []
real_read, real_walk = F._read_and_digest, B.WALKERS["folder"]
F._read_and_digest = lambda *a, **k: reads.append(1) or real_read(*a, **k)
B.WALKERS["folder"] = lambda *a: walks.append(1) or real_walk(*a)
from pipeline.config import load_config
from pipeline.graph import build_plan
from pipeline.store.artifacts import Store
plan = build_plan(load_config(sys.argv[1], []), Store(sys.argv[2]), progress=False)
print(json.dumps({"keys": {k: s.key for k, s in plan.stages.items()}, "reads": len(reads), "walks": len(walks)}))
"""


def _two_ranks(tmp_path, cfg):
    """Ranks 1 and 0 of a 2-rank job (the follower started first: it must wait) planning ``cfg`` against a c10d
    store as torchrun's agent serves it; (processes, their (stdout, stderr)), follower first."""
    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(server.port),
               TORCHELASTIC_USE_AGENT_STORE="True", DKP_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(cfg), str(tmp_path / "store")],
                              env=env | {"RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (1, 0)]
    return procs, [p.communicate(timeout=300) for p in procs]


def test_under_torchrun_rank_0_alone_walks_and_hashes_the_dataset(tmp_path):
    """Two ranks against a c10d store as torchrun's agent serves it: rank 1 waits for rank 0's manifest and reads
    no frame (on another node its memo would be cold: every frame hashed again), and both plan the same keys."""
    root = tmp_path / "data"
    for i in range(6):
        img(root / "images" / f"f{i}.png", 10, 8)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"name": "t", "data": {"manifest": "folder", "root": str(root)}}))
    procs, outs = _two_ranks(tmp_path, cfg)
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    follower, leader = (json.loads(o[0].strip().splitlines()[-1]) for o in outs)
    assert leader["walks"] == 1 and leader["reads"] == 6
    assert follower["walks"] == 0 and follower["reads"] == 0
    assert follower["keys"] == leader["keys"]
    assert len(list((tmp_path / "store" / ".handoff").glob("manifest-*.json"))) == 1


def test_a_manifest_error_on_rank_0_is_every_ranks_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    (tmp_path / "data" / "images").mkdir(parents=True)  # no frames: rank 0's build fails
    cfg.write_text(json.dumps({"name": "t", "data": {"manifest": "folder", "root": str(tmp_path / "data")}}))
    procs, outs = _two_ranks(tmp_path, cfg)
    assert all(p.returncode != 0 for p in procs)
    assert "rank 0 could not build the manifest: dataset folder: no images" in outs[0][1]


def test_a_symlinked_folder_leaving_the_root_is_refused_only_when_it_holds_frames(tmp_path):
    root = tmp_path / "ds"
    img(root / "images" / "a.png", 8, 8)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "notes.txt").write_text("no frames here")
    os.symlink(tmp_path / "outside", root / "images" / "ext")
    assert len(build_manifest("folder", root, progress=False)) == 1
    img(tmp_path / "outside" / "b.png", 8, 8)
    with pytest.raises(ManifestError, match="'images/ext/b.png' resolves to .*outside the root"):
        build_manifest("folder", root, progress=False)


def test_the_fast_json_of_name_lists_is_canonical_json_byte_for_byte():
    """reads.digest hashes a list of plain names by a join: the bytes canonical_json writes (keys unchanged)."""
    import random
    import string

    from pipeline.data.reads import _json_bytes
    from pipeline.store.io import canonical_json

    rng = random.Random(0)
    alphabet = string.printable + 'é"\\\x01\u2028\x7f'
    for _ in range(3000):
        names = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(1, 5))]
        assert _json_bytes(names) == canonical_json(names).encode()
    for v in (["a", "b/c.png"], [], ["x"], [1, 2], ["a", 1], "s", {"a": ["b"]}, [None]):
        assert _json_bytes(v) == canonical_json(v).encode()
