"""The training-frame cache (pipeline/data/framecache.py) and the batched items it feeds: the samples and batches
are bit-identical to what FrameDataset produced before issue 23 (pipeline.bench.frames.ReferenceFrameDataset, the
old code kept verbatim), with and without the cache; a cache is keyed by what its rows are made of, resumes a
killed build, is built by one process while others wait, and is skipped when the disk has no room."""
import threading
import time

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from pipeline.bench.frames import ReferenceFrameDataset
from pipeline.data import framecache as FC
from pipeline.data.build import build_manifest
from pipeline.data.datasets import FrameDataset, collate_frames
from pipeline.training import flips
from tests.test_manifest import _age, img, make_h36m


class HoledDepth:
    """Depth cache stand-in: smooth inverse depth at the frame's size, NaN holes in some frames (what the
    normalisation ignores), different per frame."""

    def __init__(self, h, w):
        self.h, self.w = h, w

    def read(self, i):
        rng = np.random.default_rng(i)
        d = cv2.resize(rng.random((4, 4), dtype=np.float32), (self.w, self.h), interpolation=cv2.INTER_CUBIC) + 1.0
        if i % 3 == 0:
            d[: self.h // 4, : self.w // 5] = np.nan
        return d

    def is_valid(self, i):
        return True


@pytest.fixture(scope="module", params=["colour mask first", "colour mask last"])
def masked(tmp_path_factory, request):
    """Human3.6M without background at 40x24 (non-square, so the square resize crops): JPEG frames, a mask
    per frame (one an RGB PNG, a factor per channel, the others gray; soft edges). A frame cache of the masks
    begun with gray ones must widen to three channels when it meets the colour one."""
    root = tmp_path_factory.mktemp("fc") / "human_images"
    make_h36m(root, w=40, h=24, wobg=True)
    m = build_manifest("human36m_wobg", root, progress=False)
    rng = np.random.default_rng(2)
    colour = 0 if request.param == "colour mask first" else len(m) - 1
    for i, rel in enumerate(m.mask_paths):
        mk = np.zeros((24, 40, 3 if i == colour else 1), np.uint8)
        mk[4:20, 8:30] = 255
        mk[4:20, 30:33] = rng.integers(1, 255, (16, 3, mk.shape[2]), dtype=np.uint8)
        assert cv2.imwrite(str(root / rel), mk if i == colour else mk[:, :, 0])
        _age(root / rel)
    return build_manifest("human36m_wobg", root, progress=False)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A folder dataset of PNG and JPEG frames of several shapes (down- and upscaled to the model size)."""
    root = tmp_path_factory.mktemp("fc-plain")
    for i, (w, h, ext) in enumerate([(40, 24, "png"), (24, 40, "jpg"), (64, 64, "png"), (12, 20, "jpg")] * 3):
        img(root / "images" / f"f{i:02d}.{ext}", w, h)
    return build_manifest("folder", root, progress=False)


def _pair(m, size, store, *, cache: bool, **kw):
    """(reference, FrameDataset) over every frame of ``m``; the second reads a frame cache when ``cache``."""
    kw = dict(manifest=m, indices=np.arange(len(m)), image_size=size, depth_reader=HoledDepth(*m.sizes[0][::-1]),
              hflip=True, seed=7) | kw
    ref, ds = ReferenceFrameDataset(**kw), FrameDataset(**kw)
    if cache:
        assert FC.attach(ds, store, depth_key="d" * 64, workers=0)
    return ref, ds


def _same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("data, size, use", [("masked", 16, "both"), ("masked", 48, "rgb"), ("plain", 16, "rgb"),
                                             ("plain", 32, "rgb")])
def test_items_and_batches_equal_the_old_code_bit_for_bit(masked, plain, tmp_path, data, size, use, cache):
    m = masked if data == "masked" else plain
    if data == "plain" and use == "both":
        pytest.skip("the folder frames differ in size; the depth stand-in is per dataset")
    ref, ds = _pair(m, size, tmp_path / "store", cache=cache, use_rgb=True, use_depth=use == "both")
    for epoch in range(3):
        for i in range(len(m)):
            _same(ds.get(i, epoch), ref.get(i, epoch))
        _same(ds[epoch], ref.load(epoch, False))
        order = np.random.default_rng(epoch).permutation(len(m))[:8]
        # what the trainer's DataLoader makes of them: before, items + default_collate; now, parts + collate_frames
        _same(collate_frames([ds.loader_view().get(int(i), epoch) for i in order]),
              default_collate([ref.get(int(i), epoch) for i in order]))
    assert any(ds._flip(i, e) for i in range(len(m)) for e in range(3)), "no flip drawn: the test would be blind"
    if cache and m.apply_masks:  # gray masks and one colour one: the mask cache holds three channels
        assert np.load(ds.cache.files["mask"], mmap_mode="r").shape[1] == 3


def test_epoch_flips_equal_the_per_sample_draws():
    assert flips.fast_flips_ok()
    for seed, epoch in ((0, 0), (7, 3), (2**32 + 3, 2**32 + 1), (2**63 - 1, 11)):
        assert np.array_equal(flips._fast(seed, epoch, np.arange(2000)), flips._slow(seed, epoch, np.arange(2000)))


def test_cache_keys_follow_what_the_rows_are_made_of(masked, plain):
    def keys(m, **kw):
        kw = dict(manifest=m, indices=np.arange(len(m)), image_size=16, use_rgb=True, use_depth=True,
                  depth_reader=HoledDepth(24, 40)) | kw
        return {s.kind: s.key for s in FC.specs_for(FrameDataset(**kw), depth_key=kw.pop("depth_key", "d" * 64))}

    base = keys(masked)
    assert set(base) == {"rgb", "depth", "mask"}
    assert keys(masked, hflip=True, seed=9) == base  # flips are drawn per sample, not stored
    assert all(keys(masked, image_size=32)[k] != base[k] for k in base)
    fewer = keys(masked, indices=np.arange(len(masked) - 1))
    assert all(fewer[k] != base[k] for k in base)
    other_depth = {s.kind: s.key for s in FC.specs_for(FrameDataset(
        manifest=masked, indices=np.arange(len(masked)), image_size=16, use_rgb=True, use_depth=True,
        depth_reader=HoledDepth(24, 40)), depth_key="e" * 64)}
    assert other_depth["depth"] != base["depth"] and other_depth["rgb"] == base["rgb"]
    # depth.degrade: the teacher reads other maps from the same depth artifact, so another depth cache per setting
    from pipeline.config import DegradeConfig
    from pipeline.data.degrade import DegradedReader

    noisy, blurred = (keys(masked, depth_reader=DegradedReader(HoledDepth(24, 40), DegradeConfig(**kw)))
                      for kw in ({"noise": 0.1}, {"blur": 0.05}))
    assert len({noisy["depth"], blurred["depth"], base["depth"]}) == 3 and noisy["rgb"] == base["rgb"]
    assert set(keys(plain)) == {"rgb", "depth"}  # no masks applied: no mask cache
    # a frame's bytes, its EXIF orientation or a mask's bytes: a new key for the cache that holds them
    from copy import copy

    for attr, kinds in (("fingerprints", {"rgb"}), ("orientations", {"rgb"}), ("mask_fingerprints", {"mask"})):
        changed = copy(masked)
        values = list(getattr(masked, attr) or [1] * len(masked))
        values[1] = "xxh3:" + "0" * 32 if attr != "orientations" else 6
        setattr(changed, attr, values)
        k = keys(changed)
        assert {kind for kind in base if k[kind] != base[kind]} == kinds, attr


def test_a_killed_build_resumes_where_it_stopped(plain, tmp_path, monkeypatch):
    monkeypatch.setattr(FC, "CHUNK_ROWS", 4)
    monkeypatch.setattr(FC, "PROGRESS_EVERY_S", 0.0)
    decoded = []
    real = FC.ROW_OF["rgb"]

    def row(ds, i):
        if i == 9 and not decoded.count("killed"):
            decoded.append("killed")
            raise KeyboardInterrupt  # the build dies mid-way (Ctrl-C, kill): chunks 0-1 (rows 0-7) are on disk
        decoded.append(i)
        return real(ds, i)

    monkeypatch.setitem(FC.ROW_OF, "rgb", row)
    ds = FrameDataset(manifest=plain, indices=np.arange(len(plain)), image_size=16, use_rgb=True, use_depth=False)
    with pytest.raises(KeyboardInterrupt):
        FC.attach(ds, tmp_path, workers=0)
    spec = FC.specs_for(ds, depth_key=None)[0]
    d = spec.directory(tmp_path)
    assert not (d / "COMPLETE").exists() and not (d / "LOCK").exists() and (d / "data.npy.partial").exists()
    decoded.clear()
    decoded.append("killed")
    assert FC.attach(ds, tmp_path, workers=0)
    assert decoded[1:] == list(range(8, len(plain)))  # rows 0-7 were not decoded again
    fresh = FrameDataset(manifest=plain, indices=np.arange(len(plain)), image_size=16, use_rgb=True, use_depth=False)
    for i in range(len(plain)):
        assert np.array_equal(ds.rgb_chw(i), fresh.rgb_chw(i))
    assert not (d / "progress.json").exists() and (d / "artifact.json").exists()


def test_one_process_builds_while_the_others_wait(plain, tmp_path):
    from pipeline.store.artifacts import Lock

    ds = FrameDataset(manifest=plain, indices=np.arange(len(plain)), image_size=16, use_rgb=True, use_depth=False)
    spec = FC.specs_for(ds, depth_key=None)[0]
    d = spec.directory(tmp_path)
    d.mkdir(parents=True)
    held = Lock(d / "LOCK")
    held.acquire()  # another builder (this process's pid: alive, so never taken over)
    got = {}
    t = threading.Thread(target=lambda: got.update(path=FC.ensure(tmp_path, spec, ds, workers=0, poll_s=0.05)))
    t.start()
    time.sleep(0.4)
    assert t.is_alive() and not (d / "COMPLETE").exists()
    held.release()
    t.join(10)
    assert got["path"] == d / "data.npy" and (d / "COMPLETE").read_text().strip() == spec.key


def test_no_room_on_the_disk_means_decoding_as_before(plain, tmp_path, monkeypatch, caplog):
    import shutil
    from collections import namedtuple

    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(1, 1, 1 << 20))
    ds = FrameDataset(manifest=plain, indices=np.arange(len(plain)), image_size=16, use_rgb=True, use_depth=False)
    assert not FC.attach(ds, tmp_path, workers=0) and ds.cache is None
    assert "GiB needed" in caplog.text
    ref = ReferenceFrameDataset(manifest=plain, indices=np.arange(len(plain)), image_size=16, use_rgb=True,
                                use_depth=False)
    _same(ds.get(3, 0), ref.get(3, 0))


def test_a_truncated_cache_file_is_a_named_error(plain, tmp_path):
    from pipeline.errors import CacheError

    ds = FrameDataset(manifest=plain, indices=np.arange(len(plain)), image_size=16, use_rgb=True, use_depth=False)
    assert FC.attach(ds, tmp_path, workers=0)
    path = ds.cache.files["rgb"]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    fresh = FrameDataset(manifest=plain, indices=np.arange(len(plain)), image_size=16, use_rgb=True, use_depth=False)
    assert FC.attach(fresh, tmp_path, workers=0)
    with pytest.raises(CacheError, match="delete .* and re-run"):
        fresh.rgb_chw(len(plain) - 1)


def test_default_workers_come_from_the_cores(monkeypatch):
    import os

    from pipeline.training.settings import TrainSettings, default_num_workers

    assert default_num_workers("cpu") == 0
    assert TrainSettings(device="cpu").num_workers == 0 and TrainSettings(num_workers=3).num_workers == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert default_num_workers("auto") == 8  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_num_workers("cuda") == 3  # 32 cores / 8 ranks, less one
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_num_workers("cuda") == 0


def test_training_with_the_frame_cache_gives_the_same_weights_and_keys(tiny_store):
    """teach and a live-teacher distill (RGB and depth read from the caches, flips on, an epoch and more of samples
    so the caches are built) against the same runs decoding every sample: equal keys, equal weights."""
    from pipeline.stages.common import load_trained

    common = ["teach.steps=12", "distill.steps=12", "teach.hflip=true", "distill.hflip=true",
              "distill.teacher_cache=false"]
    on = tiny_store(common, until="distill")
    off = tiny_store(common + ["teach.frame_cache=false", "distill.frame_cache=false"], until="distill")
    for stage in ("teach", "distill"):
        a, b = on["plan"].stages[stage], off["plan"].stages[stage]
        assert a.key == b.key
        wa, wb = load_trained(a.path)[0].state_dict(), load_trained(b.path)[0].state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), stage
    caches = sorted(p.name.split("-")[0] for p in (on["dir"] / "store" / FC.DIRNAME).iterdir())
    assert caches == ["depth", "rgb"]  # the depth of teach and of the live teacher (same size: one cache), the RGB
    assert not (off["dir"] / "store" / FC.DIRNAME).exists()
