"""Side-by-side builds (pipeline/jobs.py): which entries may share the CPU, that a child builds exactly what the
runner builds itself, that errors come back to the parent, and that a kill -9 of `run` takes its children along."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_YAML, quiet_console, tiny_folder, torch_threads

WITH_BASELINE = TINY_YAML.replace("eval: {{baseline: false}}", "eval: {{baseline: true}}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    with tiny_folder(tmp_path_factory, "jobs", WITH_BASELINE, data=True) as d:
        yield d


def _cfg(folder, *overrides):
    from pipeline.config import load_config

    return load_config(str(folder / "tiny.yaml"), list(overrides))


def _plan(folder, store, *overrides):
    from pipeline.graph import build_plan
    from pipeline.store.artifacts import Store

    return build_plan(_cfg(folder, *overrides), Store(Path(store)), progress=False)


def test_only_trainings_that_do_not_read_each_other_are_grouped(folder, tmp_path):
    from pipeline.jobs import independent_group

    plan = _plan(folder, tmp_path / "store")
    walk = list(plan.stages)
    assert walk == ["manifest", "depth", "teach", "distill", "baseline", "eval"]
    assert independent_group(plan, walk, walk.index("depth")) == ["depth"]  # not a training
    assert independent_group(plan, walk, walk.index("teach")) == ["teach"]  # distill reads teach
    assert independent_group(plan, walk, walk.index("distill")) == ["distill", "baseline"]
    assert independent_group(plan, walk, walk.index("baseline")) == ["baseline"]  # eval reads it
    plan.stages["baseline"].state = "fresh"
    assert independent_group(plan, walk, walk.index("distill")) == ["distill"]


def test_how_many_at_once(folder, tmp_path, monkeypatch):
    import dataclasses

    import torch

    from pipeline.jobs import choose_jobs

    plan = _plan(folder, tmp_path / "store", "distill.device=cpu")
    group = ["distill", "baseline"]
    assert choose_jobs(plan, group, 1) == 1 and choose_jobs(plan, group, 5) == 2
    assert choose_jobs(plan, ["distill"], None) == 1
    with torch_threads(1):  # OMP_NUM_THREADS=1: one thread to share, so one at a time
        assert choose_jobs(plan, group, None) == 1
    with torch_threads(2):
        assert choose_jobs(plan, group, None) == 2
        monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: every rank trains the same entry, --jobs or not
        assert choose_jobs(plan, group, None) == choose_jobs(plan, group, 2) == 1
        monkeypatch.delenv("WORLD_SIZE")
        sp = plan.stages["baseline"]
        sp.settings = dataclasses.replace(sp.settings, device="cuda")  # one GPU: one process keeps it
        assert choose_jobs(plan, group, None) == 1
        sp.settings = dataclasses.replace(sp.settings, device="auto")
        assert choose_jobs(plan, group, None) == (1 if torch.cuda.is_available() else 2)


def _state(path: Path) -> dict:
    from pipeline.stages.common import load_trained

    return load_trained(path)[0].state_dict()


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_gamma_0_student_is_its_own_baseline_built_once(folder, tmp_path, jobs):
    """With distill.gamma = 0 the student and the baseline are one artifact (one key): it is built once, never
    twice side by side, and the baseline entry is then found fresh (it used to fail: "already complete")."""
    from pipeline.jobs import independent_group
    from pipeline.runner import run_pipeline

    plan = _plan(folder, tmp_path / "store", "distill.gamma=0")
    walk = list(plan.stages)
    assert plan.stages["distill"].key == plan.stages["baseline"].key
    assert independent_group(plan, walk, walk.index("distill")) == ["distill"]
    console = quiet_console(200)
    with torch_threads(1):
        done = run_pipeline(_cfg(folder, "distill.gamma=0"), str(tmp_path / "store"), console=console, jobs=jobs)
    out = console.file.getvalue()
    assert "distill  built" in out and "baseline fresh" in out and "baseline built" not in out, out
    assert all(sp.state == "fresh" for sp in done.stages.values())
    assert done.built == ["manifest", "depth", "teach", "distill", "eval"]


def test_side_by_side_builds_what_one_after_the_other_builds(folder, tmp_path):
    """Two stores, the same config: jobs=1 in this process, jobs=2 in two spawned children of one thread each.
    The same keys, bit-identical weights and metrics, each child's output in STORE/logs, both remembered."""
    import torch

    from pipeline.runner import run_pipeline

    cfg = _cfg(folder)
    with torch_threads(1):
        one = run_pipeline(cfg, str(tmp_path / "one"), console=quiet_console(200), jobs=1)
        run_pipeline(cfg, str(tmp_path / "two"), console=quiet_console(200), until="teach")  # the same teacher
    console = quiet_console(200)
    with torch_threads(2):
        two = run_pipeline(cfg, str(tmp_path / "two"), console=console, jobs=2)
    out = console.file.getvalue()
    assert "building distill, baseline side by side (2 processes x 1 thread" in out, out
    assert "distill  built" in out and "baseline built" in out and "eval     built" in out
    for name in ("distill", "baseline", "eval"):
        assert one.stages[name].key == two.stages[name].key
    for name in ("distill", "baseline"):
        a = _state(one.store.path("distill", one.stages[name].key))
        b = _state(two.store.path("distill", two.stages[name].key))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        log = (tmp_path / "two" / "logs" / f"{name}-{two.stages[name].key[:16]}.log").read_text()
        assert f"== {name} {two.stages[name].key[:16]}" in log and "1 torch thread(s)" in log
        assert "step 6/6" in log  # the trainer's progress lines went to the log
    m1, m2 = (json.loads((p.store.path("eval", p.stages["eval"].key) / "metrics.json").read_text()) for p in (one, two))
    assert m1["student"]["value"] == m2["student"]["value"] and m1["baseline"]["value"] == m2["baseline"]["value"]
    last = json.loads((tmp_path / "two" / "experiments" / "tiny.json").read_text())
    assert last["distill"] == two.stages["distill"].key and last["baseline"] == two.stages["baseline"].key
    again = quiet_console(200)
    run_pipeline(cfg, str(tmp_path / "two"), console=again, jobs=2)
    assert "nothing to do" in again.file.getvalue()


def test_a_failing_child_is_reported_by_the_parent(folder, tmp_path):
    """Both children refuse (the perceptual loss names VGG weights that do not exist): one DkpError in the
    parent names the entry, the cause and the log; nothing is published."""
    from pipeline.errors import DkpError
    from pipeline.runner import run_pipeline

    store = tmp_path / "store"
    missing = tmp_path / "no-vgg.pth"
    cfg = _cfg(folder, "distill.recon_loss=perceptual", f"distill.vgg_weights={missing}")
    with torch_threads(1):
        run_pipeline(cfg, str(store), console=quiet_console(200), until="teach")
    with torch_threads(2), pytest.raises(DkpError) as e:
        run_pipeline(cfg, str(store), console=quiet_console(200), jobs=2)
    msg = str(e.value)
    assert msg.startswith("distill: ") and str(missing) in msg and "baseline failed too with the same error" in msg, msg
    assert str(store / "logs") in msg and e.value.exit_code == 2
    assert not list(store.glob("distill/*/COMPLETE"))  # nothing published (distill keeps its embedding cache)


def _pids_in_logs(logs: Path) -> list[int]:
    pids = []
    for f in logs.glob("*.log"):
        text = f.read_text()
        if "(pid " in text:
            pids.append(int(text.split("(pid ", 1)[1].split(",", 1)[0]))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not reaped yet) is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _checkpoints(store: Path) -> dict[str, int]:
    """Newest checkpoint step of each distill artifact in ``store``."""
    from pipeline.store.checkpoint import list_checkpoints

    out = {}
    for d in (store / "distill").glob("*/checkpoints") if (store / "distill").is_dir() else []:
        cks = list_checkpoints(d)
        if cks:
            out[d.parent.name] = cks[-1][0]
    return out


def _wait_for(p, store: Path, done: dict[str, int], what: str) -> None:
    """Until both trainings have a checkpoint newer than ``done``'s."""
    deadline = time.time() + 240
    while True:
        assert p.poll() is None, f"run ended before {what}"
        assert time.time() < deadline, f"no {what} in time"
        now = _checkpoints(store)
        if len(now) == 2 and all(step > done.get(k, 0) for k, step in now.items()):
            return
        time.sleep(0.1)


def _wait_dead(pids: list[int]) -> bool:
    deadline = time.time() + 30
    while any(_alive(q) for q in pids) and time.time() < deadline:
        time.sleep(0.1)
    return not any(_alive(q) for q in pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigterm_and_kill_9_of_run_reach_the_side_by_side_trainings(folder, tmp_path):
    """SIGTERM to `run` alone: both trainings checkpoint and stop, `run` exits 143 naming the signal. kill -9 of
    the next `run`: both children die with it (no orphan keeps writing). The third `run` resumes both from
    their checkpoints and finishes."""
    store = tmp_path / "store"
    slow = ["--set", "distill.steps=60", "--set", "distill.checkpoint_every=2", "--set", "distill.eval_every=0"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="200",
               OMP_NUM_THREADS="2", DKP_JOBS="2")
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(folder / "tiny.yaml"), "--store", str(store), *slow]

    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(p, store, {}, "checkpoints from both trainings")
        pids = _pids_in_logs(store / "logs")
        assert len(pids) == 2 and all(_alive(q) for q in pids)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert "SIGTERM" in out + err and "run the same command again" in err, (out, err)
    assert _wait_dead(pids)
    stopped = _checkpoints(store)
    assert len(stopped) == 2 and all(step < 60 for step in stopped.values())

    for f in (store / "logs").glob("*.log"):
        f.write_text("")  # the next run's children write their pids afresh
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(p, store, stopped, "new checkpoints after the resume")
        pids = _pids_in_logs(store / "logs")
        assert len(pids) == 2 and all(_alive(q) for q in pids)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert _wait_dead(pids), "a side-by-side training outlived its parent"

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "resuming" in " ".join(f.read_text() for f in (store / "logs").glob("*.log"))
    assert "eval     built" in r.stdout
