"""Literal keys of every stage, pinned: the net under any restructuring (a moved depth key throws away hours of
GPU work for every user with a cache). The literals were computed by the code of ceef0bb (before issue 22), over a
hand-built manifest (no files read), so they do not depend on an encoder's bytes or on this checkout's own key
functions. A deliberate change of key semantics must update them and say why."""
import tempfile
from pathlib import Path

import numpy as np
import pytest

GOLDEN = {
    "midas_defaults": {
        "manifest": "33dac1dc506a40109232b2b38cf51947c2cf565d0eb015cf206e7a9089c01fcd",
        "depth": "791db25be7251d4aa60a000144f129e0e1a09e29c28793a58e6f2fcda841c984",
        "teach": "7d6abca5830a786efbfb083ff3ade32df1e42d8d8b99525742d6c7df34dd0fa8",
        "distill": "797cda5bbbaeb3550012eafea15fa027187ccdde03d07be9bcb98b73b2365914",
        "eval": "558f6594c7877de32d420cd379b3d3b5bb3265b774e77d1b7fbc37df959bd125",
    },
    "midas_bf16": {
        "manifest": "33dac1dc506a40109232b2b38cf51947c2cf565d0eb015cf206e7a9089c01fcd",
        "depth": "ebf6a4d340ee42757d2fa317c5a1b481e9910f47dfbea197c56841b62f7fab3f",
        "teach": "3482aa8e4eca84ae6f8aaa6ab225a26753fd15683a1e6bdbc3ee99ff842777d0",
        "distill": "71061ae459c2799ce090e6ed5dc8a388265cb67a62ffe764d6d8d4a4ea662e7c",
        "eval": "9464f94a74f675cc77b394a1efae4617e9a185be365983aa5d88f55ee0093ef7",
    },
    "midas_device": {
        "manifest": "33dac1dc506a40109232b2b38cf51947c2cf565d0eb015cf206e7a9089c01fcd",
        "depth": "16aa138ac41bf5ad316bc99f63264f38d17517e516b524a3a965bb2a13795c73",
        "teach": "c05552d37a55e79323e60fc6e7f112210eef6a094ff8d905542dbda90ebe73f9",
        "distill": "ee2d954755b28855cbd751004053f6baf5071502a215b9776bcfa28bf6f4e2d5",
        "eval": "bc0a3328b960f43a36e33f70ea5af1bf5d46206ebac66f403d3134816f2d4487",
    },
    "midas_baseline": {
        "manifest": "33dac1dc506a40109232b2b38cf51947c2cf565d0eb015cf206e7a9089c01fcd",
        "depth": "791db25be7251d4aa60a000144f129e0e1a09e29c28793a58e6f2fcda841c984",
        "teach": "7d6abca5830a786efbfb083ff3ade32df1e42d8d8b99525742d6c7df34dd0fa8",
        "distill": "39a01237af980dc19d4310d6943e5b9ddfa43a750bb274982f3dc6b1cbb5f682",
        "baseline": "bd683ac2fc878240e417b07d97ef68ff13b61e6691dadacdc01857e44b062b57",
        "eval": "c945f61e8db833731ff4d4921777884433466efeafe3b5414598cc08a89c0d30",
    },
    "files": {
        "manifest": "d59864afcc71e951efccbd59ffd696813ecb575a77ecc8f69c094213e1d5c5c2",
        "depth": "712124572459dee4ba926f0597dcede536065535ce9224686d73be99af5c0303",
        "teach": "fe7a5a2488e485e8f8f76f7285a6bfea5f1de5d09b337c3d59949dad479c3b1e",
        "distill": "e53dd4a42144bcf6d8952bf1007e1f76a14af5f75d5b36da84bd1241098e5f02",
        "eval": "9e4e21c14ef536638fbbb801b319dc669d599d8cd30946a772e9c0c5859c9785",
    },
}
CASES = {
    "midas_defaults": [],
    "midas_bf16": ["depth.precision=bf16"],
    "midas_device": ["depth.preprocess=device", "depth.precision=fp16"],
    "midas_baseline": ["eval.baseline=true", "distill.gamma=0.3"],
    "files": ["depth.provider=files"],
}


def _manifest(root: Path, depth_files: bool):
    from pipeline.data.manifest import Manifest
    from pipeline.data.spec import load_spec

    n = 6
    return Manifest(spec=load_spec("folder"), root=root, frame_ids=[f"f{i}" for i in range(n)],
                    paths=[f"images/f{i}.png" for i in range(n)], splits=["train"] * 4 + ["test"] * 2,
                    fingerprints=[f"xxh3:{i:032x}" for i in range(n)], sizes=np.array([[64, 48]] * n),
                    keypoints=np.arange(n * 5 * 2, dtype=np.float32).reshape(n, 5, 2),
                    depth_paths=[f"depth/f{i}.npy" for i in range(n)] if depth_files else None,
                    depth_fingerprints=[f"xxh3:{i + 100:032x}" for i in range(n)] if depth_files else None)


def plan_keys(sets, *, depth_files: bool = False) -> dict:
    """{plan entry: key} of the folder config with ``sets`` over the hand-built manifest (weights: fixed bytes)."""
    from pipeline.config import load_config
    from pipeline.graph import build_plan
    from pipeline.store.artifacts import Store

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        w = Path(tmp) / "w.pt"
        w.write_bytes(b"golden weights")
        cfg = load_config(None, ["data.manifest=folder", f"data.root={root}", f"depth.weights={w}", *sets])
        plan = build_plan(cfg, Store(Path(tmp) / "store"), progress=False, manifest=_manifest(root, depth_files))
        return {e: p.key for e, p in plan.stages.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_stage_key_is_pinned(case, monkeypatch):
    from pipeline.stages.depth import identity

    monkeypatch.setattr(identity, "runs_on_cuda", lambda d: False)  # `auto` settings resolve as on a CPU machine
    assert plan_keys(CASES[case], depth_files=case == "files") == GOLDEN[case]


def test_depth_auto_on_cuda_keys_as_the_explicit_gpu_settings(monkeypatch):
    """On a GPU, precision/preprocess auto resolve to bf16/device before the key: the same key as a config that
    names them (so a preset that states its GPU settings and a default config share caches there)."""
    from pipeline.stages.depth import identity

    monkeypatch.setattr(identity, "runs_on_cuda", lambda d: True)
    monkeypatch.setattr(identity, "gpu_amp_name", lambda: "bf16")
    monkeypatch.setattr(identity, "nvjpeg_works", lambda: True)
    auto = plan_keys([])
    assert auto == plan_keys(["depth.precision=bf16", "depth.preprocess=device"])
    assert auto["depth"] != GOLDEN["midas_defaults"]["depth"]
    monkeypatch.setattr(identity, "nvjpeg_works", lambda: False)  # no nvJPEG: the CPU's exact preprocessing
    assert plan_keys([])["depth"] == plan_keys(["depth.precision=bf16"])["depth"] == GOLDEN["midas_bf16"]["depth"]


def test_tf32_enters_the_depth_key_only_where_it_is_read(monkeypatch):
    from pipeline.stages.depth import identity

    monkeypatch.setattr(identity, "runs_on_cuda", lambda d: False)
    base = GOLDEN["midas_defaults"]
    assert plan_keys(["depth.tf32=true"])["depth"] != base["depth"]  # fp32 MiDaS: TF32 matmuls change values
    assert plan_keys(["depth.tf32=true", "depth.precision=bf16"])["depth"] == GOLDEN["midas_bf16"]["depth"]
    assert plan_keys(["depth.tf32=true", "depth.provider=files"], depth_files=True) == GOLDEN["files"]


@pytest.mark.parametrize("sets", [["depth.batch_size_inference=32"], ["depth.num_workers=7"],
                                  ["depth.compile=true"], ["depth.device=cpu"]])
def test_depth_run_settings_stay_out_of_every_key(sets, monkeypatch):
    from pipeline.stages.depth import identity

    monkeypatch.setattr(identity, "runs_on_cuda", lambda d: False)
    assert plan_keys(sets) == GOLDEN["midas_defaults"]
