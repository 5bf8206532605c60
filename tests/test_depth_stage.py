"""Stage `depth` through the CLI (and in-process where a fake model makes a point fast).

- provider files: the cache holds 1 / depth of the synthetic ground truth;
- --shard 0/2 + 1/2 (+ a plain re-run) and torchrun with 2 gloo ranks give the single run's cache;
- --skip-bad-frames marks a corrupt frame invalid, artifact.json and `status` list it; without it: exit 2;
- provider midas with a random-weights official-layout LeViT checkpoint (../shared fixtures): the cache
  equals load_midas + preprocess + model + postprocess per frame; missing / wrong weights: exit 2;
- frames of mixed sizes are batched by resized shape; the writer runs on its own thread and does not hold
  up the next batch; bf16/fp16 autocast (with the fp32 fallback) and torch.compile run on CPU.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, SHARED, run_cli

FIXTURES = SHARED / "fixtures" / "midas"


def _cache_dir(store) -> Path:
    (d,) = list((Path(store) / "depth").iterdir())
    return d


def _frames(cache_dir) -> list[tuple[str, bool, np.ndarray | None]]:
    from pipeline.depth_cache import DepthCacheReader

    with DepthCacheReader(cache_dir) as r:
        return [(r.frame_id(i), r.is_valid(i), r.read(i) if r.is_valid(i) else None) for i in range(len(r))]


def _assert_same_cache(a, b) -> None:
    fa, fb = _frames(a), _frames(b)
    assert [f[:2] for f in fa] == [f[:2] for f in fb]
    for (_, valid, x), (_, _, y) in zip(fa, fb):
        if valid:
            np.testing.assert_array_equal(x, y)


def _ok(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _plan(exp, store=None, *overrides):
    """`status` in-process (the CLI's own build_plan): {stage: StagePlan}."""
    from pipeline.store.artifacts import Store
    from pipeline.config import load_config
    from pipeline.graph import build_plan

    plan = build_plan(load_config(exp["yaml"], overrides), Store(Path(store or exp["store"])), progress=False)
    return plan, plan.stages


def _run_in_process(yaml, store, **options):
    from rich.console import Console

    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    out = io.StringIO()
    run_pipeline(load_config(yaml), str(store), only="depth", until="depth", console=Console(file=out, width=200),
                 stage_options=options)
    return out.getvalue()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny experiment's depth cache from one plain in-process run (the key does not depend on the root)."""
    from tests.conftest import tiny_folder

    with tiny_folder(tmp_path_factory, "reference", data=True) as tmp:
        _run_in_process(str(tmp / "tiny.yaml"), tmp / "store")
    return _cache_dir(tmp / "store")


def _synth(exp):
    from pipeline.data.synth import write_synthetic

    write_synthetic(exp["root"], n=48, seed=0, image_size=32)


# ------------------------------------------------------------------------------------------------ files
def test_files_provider_stores_inverse_depth(tiny_experiment):
    exp = tiny_experiment
    r = _ok(run_cli(["depth", exp["yaml"], "--store", exp["store"], "--set", "depth.storage_dtype=float32"],
                    cwd=exp["cwd"]))
    assert "depth    built" in r.stdout
    cache = _cache_dir(exp["store"])
    rec = json.loads((cache / "artifact.json").read_text())
    assert rec["status"] == "complete" and rec["skipped_frames"] == [] and rec["n_valid"] == 48
    assert rec["cache_spec"]["provider"] == "files" and rec["cache_spec"]["depth_options.kind"] == "depth"
    # the record's wall time covers the frames' computation, not only the merge that published it
    assert rec["timings"]["seconds_this_run"] >= rec["compute"]["seconds"] > 0
    frames = _frames(cache)
    assert len(frames) == 48
    for fid, valid, inv in frames:
        depth = np.load(exp["root"] / "depth" / f"{Path(fid).name}.npy")
        assert valid and inv.shape == depth.shape == (32, 32)
        np.testing.assert_array_equal(inv, (1.0 / np.maximum(depth, 1e-6)).astype(np.float32))
        assert (inv > 0).all()
    _, st = _plan(exp, None, "depth.storage_dtype=float32")
    assert st["depth"].state == "fresh"
    import cv2

    preview = cv2.imread(str(cache / "preview.png"))  # 8 (RGB, depth) pairs of 128 px, 8 tiles a row
    assert preview.shape == (2 * 130 + 2, 8 * 130 + 2, 3)


# ------------------------------------------------------------------------------------------------ scale-out
def test_shard_parts_then_plain_rerun_equal_single_run(tiny_experiment, reference):
    exp = tiny_experiment
    r = _ok(run_cli(["depth", exp["yaml"], "--store", exp["store"], "--shard", "0/2"], cwd=exp["cwd"]))
    assert "part 0/2 saved" in r.stdout and "depth    built" not in r.stdout
    _, st = _plan(exp)
    assert st["depth"].state == "in_progress" and st["depth"].progress == "frames 32/48"  # shards 0 and 2 of 3
    assert "depth    built" in _run_in_process(exp["yaml"], exp["store"], shard="1/2")  # the last part publishes
    out = _run_in_process(exp["yaml"], exp["store"])  # a plain re-run: nothing left to do
    assert "depth    fresh" in out and "reused" in out
    assert _plan(exp)[1]["depth"].state == "fresh"
    b = _cache_dir(exp["store"])
    assert reference.name == b.name
    _assert_same_cache(reference, b)
    for f in sorted((reference / "shards").glob("*.h5")):  # bitwise: same bytes whichever process wrote a shard
        assert f.read_bytes() == (b / "shards" / f.name).read_bytes()


def test_shard_part_then_plain_run_writes_the_rest_and_merges(tiny_experiment, reference):
    exp = tiny_experiment
    _synth(exp)
    out = _run_in_process(exp["yaml"], exp["store"], shard="1/2")
    assert "part 1/2 saved" in out
    out = _run_in_process(exp["yaml"], exp["store"])
    assert "depth    built" in out
    stats = json.loads((_cache_dir(exp["store"]) / "artifact.json").read_text())["compute"]
    assert stats["runs"] == 2 and stats["frames"] == 48  # the plain run wrote only the shards part 1 had not
    _assert_same_cache(reference, _cache_dir(exp["store"]))


def test_plain_run_and_shard_part_refuse_to_overlap(tiny_experiment):
    """A live --shard part's lock stops a plain run (and a live plain run's lock stops a part), naming the pid."""
    import socket

    from pipeline.errors import LockError

    exp = tiny_experiment
    _synth(exp)
    _, st = _plan(exp)
    path = st["depth"].path
    path.mkdir(parents=True)
    owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"})
    (path / "LOCK.part1of2").write_text(owner)  # this test process is alive: the lock is live
    with pytest.raises(LockError, match=f"pid {os.getpid()}"):
        _run_in_process(exp["yaml"], exp["store"])
    (path / "LOCK.part1of2").unlink()
    (path / "LOCK").write_text(owner)
    with pytest.raises(LockError, match=f"pid {os.getpid()}"):
        _run_in_process(exp["yaml"], exp["store"], shard="0/2")
    (path / "LOCK").unlink()
    assert "part 0/2 saved" in _run_in_process(exp["yaml"], exp["store"], shard="0/2")


def test_disk_error_on_the_writer_thread_reaches_the_user(tiny_experiment, monkeypatch):
    import errno

    from pipeline import depth_cache
    from pipeline.errors import CacheError

    exp = tiny_experiment
    _synth(exp)
    bad = exp["root"] / "images" / "f000005.png"  # in shard 0, which finishes before the disk fills
    bad.write_bytes(bad.read_bytes()[:60])
    real_commit = depth_cache.ShardWriter.commit
    calls = []

    def full_disk_on_second_shard(self):
        calls.append(self.plan.index)
        if self.plan.index == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_commit(self)

    monkeypatch.setattr(depth_cache.ShardWriter, "commit", full_disk_on_second_shard)
    with pytest.raises(CacheError, match="No space left.*finished shards are kept"):
        _run_in_process(exp["yaml"], exp["store"], skip_bad_frames=True)
    shards = _plan(exp)[1]["depth"].path / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["shard-00000.h5", "shard-00000.json"]
    monkeypatch.setattr(depth_cache.ShardWriter, "commit", real_commit)
    assert "depth    built" in _run_in_process(exp["yaml"], exp["store"], skip_bad_frames=True)  # after shard 0
    rec = json.loads((_cache_dir(exp["store"]) / "artifact.json").read_text())
    assert rec["compute"]["frames"] == 32
    # shard 0's skipped frame was recorded by the run that died, and is still listed, once, with its reason
    assert [(s["frame"], "truncated" in s["reason"]) for s in rec["skipped_frames"]] == [("f000005", True)]


def test_bad_shard_option_is_a_config_error(tiny_experiment):
    from pipeline.errors import ConfigError

    _synth(tiny_experiment)
    with pytest.raises(ConfigError, match="--shard '2/2'"):
        _run_in_process(tiny_experiment["yaml"], tiny_experiment["store"], shard="2/2")


def test_torchrun_two_ranks_equal_single_run(tiny_experiment, reference):
    exp = tiny_experiment
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    _synth(exp)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", COLUMNS="200")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "pipeline.cli", "depth",
                        exp["yaml"], "--store", exp["store"]], cwd=exp["cwd"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    b = _cache_dir(exp["store"])
    assert (b / "COMPLETE").exists()
    stats = json.loads((b / "artifact.json").read_text())["compute"]
    assert stats["runs"] == 2 and stats["frames"] == 48  # two ranks, 48 frames between them
    _assert_same_cache(reference, b)
    assert _plan(exp)[1]["depth"].state == "fresh"


# ------------------------------------------------------------------------------------------------ bad frames
def test_skip_bad_frames(tiny_experiment):
    from rich.console import Console

    from pipeline.graph import print_plan

    exp = tiny_experiment
    _synth(exp)
    bad = exp["root"] / "images" / "f000005.png"
    bad.write_bytes(bad.read_bytes()[:60])  # header intact (the manifest reads it), pixels cut off
    from pipeline.errors import ManifestError

    with pytest.raises(ManifestError, match="f000005.*--skip-bad-frames") as e:  # a DkpError: the CLI exits 2
        _run_in_process(exp["yaml"], exp["store"])
    assert e.value.exit_code == 2
    shards = _plan(exp)[1]["depth"].path / "shards"
    assert not list(shards.glob("*.tmp-*"))  # the writer thread aborted the open shard: no temp file left

    r = _ok(run_cli(["depth", exp["yaml"], "--store", exp["store"], "--skip-bad-frames"], cwd=exp["cwd"]))
    cache = _cache_dir(exp["store"])
    rec = json.loads((cache / "artifact.json").read_text())
    assert [s["frame"] for s in rec["skipped_frames"]] == ["f000005"] and rec["n_valid"] == 47
    assert "truncated" in rec["skipped_frames"][0]["reason"] or "decodable" in rec["skipped_frames"][0]["reason"]
    valid = {fid: v for fid, v, _ in _frames(cache)}
    assert valid.pop("f000005") is False and all(valid.values())
    plan, st = _plan(exp)
    assert st["depth"].state == "fresh" and "f000005" in st["depth"].progress
    out = io.StringIO()
    print_plan(plan, Console(file=out, width=200))
    assert "1 unreadable frame(s) skipped" in out.getvalue() and "f000005" in out.getvalue()


# ------------------------------------------------------------------------------------------------ MiDaS, real model
@pytest.fixture(scope="module")
def levit_weights(tmp_path_factory):
    """A random-weights dpt_levit_224 checkpoint in the official layout (fixture script, seed 0)."""
    if not FIXTURES.is_dir():
        pytest.skip(f"MiDaS fixtures absent: {FIXTURES}")
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("make_weights", FIXTURES / "make_weights.py")
    mw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mw)
    out = tmp_path_factory.mktemp("weights") / "dpt_levit_224.pt"
    torch.save(mw.make_state_dict(json.loads((FIXTURES / "dpt_levit_224.spec.json").read_text()), seed=0), out)
    return out


def _folder_dataset(root: Path, sizes, bad: tuple = ()) -> None:
    import cv2

    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // w, yy * 255 // h, rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"im{k}.png"), img)
    for k in bad:
        p = root / "images" / f"im{k}.png"
        p.write_bytes(p.read_bytes()[:60])


def _midas_yaml(tmp_path, root, weights, **depth) -> str:
    d = {"provider": "midas", "model_type": "dpt_levit_224", "weights": weights and str(weights), "num_workers": 0,
         "batch_size_inference": 4, "shard_size": 3, **depth}
    y = tmp_path / "mid.yaml"
    y.write_text(json.dumps({"name": "mid", "data": {"manifest": "folder", "root": str(root)}, "depth": d}))
    return str(y)


@pytest.mark.slow  # ~35-45 s on 2 busy cores: weights 8 s, load_midas 8 s twice, 4 LeViT forwards
def test_midas_levit_cache_matches_the_model(levit_weights, tmp_path):
    import h5py
    import torch

    from dkp_core.midas import get_spec
    from dkp_core.midas.transforms import postprocess, preprocess
    from pipeline.data.images import read_rgb
    from pipeline.weights.midas import file_sha256, load_midas

    root = tmp_path / "data"
    sizes = [(24, 32), (40, 40), (32, 24), (24, 32), (30, 20)]  # mixed sizes; im3 is corrupt
    _folder_dataset(root, sizes, bad=(3,))
    y = _midas_yaml(tmp_path, root, levit_weights, storage_dtype="float32")
    store = tmp_path / "store"
    r = _ok(run_cli(["depth", y, "--store", str(store), "--skip-bad-frames"], cwd=tmp_path))
    assert "depth    built" in r.stdout
    cache = _cache_dir(store)
    sha = file_sha256(levit_weights)
    spec = json.loads((cache / "artifact.json").read_text())["cache_spec"]
    assert spec["model_type"] == "dpt_levit_224" and spec["weights_sha256"] == sha
    assert (spec["net_w"], spec["net_h"], spec["resize_mode"], spec["precision"]) == (224, 224, "square", "fp32")
    assert spec["mean"] == [0.5, 0.5, 0.5] and spec["interpolation"] == "cv2.INTER_CUBIC"
    with h5py.File(cache / "shards" / "shard-00000.h5", "r") as f:  # plain h5py sees the spec
        assert f.attrs["spec.model_type"] == "dpt_levit_224" and f.attrs["spec.weights_sha256"] == sha
        assert f.attrs["values"] == "relative inverse depth (larger = nearer)"

    torch.set_num_threads(2)
    model, _ = load_midas("dpt_levit_224", levit_weights)
    ms = get_spec("dpt_levit_224")
    frames = _frames(cache)
    assert [f[0] for f in frames] == [f"im{k}" for k in range(5)]
    for k, (fid, valid, got) in enumerate(frames):
        if k == 3:
            assert not valid
            continue
        img = read_rgb(root / "images" / f"{fid}.png")
        x = torch.from_numpy(preprocess(img.astype(np.float32) / 255.0, ms))[None]
        with torch.inference_mode():
            want = postprocess(model(x), img.shape[:2])[0].numpy()
        assert got.shape == want.shape == sizes[k]
        assert want.std() > 0.1  # not a trivial map
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_midas_missing_or_wrong_weights_exit_2(tmp_path):
    root = tmp_path / "data"
    _folder_dataset(root, [(24, 32)])
    store = tmp_path / "store"
    from pipeline.errors import CheckpointError

    with pytest.raises(CheckpointError, match="nope.pt.*dpt_levit_224.pt"):
        _run_in_process(_midas_yaml(tmp_path, root, tmp_path / "nope.pt"), store)
    assert not (store / "depth").exists()  # nothing written for a run that cannot start

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    r = run_cli(["depth", _midas_yaml(tmp_path, root, junk), "--store", str(store)], cwd=tmp_path)
    assert r.returncode == 2 and "junk.pt" in r.stderr and "dpt_levit_224" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (store / "depth").exists()

    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="depth.weights is not set.*dpt_levit_224.pt"):
        _run_in_process(_midas_yaml(tmp_path, root, None), store)
    with pytest.raises(ConfigError, match="not a MiDaS 3.1 model; valid: .*dpt_levit_224"):
        _run_in_process(_midas_yaml(tmp_path, root, junk, model_type="dpt_tiny"), store)
    assert not (store / "depth").exists()


# ------------------------------------------------------------------------------------------------ in-process, fake model
class _FakeMidas:
    """Stands in for a MiDaS model: (B, 3, h, w) -> (B, h, w), records what it saw."""

    def __init__(self, gain: float = 1.0, on_call=None):
        import torch

        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(gain / 27)
            self.conv.bias.fill_(2.0)
        self.calls: list[dict] = []
        self.on_call = on_call

    def __call__(self, x):
        import torch

        self.calls.append({"shape": tuple(x.shape), "autocast": torch.is_autocast_enabled("cpu"),
                           "thread": threading.get_ident()})
        if self.on_call:
            self.on_call(len(self.calls))
        return torch.relu(self.conv(x))[:, 0]


def _run_fake(tmp_path, monkeypatch, fake, *, sizes, model_type="dpt_beit_base_384", options=None, model_device="cpu",
              **depth):
    import torch

    from pipeline.config import load_config
    from pipeline.runner import run_pipeline
    from pipeline.stages.depth import compute as D

    root = tmp_path / "data"
    if not root.exists():
        _folder_dataset(root, sizes)
    weights = tmp_path / f"{model_type}.pt"
    weights.write_bytes(b"stand-in; the fake model never reads it")
    monkeypatch.setattr(D, "load_model", lambda d, sha, **kw: (fake, torch.device(model_device), {
        "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[d.precision]))
    y = _midas_yaml(tmp_path, root, weights, model_type=model_type, **depth)
    from rich.console import Console

    out = io.StringIO()
    store = tmp_path / f"store-{len(list(tmp_path.glob('store-*')))}"
    run_pipeline(load_config(y), str(store), only="depth", until="depth", console=Console(file=out, width=200),
                 stage_options=options or {})
    return _cache_dir(store), out.getvalue()


def test_mixed_sizes_batched_by_resized_shape(tmp_path, monkeypatch):
    import torch

    from dkp_core.midas import get_spec
    from dkp_core.midas.transforms import postprocess, preprocess, target_size
    from pipeline.data.images import read_rgb

    fake = _FakeMidas()
    sizes = [(24, 32), (32, 24), (24, 32), (32, 24), (24, 32), (48, 64)]  # BEiT keeps the aspect ratio
    cache, _ = _run_fake(tmp_path, monkeypatch, fake, sizes=sizes, shard_size=6, batch_size_inference=8,
                         storage_dtype="float32")
    ms = get_spec("dpt_beit_base_384")
    assert target_size(24, 32, ms) == target_size(48, 64, ms) == (288, 384) and target_size(32, 24, ms) == (384, 288)
    # One shard, two resized shapes -> exactly two batches, each of one shape: 4 frames (two sizes) and 2.
    assert sorted(c["shape"] for c in fake.calls) == [(2, 3, 384, 288), (4, 3, 288, 384)]
    for k, (fid, valid, got) in enumerate(_frames(cache)):
        img = read_rgb(tmp_path / "data" / "images" / f"{fid}.png")
        x = torch.from_numpy(preprocess(img.astype(np.float32) / 255.0, ms))[None]
        with torch.no_grad():
            want = postprocess(fake(x), img.shape[:2])[0].numpy()
        assert valid and got.shape == sizes[k]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_writer_thread_does_not_hold_up_the_next_batch(tmp_path, monkeypatch):
    """The first frame's write waits until the model has started the *next* batch: with a synchronous
    writer that would never happen (the wait times out and the test fails)."""
    from pipeline import depth_cache

    second_batch = threading.Event()
    fake = _FakeMidas(on_call=lambda n: second_batch.set() if n >= 2 else None)
    seen = {}
    real_add = depth_cache.ShardWriter.add

    def slow_add(self, frame_index, **kw):
        if not seen:
            seen["thread"] = threading.get_ident()
            seen["overlapped"] = second_batch.wait(timeout=20)
        return real_add(self, frame_index, **kw)

    monkeypatch.setattr(depth_cache.ShardWriter, "add", slow_add)
    cache, out = _run_fake(tmp_path, monkeypatch, fake, sizes=[(24, 32)] * 3, model_type="dpt_levit_224",
                           batch_size_inference=1)
    assert seen["overlapped"], "the model waited for the writer"
    assert seen["thread"] != threading.main_thread().ident and fake.calls[0]["thread"] == threading.main_thread().ident
    stats = json.loads((cache / "artifact.json").read_text())["compute"]
    assert stats["frames"] == 3 and stats["seconds_writing"] > 0 and "for the writer" in out


def test_precision_autocast_on_cpu_and_fp16_fallback(tmp_path, monkeypatch):
    fake = _FakeMidas()
    cache, _ = _run_fake(tmp_path, monkeypatch, fake, sizes=[(24, 32)] * 2, model_type="dpt_levit_224",
                         precision="bf16")
    assert all(c["autocast"] for c in fake.calls)
    rec = json.loads((cache / "artifact.json").read_text())
    assert rec["cache_spec"]["precision"] == "bf16" and rec["compute"]["fp32_fallbacks"] == 0
    assert all(v and np.isfinite(d).all() for _, v, d in _frames(cache))

    # A model whose activations overflow fp16 (> 65504): the batch is recomputed in fp32.
    big = _FakeMidas(gain=1e6)
    cache16, out = _run_fake(tmp_path, monkeypatch, big, sizes=None, model_type="dpt_levit_224", precision="fp16")
    assert [c["autocast"] for c in big.calls] == [True, False]  # one batch: fp16, then its fp32 redo
    assert json.loads((cache16 / "artifact.json").read_text())["compute"]["fp32_fallbacks"] == 1
    assert "recomputed in fp32" in out
    ref = _FakeMidas(gain=1e6)
    cache32, _ = _run_fake(tmp_path, monkeypatch, ref, sizes=None, model_type="dpt_levit_224", precision="fp32")
    for (_, _, a), (_, _, b) in zip(_frames(cache16), _frames(cache32)):
        assert np.isfinite(a).all() and a.max() > 65504
        np.testing.assert_array_equal(a, b)


def test_compile_option_runs_the_compiled_model(tmp_path, monkeypatch):
    import torch

    from pipeline.config import load_config
    from pipeline.weights.midas import file_sha256
    from pipeline.runner import run_pipeline
    from rich.console import Console

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))[:, 0]

    tiny = Tiny().eval()
    compiled = []
    real_compile = torch.compile

    def spy(model, **kw):
        compiled.append(model)
        return real_compile(model, backend="eager", **kw)  # same path, no C++ codegen (inductor: ~30 s on CPU)

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr("pipeline.weights.midas.load_midas", lambda mt, w, device="cpu": (tiny, file_sha256(w)))
    root = tmp_path / "data"
    _folder_dataset(root, [(24, 32)] * 2)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"stand-in")
    run_pipeline(load_config(_midas_yaml(tmp_path, root, weights, compile=True)), str(tmp_path / "s"), only="depth",
                 until="depth", console=Console(file=io.StringIO()))
    assert compiled == [tiny]
    frames = _frames(_cache_dir(tmp_path / "s"))
    x = torch.zeros(1, 3, 224, 224)
    assert len(frames) == 2 and all(v for _, v, _ in frames) and tiny(x).shape == (1, 224, 224)
