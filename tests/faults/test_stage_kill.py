"""kill -9 `dkp-pipeline depth|teach|distill` at seeded random times, resume, compare with an uninterrupted run.

The uninterrupted reference runs in this process, through the same click entry point, single-threaded
(``torch.set_num_threads(1)``); the interrupted runs are real ``dkp-pipeline`` processes with
``OMP_NUM_THREADS=1``, so both use the same CPU kernels and must agree bit for bit.

Each interrupted process is SIGKILLed at a seeded random point of its work: a wrapper script (below)
counts events (work began; each depth file read; each training step); the kill points are drawn
uniformly over the whole work, sorted, each plus a random fraction of one event's duration, so kills
land in steps, in checkpoint and shard writes, between frames and in the final save and publish, never
in the imports before the work (not worth killing). The `files` depth provider writes 48 tiny frames in ~0.1 s, so the
wrapper reads every depth file 40 ms slower (values unchanged).

After every kill: ``status --json`` says the stage is ``in_progress`` (with the progress that is on disk:
frames in finished shards, or the newest checkpoint's step, and "interrupted; will resume", not a live
writer) or ``fresh`` when the kill came after the publish. At the end: shard bytes, index and decoded
depth identical to the reference, model.pt state dicts bitwise equal, metrics.jsonl identical, and no
temporary files or lock files anywhere in the store.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY_YAML

pytestmark = pytest.mark.faults

STEPS = 12  # teach/distill steps (checkpoint every 2): enough for kills before, between and after checkpoints
SETS = ["--set", f"teach.steps={STEPS}", "--set", f"distill.steps={STEPS}"]
DEPTH_DELAY_S = 0.04

# Runs dkp-pipeline unchanged except for markers: $DKP_TEST_EVENTS gets one byte when the stage's real
# work begins (the cache writer, the teacher-embedding pass or the trainer is entered) and one per depth
# file read or training step, so kills can be placed at a chosen point of the work. Depth files are read
# DEPTH_DELAY_S slower (values unchanged), or the 48 tiny frames would be written before a kill lands.
WRAPPER = """\
import os, sys, time
if sys.argv[1] in ("teach", "distill"):
    import torch._dynamo  # the optimiser imports it lazily: loaded first so it is not mistaken for work
import pipeline.depth_cache, pipeline.data.images, pipeline.stages.distill.run, pipeline.training
fd = os.open(os.environ["DKP_TEST_EVENTS"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
def event():
    os.write(fd, b".")
started = []
def start():
    if not started:
        started.append(1)
        event()
def wrap(mod, name, before, after=lambda: None):
    orig = getattr(mod, name)
    def f(*a, **k):
        before()
        out = orig(*a, **k)
        after()
        return out
    setattr(mod, name, f)
wrap(pipeline.data.images, "read_depth_file", lambda: time.sleep({delay}), event)
wrap(pipeline.stages.distill.run, "build_embedding_cache", start)
train = pipeline.training.train
def train_counting(*a, step_fn, **k):
    def counted(*sa, **sk):
        out = step_fn(*sa, **sk)
        event()
        return out
    start()
    return train(*a, step_fn=counted, **k)
pipeline.training.train = train_counting
init = pipeline.depth_cache.CacheWriter.__init__
def writer_init(self, *a, **k):
    init(self, *a, **k)
    start()
pipeline.depth_cache.CacheWriter.__init__ = writer_init
from pipeline.cli import main
sys.argv = ["dkp-pipeline"] + sys.argv[1:]
main()
"""


class Store:
    """One store over the shared dataset; ``inprocess``/``status`` go through the click entry point."""

    def __init__(self, base: Path, root: Path, name: str, extra: tuple[str, ...] = ()) -> None:
        self.base, self.store, self.extra = base, base / name, list(extra)  # extra: more --set arguments
        self.yaml = base / "tiny.yaml"
        if not self.yaml.exists():
            self.yaml.write_text(TINY_YAML.format(root=root))

    def args(self, cmd: str) -> list[str]:
        return [cmd, str(self.yaml), "--store", str(self.store), *SETS, *self.extra]

    def inprocess(self, *cmd: str) -> str:
        from click.testing import CliRunner

        from pipeline.cli import main

        r = CliRunner().invoke(main, [*self.args(cmd[0]), *cmd[1:]])
        assert r.exit_code == 0, f"{cmd}: exit {r.exit_code}\n{r.output}\n{r.stderr}\n{r.exception!r}"
        return r.stdout

    def status(self) -> dict[str, dict]:
        return {s["stage"]: s for s in json.loads(self.inprocess("status", "--json"))}

    def path(self, stage: str) -> Path:
        return Path(self.status()[stage]["path"])


def _env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="200", **extra)


def _expected_progress(stage: str, path: Path) -> str | None:
    """What status must say for an interrupted artifact, computed from the files (not via pipeline.graph)."""
    if stage == "depth":
        if not (path / "layout.json").exists():
            return None
        done = 0
        for entry_file in (path / "shards").glob("shard-*.json"):
            e = json.loads(entry_file.read_text())
            f = path / e["file"]
            if f.exists() and f.stat().st_size == e["bytes"]:
                done += e["n_frames"]
        return f"frames {done}/48"
    if not (path / "artifact.json").exists():
        return None
    steps = sorted(int(p.name[5:13]) for p in (path / "checkpoints").glob("step-*.pt")) if (
        path / "checkpoints").is_dir() else []
    return f"step {steps[-1] if steps else 0}/{STEPS}"


def _leftovers(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*")
                  if ".tmp" in p.name or p.name.startswith("LOCK"))


def _done(stage: str, path: Path) -> int:
    """Frames in finished shards / newest checkpoint step: where a resumed run starts."""
    p = _expected_progress(stage, path)
    return int(p.split()[1].split("/")[0]) if p else 0


def _kill_and_resume(s: Store, stage: str, n_kills: int, unit: float, rng: random.Random,
                     wrapper: Path, log: list[str]) -> None:
    """SIGKILL ``stage`` ``n_kills`` times, then let a last run finish; check status after every kill.

    Kill points: ``n_kills`` points of the whole work drawn uniformly (in events: depth files read or
    training steps, 0 = the work began) and sorted, each plus ``uniform(0, unit)`` s (one event's
    duration); a resumed run starts at the progress on disk, so each point is reached again after the
    previous kill. Kills thus land in steps, checkpoint and shard writes, between frames, in the final
    save and publish."""
    total = 48 if stage == "depth" else STEPS
    plan = sorted((rng.randint(0, total), rng.uniform(0, unit)) for _ in range(n_kills))
    events = s.base / "events"
    for k, (point, jitter) in enumerate(plan):
        path = s.path(stage)
        done = _done(stage, path)
        target = max(point - done, 0) + 1  # events of this run: the start, then one per file/step
        events.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, str(wrapper), *s.args(stage)], cwd=s.base,
                                env=_env(DKP_TEST_EVENTS=str(events)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 180
        while proc.poll() is None and (not events.exists() or events.stat().st_size < target):
            assert time.time() < deadline, f"{stage}: no progress within 180 s"
            time.sleep(0.002)
        if proc.poll() is None:
            time.sleep(jitter)
        where = f"at {'frame' if stage == 'depth' else 'step'} {point}/{total} + {jitter:.3f} s, resumed from {done}"
        if proc.poll() is not None:  # finished before the kill: later kills would hit a fresh artifact
            err = proc.stderr.read()
            assert proc.returncode == 0, f"{stage} failed on its own: {err}"
            log.append(f"{stage} kill {k} ({where}): already finished")
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        st = s.status()[stage]
        want = _expected_progress(stage, path)
        if (path / "COMPLETE").exists():
            assert st["state"] == "fresh", st
        else:
            assert st["state"] == "in_progress", st
            assert st["progress"] == want, (st, want)
            assert "interrupted; will resume" in st["why"], st  # the dead writer's lock is not a live one
        log.append(f"{stage} kill {k} ({where}) -> {st['state']} {st['progress'] or ''}")
    proc = subprocess.run([sys.executable, str(wrapper), *s.args(stage)], cwd=s.base,
                          env=_env(DKP_TEST_EVENTS=str(events)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    st = s.status()[stage]
    assert st["state"] == "fresh" and st["progress"] is None, st


def _same_depth(a: Path, b: Path) -> None:
    from pipeline.depth_cache import DepthCacheReader

    for name in ("layout.json", "index.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    shards = sorted(p.name for p in (a / "shards").iterdir())
    assert shards == sorted(p.name for p in (b / "shards").iterdir())
    for name in shards:
        assert (a / "shards" / name).read_bytes() == (b / "shards" / name).read_bytes(), name
    with DepthCacheReader(a) as ra, DepthCacheReader(b) as rb:
        for i in range(len(ra)):
            assert np.array_equal(ra.read(i), rb.read(i)), i


def _same_model(a: Path, b: Path) -> None:
    import torch

    pa = torch.load(a / "model.pt", map_location="cpu", weights_only=True)
    pb = torch.load(b / "model.pt", map_location="cpu", weights_only=True)
    sa, sb = pa["state_dict"] if "state_dict" in pa else pa["model"], pb["state_dict"] if "state_dict" in pb else pb["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{a.name}: {k} differs after kill/resume"
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()


def _reference(ref: Store) -> dict[str, float]:
    """Run depth, teach, distill uninterrupted (in this process, one thread); returns each stage's work
    time, from the moment the wrapper would mark as started to the end of the command."""
    import torch

    import pipeline.depth_cache
    import pipeline.stages.distill.run
    import pipeline.training

    t_start: list[float] = []
    saved = [(pipeline.stages.distill.run, "build_embedding_cache"), (pipeline.training, "train")]
    originals = [getattr(m, n) for m, n in saved] + [pipeline.depth_cache.CacheWriter.__init__]

    def mark(orig):
        def f(*a, **k):
            if not t_start:
                t_start.append(time.perf_counter())
            return orig(*a, **k)
        return f

    for (m, n), orig in zip(saved, originals):
        setattr(m, n, mark(orig))
    pipeline.depth_cache.CacheWriter.__init__ = mark(originals[-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = {}
    try:
        for stage in ("depth", "teach", "distill"):
            t_start.clear()
            ref.inprocess(stage)
            work[stage] = time.perf_counter() - t_start[0]
    finally:
        torch.set_num_threads(threads)
        for (m, n), orig in zip(saved, originals):
            setattr(m, n, orig)
        pipeline.depth_cache.CacheWriter.__init__ = originals[-1]
    return work


def _run(tmp_path: Path, *, seed: int, kills: dict[str, int], videos: bool = False) -> list[str]:
    """``videos``: the same 48 frames as two lossless videos (tests/videodata.py), read straight from them."""
    from pipeline.data.synth import write_synthetic

    root = tmp_path / "data"
    extra: tuple[str, ...] = ()
    if videos:
        from videodata import synthetic_as_videos

        synthetic_as_videos(root)
        extra = ("--set", "data.manifest=folder")
    else:
        write_synthetic(root, n=48, seed=0, image_size=32, progress=False)
    wrapper = tmp_path / "slow_depth.py"
    wrapper.write_text(WRAPPER.format(delay=DEPTH_DELAY_S))

    # the uninterrupted reference, timed per stage
    ref = Store(tmp_path, root, "reference", extra)
    work = _reference(ref)
    unit = {"depth": DEPTH_DELAY_S, "teach": work["teach"] / STEPS, "distill": work["distill"] / STEPS}

    killed = Store(tmp_path, root, "killed", extra)
    rng = random.Random(seed)
    log: list[str] = []
    for stage in ("depth", "teach", "distill"):
        t0 = time.perf_counter()
        _kill_and_resume(killed, stage, kills[stage], unit[stage], rng, wrapper, log)
        log.append(f"{stage}: reference work {work[stage]:.1f} s, kills + resume {time.perf_counter() - t0:.1f} s")
        assert _leftovers(killed.store) == [], _leftovers(killed.store)
    _same_depth(ref.path("depth"), killed.path("depth"))
    _same_model(ref.path("teach"), killed.path("teach"))
    _same_model(ref.path("distill"), killed.path("distill"))
    assert _outlivers(tmp_path) == [], "processes of killed runs still alive (DataLoader workers?)"
    return log


def _outlivers(tmp_path: Path, wait_s: float = 10.0) -> list[str]:
    """Processes (not zombies) whose command line names ``tmp_path``, once they had ``wait_s`` to go: a worker of
    a killed run must die with it (pipeline/data/workers.py; they used to wait forever on a full pipe)."""
    deadline = time.time() + wait_s
    while True:
        left = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and str(tmp_path) in (d / "cmdline").read_text().replace("\0", " ") \
                        and (d / "stat").read_text().split()[2] != "Z":
                    left.append(d.name)
            except OSError:
                continue
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)


def test_kill_stages_resume_identical(tmp_path):
    """5 seeded kills (depth 3, teach 1, distill 1); the slow variant does 20 per stage."""
    log = _run(tmp_path, seed=0, kills={"depth": 3, "teach": 1, "distill": 1})
    print("\n".join(log))
    kills = [line for line in log if " kill " in line]
    assert len(kills) == 5 and sum("in_progress" in line for line in kills) >= 4, log


def test_kill_stages_resume_identical_from_videos(tmp_path):
    """The same from frames read straight out of videos (issue 26): 3 kills (depth 1, teach 1, distill 1)."""
    log = _run(tmp_path, seed=2, kills={"depth": 1, "teach": 1, "distill": 1}, videos=True)
    print("\n".join(log))
    assert sum("in_progress" in line for line in log if " kill " in line) >= 2, log


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1])
def test_kill_stages_resume_identical_20_per_stage(tmp_path, seed):
    log = _run(tmp_path, seed=seed, kills={"depth": 20, "teach": 20, "distill": 20})
    print("\n".join(log))
    assert sum("in_progress" in line for line in log if " kill " in line) >= 50, log


def test_taking_over_a_killed_writers_lock_removes_its_temporaries(tmp_path):
    """A writer SIGKILLed inside write_atomic leaves `.<name>.tmp-<pid>`; whoever takes over its stale lock
    deletes that pid's temporaries and nobody else's (found by the 20-kill run: `.stats.part0.json.tmp-N`
    in a depth artifact, `samples/.step_000009.png.tmp-N` in a teach artifact)."""
    import socket

    from pipeline.store.artifacts import Lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "LOCK").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    mine = tmp_path / f".stats.part0.json.tmp-{dead.pid}"
    theirs = tmp_path / f".stats.part1.json.tmp-{os.getppid()}"  # a live process (another --shard part)
    kept = tmp_path / "stats.part0.json"
    (tmp_path / "samples").mkdir()
    picture = tmp_path / "samples" / f".step_000009.png.tmp-{dead.pid}"  # also seen in the 20-kill run
    (tmp_path / "teacher_embeddings").mkdir()
    embeddings = tmp_path / "teacher_embeddings" / f"part-00000-of-00001.npy.tmp-{dead.pid}"
    for f in (mine, theirs, kept, picture, embeddings):
        f.write_text("{}")
    with Lock(tmp_path / "LOCK"):
        assert not mine.exists() and not picture.exists() and not embeddings.exists()
        assert theirs.exists() and kept.exists()
