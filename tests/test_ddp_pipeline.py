"""The whole pipeline under `torchrun --nproc-per-node 2` (gloo on CPU, a free port): ranks split the work, rank 0
publishes, no rank starts a stage before the previous one is published, and the result equals one process's
wherever one process's result is defined.

Equal to a one-process run over the same frames: every stage's key (a one-process `status` calls the 2-rank
artifacts fresh, and a one-process `run` in another store plans the same keys), the depth cache, bit for bit; the
teacher-embedding cache, which the 2 ranks build half each, equals the one-process build from the same teacher.
The trainings themselves are not bitwise one process's: AutoLink's BatchNorm normalises over each rank's half of
the batch on CPU (SyncBatchNorm needs CUDA) and each rank draws its own masks; that the 2-rank training maths
equals one rank's is tested on a GroupNorm model, also after the depth stage's process group
(tests/test_train.py::test_ddp_two_cpu_ranks_give_the_same_loss_as_one).
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_cli


def _artifact(store: str, stage: str) -> Path:
    (d,) = [p for p in (Path(store) / stage).iterdir() if (p / "COMPLETE").exists()]
    return d


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun/gloo test written for Linux")
def test_torchrun_two_ranks_runs_every_stage_and_equals_one_process(tiny_experiment):
    from rich.console import Console

    from pipeline.config import load_config
    from pipeline.data.build import build_manifest
    from pipeline.data.datasets import FrameDataset, valid_train_indices
    from pipeline.depth_cache import DepthCacheReader
    from pipeline.graph import build_plan
    from pipeline.stages.common import load_trained
    from pipeline.stages.distill.teacher_cache import EmbeddingCache, build_embedding_cache
    from dkp_core.keypoints.teacher import FrozenTeacher
    from pipeline.store.artifacts import Store

    exp = tiny_experiment
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",  # a free port
           "-m", "pipeline.cli", "run", exp["yaml"], "--store", exp["store"]]
    r = subprocess.run(cmd, cwd=exp["cwd"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    st = run_cli(["status", exp["yaml"], "--store", exp["store"], "--json"], cwd=exp["cwd"])
    states = {s["stage"]: s["state"] for s in json.loads(st.stdout)}
    assert set(states.values()) == {"fresh"}, states
    teach = json.loads((_artifact(exp["store"], "teach") / "artifact.json").read_text())
    assert teach["result"]["world_size"] == 2
    # no leftover part locks or temporaries anywhere in the store
    leftovers = [p for p in Path(exp["store"]).rglob("*") if "LOCK" in p.name or ".tmp" in p.name]
    assert not leftovers, leftovers

    # one process, another store, the same frames: the same keys, the same depth cache
    one_store = str(Path(exp["cwd"]) / "store-one")
    one = run_cli(["run", exp["yaml"], "--store", one_store, "--until", "depth"], cwd=exp["cwd"])
    assert one.returncode == 0, one.stderr[-3000:]
    cfg = load_config(exp["yaml"])
    keys = {s: {n: sp.key for n, sp in build_plan(cfg, Store(Path(d)), progress=False).stages.items()}
            for s, d in (("two", exp["store"]), ("one", one_store))}
    assert keys["two"] == keys["one"]
    two_depth, one_depth = DepthCacheReader(_artifact(exp["store"], "depth")), DepthCacheReader(
        _artifact(one_store, "depth"))
    assert len(two_depth) == len(one_depth) == 48
    for i in range(48):
        np.testing.assert_array_equal(two_depth.read(i), one_depth.read(i))

    # the embedding cache: each rank built one part, and together they are the one-process build
    distill = _artifact(exp["store"], "distill")
    index = json.loads((distill / "teacher_embeddings" / "index.json").read_text())
    assert [(p["file"], p["start"] < p["stop"]) for p in index["parts"]] == [
        ("part-00000-of-00002.npy", True), ("part-00001-of-00002.npy", True)]
    m = build_manifest(cfg.data.manifest, cfg.data.root, progress=False)
    idx = valid_train_indices(m, two_depth, "train")
    ds = FrameDataset(manifest=m, indices=idx, image_size=cfg.teach.model.image_size, use_rgb=False, use_depth=True,
                      depth_reader=two_depth, depth_norm=cfg.teach.depth_norm)
    model, _ = load_trained(_artifact(exp["store"], "teach"))
    teacher = FrozenTeacher(model)
    alone = Path(exp["cwd"]) / "alone"
    build_embedding_cache(alone, teacher, ds, cfg.distill.layer, bool(index["n_flip"] == 2), torch.device("cpu"),
                          Console(file=io.StringIO()))
    a, b = EmbeddingCache(alone), EmbeddingCache(distill / "teacher_embeddings")
    flips = torch.zeros(len(idx), dtype=torch.bool)
    torch.testing.assert_close(b.lookup(torch.from_numpy(idx), flips), a.lookup(torch.from_numpy(idx), flips),
                               rtol=1e-5, atol=1e-6)
