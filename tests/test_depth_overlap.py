"""The pipelined depth stage (issue 22), on a CPU with stand-ins: batches planned per shard and formed in the
workers; the GPU stand-in lane (copy in / compute / copy out on their own threads, ordered like CUDA streams)
gives the host lane's cache bit for bit; the host launches batch k+1 before it waits for batch k; one host wait
(the fetch) per batch and no other sync in the stage's code; the last batch padded for torch.compile; the GPU
defaults (batch by memory, workers by cores, TF32 opt-in); `device: cuda` without a GPU is a clear error; and
`bench depth-overlap` runs. What only a GPU can run is marked ``gpu`` (skipped here)."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from tests.conftest import REPO, run_cli
from tests.test_depth_stage import _FakeMidas, _assert_same_cache, _folder_dataset, _frames, _midas_yaml, _run_fake

SIZES = [(24, 32), (32, 24), (24, 32), (48, 64), (24, 32), (32, 24), (24, 32)]  # BEiT: two network shapes


def test_batches_are_planned_per_shard_by_network_shape():
    from types import SimpleNamespace

    from pipeline.depth_cache.writer import ShardPlan
    from pipeline.stages.depth.frames import FrameBatch, plan_batches

    wh = np.array([[32, 24], [24, 32], [32, 24], [64, 48], [0, 0], [32, 24], [24, 32]])  # (W, H); one unknown size
    m = SimpleNamespace(sizes=wh)
    plans = [ShardPlan(0, 0, 5), ShardPlan(1, 5, 7)]
    key = lambda h, w: ("wide",) if w > h else ("tall",)  # noqa: E731
    got = plan_batches(m, plans, 2, key)
    # shard 0: wide 0, 2, 3 (64x48 resizes like 32x24) -> [0, 2], [3]; tall [1]; unknown [4]; shard 1 on its own
    assert got == [FrameBatch(0, (0, 2)), FrameBatch(0, (3,)), FrameBatch(0, (1,)), FrameBatch(0, (4,)),
                   FrameBatch(1, (5,)), FrameBatch(1, (6,))]


def test_gpu_stand_in_lane_gives_the_host_lanes_cache(tmp_path, monkeypatch):
    """The same frames through the host lane and the GPU stand-in (threads for the streams), with workers forming
    the batches and the fifo interleaving several shards: the same cache, bit for bit, and one fetch per
    launched group."""
    host, _ = _run_fake(tmp_path, monkeypatch, _FakeMidas(), sizes=SIZES, shard_size=3, batch_size_inference=2,
                        num_workers=2, storage_dtype="float32", model_type="dpt_beit_base_384")
    fake = _FakeMidas()
    lane, _ = _run_fake(tmp_path, monkeypatch, fake, sizes=SIZES, shard_size=3, batch_size_inference=2,
                        num_workers=2, storage_dtype="float32", model_type="dpt_beit_base_384",
                        options={"lane": "threads"})
    _assert_same_cache(host, lane)
    assert all(c["thread"] != threading.main_thread().ident for c in fake.calls)  # on the compute "stream"
    c = json.loads((lane / "artifact.json").read_text())["compute"]
    assert c["lane"] == "threads" and c["fetches"] == len(fake.calls) and c["frames"] == len(SIZES)
    assert c["num_workers"] == 2 and c["batch_size"] == 2 and c["limit"]


def test_the_host_launches_the_next_batch_before_it_waits_for_one(tmp_path, monkeypatch):
    """The first forward does not finish until the host has launched a later batch's copy-in: a loop that waited
    for each batch before reading the next would leave it waiting (and the test fails on the timeout)."""
    from pipeline.stages.depth import lanes

    launched_in = []
    next_launched = threading.Event()
    real_run = lanes.ThreadLane.run

    def run(self, stream, fn, after=None):
        if stream == "in":
            launched_in.append(stream)
            if len(launched_in) >= 2:
                next_launched.set()
        return real_run(self, stream, fn, after)

    seen = {}

    def first_call_waits(n):
        if n == 1:
            seen["overlapped"] = next_launched.wait(timeout=20)

    monkeypatch.setattr(lanes.ThreadLane, "run", run)
    fake = _FakeMidas(on_call=first_call_waits)
    _run_fake(tmp_path, monkeypatch, fake, sizes=[(24, 32)] * 4, model_type="dpt_levit_224", batch_size_inference=1,
              num_workers=1, options={"lane": "threads"})
    assert seen["overlapped"], "the host waited for batch 1 before launching batch 2"
    assert len(fake.calls) == 4


@pytest.mark.parametrize("lane", ["threads", None])
def test_one_host_wait_per_batch_and_no_other_sync(tmp_path, monkeypatch, lane):
    """Counted in the stage's own code while it runs: .item()/.tolist()/bool()/float()/int()/.cpu() and
    torch.cuda.synchronize (each a host sync on CUDA): none; the lane's fetch: once per launched group, even with
    bf16 autocast (the finiteness flags come back with the output)."""
    from pipeline.bench.overlap import count_host_syncs

    counts: dict = {}
    fake = _FakeMidas()
    with count_host_syncs(counts):
        cache, _ = _run_fake(tmp_path, monkeypatch, fake, sizes=SIZES, shard_size=4, batch_size_inference=2,
                             num_workers=0, precision="bf16", model_type="dpt_beit_base_384",
                             options={"lane": lane} if lane else {})
    c = json.loads((cache / "artifact.json").read_text())["compute"]
    assert counts == {} and c["fetches"] == c["batches"] == len(fake.calls) == 5 and c["fp32_fallbacks"] == 0


def test_the_counter_sees_a_sync_in_stage_code(tmp_path, monkeypatch):
    """The counter is not blind: the old loop's `bool(torch.isfinite(y).all())` per batch is counted."""
    import torch

    from pipeline.bench.overlap import count_host_syncs
    from pipeline.stages.depth import compute

    real = compute.forward

    def forward_with_old_check(bundle, x, amp):
        y = real(bundle, x, amp)
        bool(torch.isfinite(y).all())
        return y

    monkeypatch.setattr(compute, "forward", forward_with_old_check)
    counts: dict = {}
    with count_host_syncs(counts, roots=(REPO / "pipeline", REPO / "tests")):  # the check sits in this file
        _run_fake(tmp_path, monkeypatch, _FakeMidas(), sizes=[(24, 32)] * 3, model_type="dpt_levit_224",
                  batch_size_inference=1, options={"lane": "threads"})
    assert counts == {"__bool__": 3}


def test_fp16_overflow_redo_on_the_stand_in_lane(tmp_path, monkeypatch):
    """A group whose fp16 output overflows is recomputed in fp32 from its input still on the device."""
    big = _FakeMidas(gain=1e6)
    cache, out = _run_fake(tmp_path, monkeypatch, big, sizes=[(24, 32)] * 3, model_type="dpt_levit_224",
                           precision="fp16", batch_size_inference=2, options={"lane": "threads"})
    # both batches launched in fp16 before the first is fetched; each redone in fp32 when fetched
    assert [c["autocast"] for c in big.calls] == [True, True, False, False]
    assert json.loads((cache / "artifact.json").read_text())["compute"]["fp32_fallbacks"] == 2
    assert all(v and np.isfinite(d).all() and d.max() > 65504 for _, v, d in _frames(cache))


def test_compile_pads_the_last_batch_to_the_full_batch(tmp_path, monkeypatch):
    """With depth.compile every forward sees batch_size frames (the last batch repeats its last frame), so the
    compiled graph never recompiles for a short batch; the padding is cut off before the cache."""
    fake = _FakeMidas()
    cache, _ = _run_fake(tmp_path, monkeypatch, fake, sizes=[(24, 32)] * 5, model_type="dpt_levit_224",
                         batch_size_inference=4, compile=True)
    assert [c["shape"][0] for c in fake.calls] == [4, 4]
    ref, _ = _run_fake(tmp_path, monkeypatch, _FakeMidas(), sizes=[(24, 32)] * 5, model_type="dpt_levit_224",
                       batch_size_inference=4)
    _assert_same_cache(cache, ref)


def test_skipped_frames_keep_their_place_in_the_fifo(tmp_path, monkeypatch):
    """A bad frame in a later shard, with --skip-bad-frames, is stored invalid in its own shard, after the shard
    before was committed (host ops and launched batches run in the order they happened)."""
    root = tmp_path / "data"
    _folder_dataset(root, [(24, 32)] * 5, bad=(3,))
    cache, _ = _run_fake(tmp_path, monkeypatch, _FakeMidas(), sizes=None, model_type="dpt_levit_224", shard_size=2,
                         batch_size_inference=2, options={"skip_bad_frames": True, "lane": "threads"})
    assert [v for _, v, _ in _frames(cache)] == [True, True, True, False, True]


# ------------------------------------------------------------------------------------------------ GPU defaults
def test_choose_batch_fits_the_free_memory():
    from pipeline.stages.depth.compute import choose_batch

    gib = 1 << 30
    assert choose_batch(free_bytes=80 * gib, fixed_bytes=2 * gib, per_frame_bytes=gib // 2) == 64  # capped
    assert choose_batch(free_bytes=16 * gib, fixed_bytes=2 * gib, per_frame_bytes=gib // 2) == 16  # 10 GiB of room
    assert choose_batch(free_bytes=2 * gib, fixed_bytes=2 * gib, per_frame_bytes=gib) == 1  # nothing fits: 1
    assert choose_batch(free_bytes=80 * gib, fixed_bytes=0, per_frame_bytes=1, cap=8) == 8


def test_auto_workers_from_the_cores(monkeypatch):
    import os

    from pipeline.stages.depth import compute

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(24)), raising=False)
    assert compute.auto_workers(cuda=True) == 16 and compute.auto_workers(cuda=False) == compute.CPU_WORKERS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert compute.auto_workers(cuda=True) == 3


def test_cpu_defaults_stay_exact(tmp_path, monkeypatch):
    """A config that says nothing runs the CPU path as before auto existed: fp32, run.py-identical preprocessing,
    batch 8, 2 workers, the host lane."""
    fake = _FakeMidas()
    cache, _ = _run_fake(tmp_path, monkeypatch, fake, sizes=[(24, 32)] * 3, model_type="dpt_levit_224",
                         batch_size_inference=None, num_workers=None, precision="auto", preprocess="auto")
    rec = json.loads((cache / "artifact.json").read_text())
    assert rec["cache_spec"]["precision"] == "fp32" and "preprocess" not in rec["cache_spec"]
    assert rec["config"]["precision"] == "auto"  # the record keeps the config as asked; the spec says what ran
    c = rec["compute"]
    assert (c["batch_size"], c["num_workers"], c["lane"]) == (8, 2, "host")
    assert not any(call["autocast"] for call in fake.calls)


def test_tf32_is_switched_on_for_the_stage_only():
    import torch

    from pipeline.stages.depth.compute import _tf32

    before = torch.backends.cuda.matmul.allow_tf32
    with _tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_depth_device_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    root = tmp_path / "data"
    _folder_dataset(root, [(24, 32)] * 2)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"stand-in")
    r = run_cli(["depth", _midas_yaml(tmp_path, root, weights, device="cuda"), "--store", str(tmp_path / "s")],
                cwd=tmp_path)
    assert r.returncode == 2 and "depth.device is 'cuda'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "s" / "depth").exists()


# ------------------------------------------------------------------------------------------------ the bench
def test_bench_depth_overlap_runs_on_cpu(tmp_path):
    """The stand-in bench at a tiny size: every case, its rate against both bounds, the waits it made. (Its rates
    are measured in docs/benchmarks.md, not asserted here.)"""
    from pipeline.bench.overlap import bench_depth_overlap
    from pipeline.bench.harness import bench_device

    rec = bench_depth_overlap(batch=2, size=16, steps=4, device=bench_device("cpu"), isolate=False,
                              pairs=((10, 5),), workers=1, shard_size=4)
    assert set(rec["cases"]) == {"T10_H5/serial", "T10_H5/host", "T10_H5/gpu_stand_in"}
    for c in rec["cases"].values():
        assert c["frames"] == 8 and c["frames_per_s"] > 0 and c["fetches_per_batch"] == 1
        assert c["host_syncs_in_stage_code"] == 0 and c["vs_full_overlap"] > 0
    assert rec["cases"]["T10_H5/gpu_stand_in"]["lane"] == "threads"
    assert set(rec["ratios"]) == {"T10_H5 frames_per_s host/serial", "T10_H5 frames_per_s gpu_stand_in/serial"}
    assert rec["goals"]["T10_H5 gpu_stand_in host waits per batch beyond the fetch"]["met"]


# ------------------------------------------------------------------------------------------------ GPU only
gpu = pytest.mark.gpu


def _cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch


@gpu
def test_gpu_cuda_lane_gives_the_host_lanes_output():
    """Streams and events: the CUDA lane's output of a real conv equals the same forward run synchronously."""
    torch = _cuda()
    from pipeline.stages.depth.lanes import CudaLane

    conv = torch.nn.Conv2d(3, 1, 3, padding=1).cuda().eval()
    lane = CudaLane(torch.device("cuda"))
    xs = [torch.randn(4, 3, 64, 64).pin_memory() for _ in range(6)]
    handles = []
    for x in xs:
        h_in = lane.run("in", lambda x=x: x.to("cuda", non_blocking=True))
        h_c = lane.run("compute", lambda h=h_in: conv(lane.value(h)), after=h_in)
        handles.append(lane.run("out", lambda h=h_c: lane.value(h).to("cpu", non_blocking=True), after=h_c))
    got = [lane.fetch(h) for h in handles]
    with torch.no_grad():
        want = [conv(x.cuda()).cpu() for x in xs]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert lane.fetches == 6


@gpu
def test_gpu_nvjpeg_decode_matches_the_cpu_path(tmp_path):
    """device_batch on CUDA (nvJPEG) against the CPU's decode + torch preprocessing of the same JPEGs."""
    torch = _cuda()
    import cv2

    from dkp_core.midas import get_spec
    from dkp_core.midas.transforms import preprocess_tensor
    from pipeline.stages.depth.frames import device_batch

    spec = get_spec("dpt_beit_base_384")
    items, hws, cpu = [], [], []
    for k in range(3):
        img = np.random.default_rng(k).integers(0, 255, (96, 128, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(".jpg", img)
        raw = buf.reshape(-1)
        items.append({"jpeg": torch.from_numpy(raw), "path": f"f{k}.jpg"})
        hws.append((96, 128))
        rgb = cv2.cvtColor(cv2.imdecode(raw, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        cpu.append(preprocess_tensor(torch.from_numpy(rgb).permute(2, 0, 1)[None], spec)[0])
    x, kept, bad = device_batch(items, hws, spec, torch.device("cuda"))
    assert kept == [0, 1, 2] and bad == []
    # nvJPEG's IDCT is not libjpeg-turbo's: a few grey levels apart at most
    torch.testing.assert_close(x.cpu(), torch.stack(cpu), atol=0.1, rtol=0)


@gpu
def test_gpu_loader_pins_the_batches(tmp_path, monkeypatch):
    """On CUDA the DataLoader hands the lane pinned batches (so the non_blocking copy in is asynchronous)."""
    torch = _cuda()

    pinned = []
    real_to = torch.Tensor.to

    def to(self, *a, **kw):
        if kw.get("non_blocking") and self.device.type == "cpu" and self.dim() == 4:
            pinned.append(self.is_pinned())
        return real_to(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "to", to)
    fake = _FakeMidas()
    fake.conv = fake.conv.cuda()
    cache, _ = _run_fake(tmp_path, monkeypatch, fake, sizes=[(24, 32)] * 4, model_type="dpt_levit_224",
                         num_workers=1, preprocess="cpu", precision="fp32", batch_size_inference=2,
                         model_device="cuda")
    assert pinned and all(pinned)
    c = json.loads((cache / "artifact.json").read_text())["compute"]
    assert c["lane"] == "cuda" and c["fetches"] == c["batches"] == 2


@gpu
def test_gpu_bf16_depth_against_fp32(tmp_path, monkeypatch):
    """The random-init LeViT in bf16 against fp32 on the same frames, through the stage: finite, and close (the
    measured difference of the real models is in docs/benchmarks.md)."""
    torch = _cuda()
    from pipeline.bench.depth import random_midas_weights

    root = tmp_path / "data"
    _folder_dataset(root, [(96, 128)] * 4)
    w = tmp_path / "levit.pt"
    random_midas_weights("dpt_levit_224", torch.randn(2, 3, 224, 224), w, device=torch.device("cuda"))
    from tests.test_depth_stage import _run_in_process

    caches = {}
    for p in ("fp32", "bf16"):
        y = _midas_yaml(tmp_path, root, w, precision=p, device="cuda", storage_dtype="float32")
        _run_in_process(y, tmp_path / f"s-{p}")
        (caches[p],) = list((tmp_path / f"s-{p}" / "depth").iterdir())
    for (_, _, a), (_, _, b) in zip(_frames(caches["bf16"]), _frames(caches["fp32"])):
        assert np.isfinite(a).all()
        assert np.abs(a - b).max() / np.abs(b).max() < 0.05
