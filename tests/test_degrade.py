"""depth.degrade (pipeline/data/degrade.py): each kind does what it says, a frame's degradation is a pure function of
(map, frame, settings), the cache is never touched, and the keys move where the teacher's input changes only."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.config import DegradeConfig
from pipeline.data.degrade import DegradedReader, degrade_depth, is_identity, teacher_reader


def _map(h=48, w=64) -> np.ndarray:
    """An inverse-depth map with structure: a near disc on a tilted far plane, range about [0.1, 0.3]."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    inv = 0.1 + 0.02 * xs / w
    inv[(xs - 30) ** 2 + (ys - 20) ** 2 < 100] = 0.3
    return inv.astype(np.float32)


def test_default_is_the_identity():
    x = _map()
    assert is_identity(DegradeConfig()) and is_identity(None)
    np.testing.assert_array_equal(degrade_depth(x, 3, DegradeConfig()), x)
    reader = object()
    assert teacher_reader(reader, DegradeConfig()) is reader
    assert isinstance(teacher_reader(reader, DegradeConfig(noise=0.1)), DegradedReader)


def test_each_kind_does_what_it_says():
    x = _map()
    span = float(x.max() - x.min())
    noisy = degrade_depth(x, 1, DegradeConfig(noise=0.1))
    assert abs(float((noisy - x).std()) / span - 0.1) < 0.01  # sd = 0.1 of the frame's range
    q = degrade_depth(x, 1, DegradeConfig(quantise=4))
    assert len(np.unique(q)) <= 4 and np.abs(q - x).max() <= span / 3 / 2 + 1e-6
    blurred = degrade_depth(x, 1, DegradeConfig(blur=0.05))
    assert np.abs(np.diff(blurred, axis=1)).max() < 0.5 * np.abs(np.diff(x, axis=1)).max()  # the disc's edge softens
    # lower resolution: a pattern finer than the reduced grid (a 2-pixel checkerboard) is averaged away...
    ys, xs = np.mgrid[0:48, 0:64]
    checker = (0.1 + 0.1 * ((ys // 2 + xs // 2) % 2)).astype(np.float32)
    low = degrade_depth(checker, 1, DegradeConfig(downscale=4))
    assert low.shape == checker.shape and float(low.std()) < 0.1 * float(checker.std())
    # ...while a coarse structure survives (the disc is still there, its edge softer)
    low = degrade_depth(x, 1, DegradeConfig(downscale=4))
    assert low[20, 30] > 0.25 and low[40, 5] < 0.15
    holes = degrade_depth(x, 1, DegradeConfig(holes=0.3))
    frac = float(np.isnan(holes).mean())
    assert 0.1 < frac < 0.5  # cells of 1/8 of the side, each dropped with probability 0.3
    np.testing.assert_array_equal(holes[~np.isnan(holes)], x[~np.isnan(holes)])
    # the holes are blocks, not scattered pixels: each hole pixel has hole neighbours
    nan = np.isnan(holes)
    assert (nan[:, :-1] & nan[:, 1:]).sum() > 0.8 * nan[:, :-1].sum()


def test_pure_function_of_map_frame_and_settings():
    x = _map()
    d = DegradeConfig(noise=0.05, holes=0.2, blur=0.01, downscale=2, quantise=32)
    a, b = degrade_depth(x, 7, d), degrade_depth(x, 7, d)
    np.testing.assert_array_equal(a, b)  # the same frame: the same errors, every epoch, in every process
    assert not np.array_equal(np.nan_to_num(a), np.nan_to_num(degrade_depth(x, 8, d)))  # another frame: others
    assert x.dtype == np.float32 and a.dtype == np.float32
    np.testing.assert_array_equal(x, _map())  # the input is not modified


def test_existing_holes_stay_holes_and_do_not_spread():
    x = _map()
    x[10:14, 5:9] = np.nan
    out = degrade_depth(x, 0, DegradeConfig(blur=0.05, downscale=4))
    assert np.isnan(out[10:14, 5:9]).all() and np.isnan(out).sum() == 16


class _Reader:
    def __init__(self):
        self.reads = []

    def read(self, i):
        self.reads.append(i)
        return _map()

    def is_valid(self, i):
        return True


def test_degraded_reader_wraps_reads_only_and_pickles():
    r = _Reader()
    d = DegradedReader(r, DegradeConfig(noise=0.2))
    assert d.is_valid(3)
    out = d.read(3)
    assert r.reads == [3] and not np.array_equal(out, _map())
    clone = pickle.loads(pickle.dumps(d))  # DataLoader workers receive the dataset, reader included, pickled
    np.testing.assert_array_equal(clone.read(3), out)


def test_keys_degrade_enters_teach_not_depth(tmp_path):
    """The cache is the same for every degradation (depth key unchanged); teach, and everything after it, is new."""
    from tests.test_golden_keys import GOLDEN, plan_keys

    base = GOLDEN["files"]
    for sets in (["depth.degrade.noise=0.1"], ["depth.degrade.holes=0.2", "depth.degrade.downscale=2"]):
        keys = plan_keys(["depth.provider=files", *sets], depth_files=True)
        assert keys["manifest"] == base["manifest"] and keys["depth"] == base["depth"]
        assert keys["teach"] != base["teach"] and keys["distill"] != base["distill"] and keys["eval"] != base["eval"]
    a = plan_keys(["depth.provider=files", "depth.degrade.noise=0.1"], depth_files=True)
    b = plan_keys(["depth.provider=files", "depth.degrade.noise=0.2"], depth_files=True)
    assert a["teach"] != b["teach"]
    # spelling the default out changes nothing
    assert plan_keys(["depth.provider=files", "depth.degrade.noise=0", "depth.degrade.downscale=1"],
                     depth_files=True) == base


@pytest.mark.parametrize("sets,words", [(["depth.degrade.quantise=1"], "1 level would erase"),
                                        (["depth.degrade.holes=1.5"], "depth.degrade.holes"),
                                        (["depth.degrade.downscale=0.5"], "depth.degrade.downscale"),
                                        (["depth.degrade.noise=-1"], "depth.degrade.noise")])
def test_bad_values_are_refused_by_name(sets, words):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        load_config("synthetic", sets)


def test_the_teacher_reads_degraded_depth_in_every_stage(tiny_store):
    """teach trains on it and distill's embedding cache holds the teacher's output on it (recomputed here from the
    degraded maps), while the depth cache is the clean run's artifact."""
    import json

    import torch

    from pipeline.config import load_config
    from pipeline.data.datasets import FrameDataset
    from pipeline.depth_cache import DepthCacheReader
    from pipeline.stages import common
    from dkp_core.keypoints.teacher import FrozenTeacher
    from pipeline.stages.distill.teacher_cache import EmbeddingCache

    sets = ("distill.layer=heatmaps", "distill.flatten=keypoint")
    plan_c = tiny_store(sets, until="teach")["plan"]
    deg = ("depth.degrade.noise=0.3", "depth.degrade.holes=0.3")
    t = tiny_store(sets + deg)
    plan_d = t["plan"]
    assert plan_d.stages["depth"].key == plan_c.stages["depth"].key
    assert plan_d.stages["teach"].key != plan_c.stages["teach"].key
    rec = json.loads((plan_d.stages["teach"].path / "artifact.json").read_text())
    assert rec["inputs"]["config"]["depth_degrade"]["noise"] == 0.3

    cfg = load_config(t["yaml"], list(sets + deg))
    teacher = FrozenTeacher(common.load_trained(plan_d.stages["teach"].path)[0])
    m = plan_d.manifest
    cache = EmbeddingCache(plan_d.stages["distill"].path / "teacher_embeddings")
    position = np.load(plan_d.stages["distill"].path / "teacher_embeddings" / "position.npy")
    i = int(np.flatnonzero(position >= 0)[0])
    cached = cache.lookup(np.array([i]), np.array([0]))[0].numpy()
    for reader, same in ((DepthCacheReader(plan_d.stages["depth"].path), False),
                         (teacher_reader(DepthCacheReader(plan_d.stages["depth"].path), cfg.depth.degrade), True)):
        ds = FrameDataset(manifest=m, indices=[i], image_size=teacher.image_size, use_rgb=False, use_depth=True,
                          depth_reader=reader)
        emb = teacher.embedding(ds[0]["depth"][None], "heatmaps")[0].numpy()
        assert np.allclose(emb, cached, atol=1e-6) == same
    m_eval = json.loads((plan_d.stages["eval"].path / "metrics.json").read_text())
    assert m_eval["teacher"]["artifact"] == plan_d.stages["teach"].key
    torch.set_num_threads(torch.get_num_threads())
