"""The synthetic generator (dkp_core.synthetic) and its folder-layout writer (pipeline.data.synth)."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from dkp_core import synthetic as S
from pipeline.errors import ConfigError, ManifestError
from pipeline.data.synth import split_indices, write_synthetic

SMALL = S.SyntheticConfig(image_size=64)
# Non-square on purpose: an (x, y) / (row, col) mix-up cannot pass these tests.
WIDE = S.SyntheticConfig(image_size=64, image_width=96)


def _frames(cfg, seed=0, indices=(0, 5, 40, 77, 130)):
    return [S.render_frame(cfg, seed, i) for i in indices]


# ---------------------------------------------------------------- generator
def test_deterministic_per_seed_and_index():
    a, b = S.render_frame(SMALL, 3, 17), S.render_frame(SMALL, 3, 17)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    np.testing.assert_array_equal(a.depth, b.depth)
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    c, d = S.render_frame(SMALL, 3, 18), S.render_frame(SMALL, 4, 17)
    assert not np.array_equal(a.rgb, c.rgb) and not np.array_equal(a.keypoints, c.keypoints)
    assert not np.array_equal(a.rgb, d.rgb)
    # No hidden state: rendering other frames in between changes nothing.
    S.render_frame(SMALL, 99, 1)
    np.testing.assert_array_equal(S.render_frame(SMALL, 3, 17).rgb, a.rgb)


@pytest.mark.parametrize("cfg,n_joints", [(WIDE, 16), (S.SyntheticConfig(image_size=48, n_joints=20), 20)])
def test_shapes_and_dtypes(cfg, n_joints):
    f = S.render_frame(cfg, 0, 3)
    h, w = cfg.height, cfg.width
    assert f.rgb.shape == (h, w, 3) and f.rgb.dtype == np.uint8
    assert f.depth.shape == (h, w) and f.depth.dtype == np.float32
    assert f.keypoints.shape == (n_joints, 2) and f.keypoints.dtype == np.float32
    assert f.visible.shape == f.occluded.shape == (n_joints,) and f.visible.dtype == bool
    assert f.mask.shape == (h, w) and f.mask.any()
    assert len(f.joint_names) == n_joints == len(S.joint_names(n_joints))
    for l, r in S.left_right_pairs(n_joints):
        assert f.joint_names[l].startswith("l_") and f.joint_names[r] == "r_" + f.joint_names[l][2:]


def test_visible_keypoints_are_inside_and_on_the_figure():
    on_figure = total = 0
    for f in _frames(WIDE, indices=range(0, 200, 9)):
        x, y = f.keypoints[:, 0], f.keypoints[:, 1]
        inside = (x >= 0) & (x <= WIDE.width - 1) & (y >= 0) & (y <= WIDE.height - 1)
        np.testing.assert_array_equal(f.visible, inside)
        assert f.visible.mean() > 0.5
        # A joint sits on its limb's axis, so its pixel (row y, column x) is a figure pixel
        # (head_top excepted: it is on the head's silhouette by definition).
        vis = f.visible & ~f.occluded
        vis[S.JOINT_NAMES.index("head_top")] = False
        ix, iy = np.rint(x[vis]).astype(int), np.rint(y[vis]).astype(int)
        on_figure += int(f.mask[iy, ix].sum())
        total += int(vis.sum())
    assert on_figure / total > 0.99


def test_figure_is_nearer_than_the_walls():
    for f in _frames(WIDE, indices=range(0, 300, 23)):
        assert f.depth[f.mask].max() < f.depth[~f.mask].min()
        assert f.depth[~f.mask].min() > 6.0  # walls 7-11 m
        vis = f.visible.copy()
        vis[S.JOINT_NAMES.index("head_top")] = False  # on the head's silhouette by definition
        d_joint = f.depth[np.rint(f.keypoints[vis, 1]).astype(int), np.rint(f.keypoints[vis, 0]).astype(int)]
        assert (d_joint < 6.0).all()


def test_zbuffer_near_limbs_occlude_far_ones():
    # Some joints are hidden by nearer body parts, and the depth there is the nearer surface.
    found = 0
    for f in _frames(SMALL, indices=range(0, 400, 7)):
        occ = f.occluded & f.visible
        found += int(occ.sum())
    assert found > 0


def _shared_colour_fraction(cfg):
    """Fraction of figure pixels whose exact RGB also occurs somewhere in the background."""
    shared = total = 0
    for f in _frames(cfg, indices=range(0, 320, 32)):
        bg = {tuple(c) for c in f.rgb[~f.mask]}
        fig_pixels = [tuple(c) for c in f.rgb[f.mask]]
        shared += sum(c in bg for c in fig_pixels)
        total += len(fig_pixels)
    return shared / total


def test_colour_is_ambiguous_because_of_the_distractors():
    # Without noise, identical shading of figure and wall distractors gives identical 8-bit colours.
    with_distractors = _shared_colour_fraction(S.SyntheticConfig(image_size=64, noise_std=0.0))
    without = _shared_colour_fraction(S.SyntheticConfig(image_size=64, noise_std=0.0, distractor_fraction=0.0))
    assert with_distractors > 0.4
    assert without < with_distractors / 4
    # ...while depth separates them: see test_figure_is_nearer_than_the_walls.


def test_clips_move_smoothly_like_video():
    cfg = S.SyntheticConfig(image_size=64, clip_length=16)
    for seed in range(3):
        kp = np.stack([S.frame_keypoints(cfg, seed, i)[0] for i in range(32)])  # (32, J, 2)
        within = np.abs(np.diff(kp[:16], axis=0)).mean()  # px per frame inside clip 0
        across = np.abs(kp[16] - kp[15]).mean()  # clip 0 -> clip 1: another figure elsewhere
        assert within < 1.5
        assert across > 4 * within


def test_frame_keypoints_match_render():
    for i in (0, 33, 65):
        f = S.render_frame(WIDE, 2, i)
        kp, vis = S.frame_keypoints(WIDE, 2, i)
        np.testing.assert_array_equal(kp, f.keypoints)
        np.testing.assert_array_equal(vis, f.visible)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="n_joints=17 is not a synthetic skeleton"):
        S.SyntheticConfig(n_joints=17)
    with pytest.raises(ValueError, match="walls must start at least 2 m behind"):
        S.SyntheticConfig(wall_depth=(5.0, 9.0))
    with pytest.raises(ValueError, match="non-negative"):
        S.render_frame(SMALL, -1, 0)


# ---------------------------------------------------------------- folder layout writer
def _read_csv(path: Path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_split_indices_start_test_on_a_clip_boundary():
    train, test = split_indices(100, 0.2, 32)
    assert train == list(range(80)) and test == list(range(96, 116))
    train, test = split_indices(10, 0.2, 1)
    assert train == list(range(8)) and test == [8, 9]


def test_write_synthetic_layout_and_csv(tmp_path):
    out = tmp_path / "syn"
    info = write_synthetic(out, n=10, seed=5, image_size=32, test_fraction=0.2, progress=False)
    assert info["n_train"] == 8 and info["n_test"] == 2 and info["written"] == 10
    header, rows = _read_csv(out / "keypoints.csv")
    assert header[:4] == ["frame", "split", "x0", "y0"] and len(header) == 2 + 2 * 16
    assert [r[1] for r in rows] == ["train"] * 8 + ["test"] * 2
    assert [r[0] for r in rows] == [f"f{i:06d}" for i in range(8)] + ["f000032", "f000033"]
    cfg = S.SyntheticConfig(image_size=32)
    for r in rows:
        index = int(r[0][1:])
        f = S.render_frame(cfg, 5, index)
        rgb = cv2.cvtColor(cv2.imread(str(out / "images" / f"{r[0]}.png")), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(rgb, f.rgb)
        depth = np.load(out / "depth" / f"{r[0]}.npy")
        assert depth.dtype == np.float32
        np.testing.assert_array_equal(depth, f.depth)
        cells = np.array([np.nan if c == "" else float(c) for c in r[2:]]).reshape(16, 2)
        np.testing.assert_array_equal(np.isnan(cells[:, 0]), ~f.visible)
        np.testing.assert_allclose(cells[f.visible], f.keypoints[f.visible], atol=5e-4)
    meta = yaml.safe_load((out / "dataset.yaml").read_text())
    assert meta["depth_kind"] == "depth" and meta["depth_scale"] == 1.0
    assert meta["n_joints"] == 16 and meta["image_size"] == 32 and meta["synthetic"]["seed"] == 5
    assert meta["synthetic"]["splits"]["test"] == 2
    assert not list(out.rglob(".*"))  # no marker, no temporary files left


def test_interrupted_write_resumes_to_identical_files(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    write_synthetic(ref, n=8, seed=1, image_size=32, progress=False)

    out = tmp_path / "out"
    real = S.render_frame
    calls = {"n": 0}

    def dying(cfg, seed, index):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        return real(cfg, seed, index)

    monkeypatch.setattr(S, "render_frame", dying)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic(out, n=8, seed=1, image_size=32, progress=False)
    monkeypatch.setattr(S, "render_frame", real)
    assert not (out / "dataset.yaml").exists() and (out / ".synth-in-progress.yaml").exists()
    (out / "images" / ".f000001.png.tmp-12345").write_bytes(b"half a png")  # debris of a killed writer

    info = write_synthetic(out, n=8, seed=1, image_size=32, progress=False)
    assert info["skipped"] == 4 and info["written"] == 4
    for p in sorted(ref.rglob("*")):
        if p.is_file():
            assert (out / p.relative_to(ref)).read_bytes() == p.read_bytes(), p.name
    assert not list(out.rglob(".*"))
    again = write_synthetic(out, n=8, seed=1, image_size=32, progress=False)
    assert again["written"] == 0


def test_several_workers_write_the_same_files(tmp_path, monkeypatch):
    """Rendering on 2 processes (joblib, chunks of 3 frames here) gives byte-identical files, csv row order
    included, to rendering on one."""
    import pipeline.data.synth as W

    ref = tmp_path / "ref"
    write_synthetic(ref, n=12, seed=3, image_size=32, progress=False, workers=1)
    monkeypatch.setattr(W, "CHUNK", 3)
    out = tmp_path / "out"
    info = write_synthetic(out, n=12, seed=3, image_size=32, progress=False, workers=2)
    assert info["written"] == 12 and info["skipped"] == 0
    for p in sorted(ref.rglob("*")):
        if p.is_file():
            assert (out / p.relative_to(ref)).read_bytes() == p.read_bytes(), p.name
    monkeypatch.setattr(W, "CHUNK", 100)
    monkeypatch.setattr(W.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    assert W.default_workers(799) == 1 and W.default_workers(800) == 4  # small datasets: no process start-up


def test_refuses_other_parameters_and_foreign_folders(tmp_path):
    out = tmp_path / "syn"
    write_synthetic(out, n=4, seed=1, image_size=32, test_fraction=0.5, progress=False)
    with pytest.raises(ManifestError, match=r"seed: 1 there, 2 asked"):
        write_synthetic(out, n=4, seed=2, image_size=32, test_fraction=0.5, progress=False)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ManifestError, match="not empty"):
        write_synthetic(foreign, n=4, seed=1, image_size=32, progress=False)
    with pytest.raises(ConfigError, match="n=1"):
        write_synthetic(tmp_path / "x", n=1, seed=1, progress=False)
    with pytest.raises(ConfigError, match="test_fraction"):
        write_synthetic(tmp_path / "x", n=4, seed=1, test_fraction=1.0, progress=False)


def test_synthetic_ground_truth_works_with_the_l2_protocol():
    from dkp_core.metrics import evaluate

    cfg = S.SyntheticConfig(image_size=64)
    train, test = split_indices(200, 0.2, cfg.clip_length)
    rng = np.random.default_rng(0)

    def split(indices):
        kp, vis = zip(*(S.frame_keypoints(cfg, 0, i) for i in indices))
        gt = np.where(np.array(vis)[..., None], np.array(kp), np.nan)  # (N, 16, 2), NaN = missing (CSV's empty cells)
        return gt

    gt_fit, gt_test = split(train), split(test)
    # An oracle detector: the GT of all joints (missing ones replaced by the frame's mean) plus 1 px noise.
    def oracle(gt):
        fill = np.nanmean(gt, axis=1, keepdims=True)
        return np.where(np.isnan(gt), fill, gt) + rng.normal(scale=1.0, size=gt.shape)

    good = evaluate("l2", det_fit=oracle(gt_fit), gt_fit=gt_fit, det_test=oracle(gt_test), gt_test=gt_test,
                    image_size=64)
    bad = evaluate("l2", det_fit=rng.uniform(0, 63, size=(160, 16, 2)), gt_fit=gt_fit,
                   det_test=rng.uniform(0, 63, size=(40, 16, 2)), gt_test=gt_test, image_size=64)
    assert good.value < 4.0  # % of the image side: about 2 px at 64 px for 1 px of detector noise
    assert bad.value > 3 * good.value


def test_run_refuses_data_generated_with_other_synth_settings(tiny_experiment):
    """`run` on a data.root generated with another clip length names the mismatch instead of training on it."""
    import io

    from rich.console import Console

    from pipeline.config import load_config
    from pipeline.errors import ManifestError
    from pipeline.runner import ensure_synthetic_data

    console = Console(file=io.StringIO())
    cfg = load_config(tiny_experiment["yaml"], ["data.synth_clip_length=4"])
    ensure_synthetic_data(cfg, console)
    assert "generating the synthetic dataset" in console.file.getvalue()
    ensure_synthetic_data(cfg, console)  # same settings: nothing to do, no error
    other = load_config(tiny_experiment["yaml"], ["data.synth_clip_length=8"])
    with pytest.raises(ManifestError, match=r"clip_length.*4.*8.*data\.root"):
        ensure_synthetic_data(other, console)
