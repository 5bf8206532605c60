"""kill -9 the depth cache writer at seeded random instants, resume, and compare with an uninterrupted run.

The writer is a subprocess (tests/faults/depth_cache_writer.py) writing deterministic synthetic maps.
After every kill: every shard that counts as done (entry present) is byte-identical to the reference
run's shard, and progress() is exactly the frames of those shards. At the end: same shard bytes, same
index, same decoded arrays, no temporary files.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import depth_cache as dc
from pipeline.store.io import sha256_file

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("depth_cache_writer.py")
N_FRAMES, SHARD_SIZE = 60, 4


def _start(cache_dir: Path, rank: int = 0, world: int = 1) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [str(cache_dir), str(N_FRAMES), str(SHARD_SIZE), str(rank), str(world)]
    proc = subprocess.Popen([sys.executable, str(HELPER), *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def _reference(tmp_path: Path) -> tuple[Path, float]:
    ref = tmp_path / "ref"
    proc = _start(ref)
    t0 = time.perf_counter()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "done", err
    return ref, time.perf_counter() - t0


def _entries(cache_dir: Path) -> dict[int, dict]:
    out = {}
    for path in sorted((cache_dir / "shards").glob("shard-*.json")):
        entry = json.loads(path.read_text())
        out[entry["shard"]] = entry
    return out


def _run_with_kills(tmp_path: Path, n_kills: int, seed: int) -> None:
    ref, t_ref = _reference(tmp_path)
    ref_entries = _entries(ref)
    assert dc.read_index(ref)["shards"] == [ref_entries[i] for i in sorted(ref_entries)]
    rng = random.Random(seed)
    work = tmp_path / "work"
    kills, last_done = 0, 0
    while kills < n_kills:
        done_frames, _ = dc.progress(work)
        if done_frames == N_FRAMES:  # all shards written: start over, so the remaining kills hit real work
            shutil.rmtree(work)
            done_frames = last_done = 0
        proc = _start(work)
        # Aim inside the work left to do, so the kills land in shard writes, renames and entry writes.
        time.sleep(rng.uniform(0, t_ref * max(0.1, 1 - done_frames / N_FRAMES)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=120)
        # State after the kill: whatever counts as done is exactly the reference bytes, and status says so.
        entries = _entries(work)
        for i, entry in entries.items():
            if sha256_file(work / entry["file"]) == entry["sha256"]:
                assert entry == ref_entries[i], f"shard {i} differs from the uninterrupted run"
        done, total = dc.progress(work)
        assert total in (0, N_FRAMES) and done == sum(e["n_frames"] for e in entries.values())
        assert done >= last_done
        last_done = done
        if proc.returncode == 0:  # it finished before the timer fired
            assert (work / "index.json").exists() and done == N_FRAMES
    proc = _start(work)  # the resume that completes the cache
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "done", err
    assert not [p.name for p in (work / "shards").iterdir() if ".tmp-" in p.name]
    assert not [p.name for p in work.iterdir() if ".tmp-" in p.name]
    assert dc.read_index(work) == dc.read_index(ref)  # includes every shard's sha256: identical bytes
    for i, entry in ref_entries.items():
        assert (work / entry["file"]).read_bytes() == (ref / entry["file"]).read_bytes()
    a, b = dc.DepthCacheReader(ref), dc.DepthCacheReader(work)
    for i in range(N_FRAMES):
        assert a.is_valid(i) == b.is_valid(i) and a.frame_id(i) == b.frame_id(i)
        if a.is_valid(i):
            np.testing.assert_array_equal(a.read(i), b.read(i))
    assert dc.verify(work).ok


def test_depth_cache_survives_kill9_at_5_random_points(tmp_path):
    _run_with_kills(tmp_path, n_kills=5, seed=1234)


@pytest.mark.slow
def test_depth_cache_survives_kill9_at_20_random_points(tmp_path):
    _run_with_kills(tmp_path, n_kills=20, seed=4321)


def test_killed_rank_resumes_its_part_while_the_other_rank_runs(tmp_path):
    """Two ranks write one cache concurrently; rank 1 is SIGKILLed mid-run and restarted; the merge equals
    a single writer's cache (so neither rank's temp cleanup touched the other's files)."""
    ref, t_ref = _reference(tmp_path)
    work = tmp_path / "work"
    r0, r1 = _start(work, 0, 2), _start(work, 1, 2)
    deadline = time.monotonic() + 60
    while not (work / "shards" / "shard-00001.json").exists() and time.monotonic() < deadline:
        time.sleep(0.002)  # kill rank 1 after its first finished shard, somewhere inside its second
    time.sleep(random.Random(7).uniform(0, 0.1) * t_ref)
    assert r1.poll() is None, "rank 1 finished before it could be killed"
    r1.send_signal(signal.SIGKILL)
    r1.communicate(timeout=120)
    out, err = r0.communicate(timeout=120)
    assert r0.returncode == 0 and out.strip() == "done", err
    assert dc.progress(work)[0] < N_FRAMES
    r1 = _start(work, 1, 2)
    out, err = r1.communicate(timeout=120)
    assert r1.returncode == 0, err
    assert dc.finalize(work) == dc.read_index(ref)
    for entry in dc.read_index(ref)["shards"]:
        assert (work / entry["file"]).read_bytes() == (ref / entry["file"]).read_bytes()
    assert not [p.name for p in (work / "shards").iterdir() if ".tmp-" in p.name]
