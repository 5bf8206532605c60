"""FrameDataset: teacher input normalisation and flips shared by a frame's RGB and depth."""
import numpy as np
import pytest
import torch

from pipeline.data.datasets import FrameDataset, depth_to_tensor, normalise_inverse_depth, valid_train_indices

H, W = 24, 40  # non-square on purpose: shorter side -> size, then a centre crop


def _ramp(h, w):
    """Values that grow to the right: 10 + 6 x (uint8-safe for w <= 40)."""
    return np.broadcast_to(10.0 + 6.0 * np.arange(w, dtype=np.float32), (h, w)).copy()


class FakeManifest:
    apply_masks = False

    def __init__(self, paths, train):
        self.paths, self._train = list(paths), np.asarray(train, dtype=np.int64)

    def path_of(self, i):
        return self.paths[i]

    def split(self, name):
        return self._train if name == "train" else np.arange(len(self.paths), dtype=np.int64)


class FakeReader:
    """Depth cache stand-in: inverse depth = the same ramp as the RGB red channel (near = right)."""

    def __init__(self, n, invalid=()):
        self.n, self.invalid = n, set(invalid)

    def read(self, i):
        return _ramp(H, W) * (1.0 + i)  # per-frame scale must not matter after min-max

    def is_valid(self, i):
        return i not in self.invalid


@pytest.fixture
def frames(tmp_path):
    import cv2

    paths = []
    for i in range(6):
        rgb = np.zeros((H, W, 3), np.uint8)
        rgb[..., 0] = _ramp(H, W).astype(np.uint8)  # red = the ramp
        rgb[..., 1] = 40 * i
        p = tmp_path / f"f{i}.png"
        cv2.imwrite(str(p), rgb[:, :, ::-1])
        paths.append(p)
    return paths


def _ds(frames, **kw):
    m = FakeManifest(frames, range(len(frames)))
    kw = {"image_size": 16, "use_rgb": True, "use_depth": True, "hflip": True, "seed": 3} | kw
    return FrameDataset(manifest=m, indices=np.arange(len(frames)), depth_reader=FakeReader(len(frames)), **kw)


def test_normalise_inverse_depth_minmax_near_is_plus_one():
    metric = np.array([[2.0, 4.0], [8.0, np.nan]], np.float32)  # metres: 2 m is nearest
    n = normalise_inverse_depth(1.0 / metric)
    assert n.dtype == np.float32 and n.shape == (2, 2)
    assert n[0, 0] == pytest.approx(1.0) and n[1, 0] == pytest.approx(-1.0)  # near +1, far -1
    assert n[0, 1] == pytest.approx((0.25 - 0.125) / (0.5 - 0.125) * 2 - 1)
    assert np.isfinite(n).all() and n[1, 1] == pytest.approx(-1.0)  # non-finite pixels -> the far end
    # scale and shift of relative inverse depth do not matter
    np.testing.assert_allclose(normalise_inverse_depth(7.0 / metric + 3.0), n, atol=1e-6)
    assert (normalise_inverse_depth(np.full((3, 3), 5.0)) == 0).all()  # constant map -> zeros
    assert (normalise_inverse_depth(np.full((2, 2), np.nan)) == 0).all()
    with pytest.raises(ValueError, match="minmax"):
        normalise_inverse_depth(metric, "zscore")


def test_depth_replicated_to_detector_channels():
    t = depth_to_tensor(np.array([[0.5, -1.0]], np.float32), channels=3)
    assert t.shape == (3, 1, 2) and torch.equal(t[0], t[2]) and t[1, 0, 0] == 0.5


def test_item_shapes_ranges_and_alignment_of_rgb_and_depth(frames):
    ds = _ds(frames, hflip=False)
    it = ds[2]
    assert it["rgb"].shape == (3, 16, 16) and it["depth"].shape == (3, 16, 16)
    assert it["index"].item() == 2 and not it["flip"].item()
    assert it["rgb"].min() >= -1 and it["rgb"].max() <= 1
    d = it["depth"][0]
    assert d.max().item() == pytest.approx(1.0) and d.min().item() == pytest.approx(-1.0)
    # the right (near) side is +1: depth increases along x like the red ramp, on every row
    assert (d[:, 1:] >= d[:, :-1] - 1e-6).all() and (d[:, -1] > d[:, 0]).all()
    # same resize/crop for RGB and depth: the red channel, min-max normalised, equals the depth input
    red = it["rgb"][0]
    red = (red - red.min()) / (red.max() - red.min()) * 2 - 1
    assert (red - d).abs().max() < 0.05


def test_flip_is_seeded_shared_and_applied_to_both(frames):
    ds = _ds(frames)
    seen = set()
    for epoch in range(4):
        for i in range(len(ds)):
            a, b = ds.get(i, epoch), ds.get(i, epoch)  # a pure function of (seed, epoch, index)
            assert a["flip"].item() == b["flip"].item() and torch.equal(a["rgb"], b["rgb"])
            plain = ds[i]
            f = a["flip"].item()
            seen.add(f)
            want_rgb = plain["rgb"].flip(-1) if f else plain["rgb"]
            want_d = plain["depth"].flip(-1) if f else plain["depth"]
            assert torch.equal(a["rgb"], want_rgb) and torch.equal(a["depth"], want_d), (epoch, i)
            if f:  # flipped: near (+1) is now on the left in both
                assert (a["depth"][0, :, 0] > a["depth"][0, :, -1]).all()
                assert (a["rgb"][0, :, 0] > a["rgb"][0, :, -1]).all()
    assert seen == {True, False}
    # a student set (RGB only) and a teacher set (depth only) with the same seed flip the same frames
    s = _ds(frames, use_depth=False)
    t = _ds(frames, use_rgb=False)
    for i in range(len(frames)):
        assert s.get(i, 1)["flip"].item() == t.get(i, 1)["flip"].item()
    # flipping normalised depth == normalising flipped depth (what the teacher-embedding cache relies on)
    assert torch.equal(t.load(0, True)["depth"], t.load(0, False)["depth"].flip(-1))
    # another seed gives another flip pattern; hflip=False never flips
    other = [_ds(frames, seed=4).get(i, e)["flip"].item() for e in range(4) for i in range(len(frames))]
    mine = [ds.get(i, e)["flip"].item() for e in range(4) for i in range(len(frames))]
    assert other != mine
    no = _ds(frames, hflip=False)
    assert not any(no.get(i, e)["flip"].item() for e in range(4) for i in range(len(frames)))


def test_use_depth_needs_a_reader_and_invalid_frames_are_skipped(frames):
    m = FakeManifest(frames, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="depth_reader"):
        FrameDataset(manifest=m, indices=[0], image_size=16, use_rgb=False, use_depth=True)
    idx = valid_train_indices(m, FakeReader(6, invalid={1, 3}))
    assert idx.tolist() == [0, 2]
    assert valid_train_indices(m).tolist() == [0, 1, 2, 3]
