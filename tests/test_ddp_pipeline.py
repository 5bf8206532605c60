"""The whole pipeline under `torchrun --nproc-per-node 2` (gloo on CPU): ranks split the work, rank 0 publishes,
no rank starts a stage before the previous one is published."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun/gloo test written for Linux")
def test_torchrun_two_ranks_runs_every_stage(tiny_experiment):
    exp = tiny_experiment
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "pipeline.cli", "run", exp["yaml"], "--store", exp["store"]]
    r = subprocess.run(cmd, cwd=exp["cwd"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    st = run_cli(["status", exp["yaml"], "--store", exp["store"], "--json"], cwd=exp["cwd"])
    states = {s["stage"]: s["state"] for s in json.loads(st.stdout)}
    assert set(states.values()) == {"fresh"}, states
    teach = json.loads((Path(json.loads(st.stdout)[2]["path"]) / "artifact.json").read_text())
    assert teach["result"]["world_size"] == 2
    # no leftover part locks or temporaries anywhere in the store
    leftovers = [p for p in Path(exp["store"]).rglob("*") if "LOCK" in p.name or ".tmp" in p.name]
    assert not leftovers, leftovers
