"""The second scene family (``puppets``, dkp_core/synthetic_puppets.py) and what must not move for the first one.

The first family's frames are pinned by content here (the datasets, and so the artifact keys, of every user of the
synthetic preset hang on them); the second must be a different scene of the same kind: its own joints, pairs and
random streams, colour as ambiguous, depth as clear."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import yaml

from dkp_core import synthetic as S
from dkp_core import synthetic_puppets as P
from pipeline.errors import ConfigError, ManifestError
from pipeline.data.synth import write_synthetic

PUP = S.SyntheticConfig(image_size=64, clip_length=1, family="puppets")


def _digest(cfg, seed, indices) -> str:
    h = hashlib.sha256()
    for i in indices:
        f = S.render_frame(cfg, seed, i)
        for a in (f.rgb, f.depth, f.keypoints, f.visible, f.occluded, f.mask):
            h.update(np.ascontiguousarray(a).tobytes())
        kp, v = S.frame_keypoints(cfg, seed, i)
        h.update(kp.tobytes())
        h.update(v.tobytes())
    return h.hexdigest()


def test_the_first_family_draws_what_it_drew_before_the_second_existed():
    """Literal digests of the ``figures`` frames, computed by the code before issue 27 (commit 0da2193). If this
    fails after a numpy or OpenCV upgrade, the generator's output changed: bump GENERATOR_VERSION (synth.py)."""
    assert _digest(S.SyntheticConfig(image_size=64, clip_length=1), 0, range(6)) == \
        "1a799d15b3003262888a390c6658343df8b031b31b964bffbf26f58d3e37c919"
    assert _digest(S.SyntheticConfig(image_size=48, image_width=80, n_joints=20, clip_length=4), 3, range(9)) == \
        "831ffb77a423fe6614519b1be675dd478d3cd088c8087db15c4bf3c004261f26"
    assert S.SyntheticConfig().n_joints == 16 and S.SyntheticConfig().family == "figures"


def test_first_family_datasets_keep_their_parameters(tmp_path):
    """dataset.yaml of a ``figures`` dataset names no family: its parameters (hashed into teach's and eval's keys)
    are byte for byte those written before the family field existed."""
    write_synthetic(tmp_path / "a", n=4, seed=0, image_size=32, progress=False)
    params = yaml.safe_load((tmp_path / "a" / "dataset.yaml").read_text())["synthetic"]["parameters"]
    assert "family" not in params["config"] and params["config"]["n_joints"] == 16
    write_synthetic(tmp_path / "b", n=4, seed=0, image_size=32, progress=False, family="puppets")
    meta = yaml.safe_load((tmp_path / "b" / "dataset.yaml").read_text())
    assert meta["synthetic"]["parameters"]["config"]["family"] == "puppets"
    assert meta["n_joints"] == 15 and meta["synthetic"]["joint_names"] == list(P.JOINT_NAMES)
    assert meta["synthetic"]["left_right_pairs"] == [list(p) for p in P._LEFT_RIGHT_PAIRS]
    with pytest.raises(ManifestError, match=r"config.family: None there, .puppets. asked"):
        write_synthetic(tmp_path / "a", n=4, seed=0, image_size=32, progress=False, family="puppets")
    with pytest.raises(ConfigError, match="unknown synthetic scene family 'robots'"):
        write_synthetic(tmp_path / "c", n=4, seed=0, image_size=32, progress=False, family="robots")


def test_puppets_are_a_pure_function_of_seed_and_index():
    a, b = S.render_frame(PUP, 3, 17), S.render_frame(PUP, 3, 17)
    for x, y in ((a.rgb, b.rgb), (a.depth, b.depth), (a.keypoints, b.keypoints), (a.mask, b.mask)):
        np.testing.assert_array_equal(x, y)
    S.render_frame(PUP, 99, 1)  # no hidden state
    np.testing.assert_array_equal(S.render_frame(PUP, 3, 17).rgb, a.rgb)
    assert not np.array_equal(S.render_frame(PUP, 3, 18).rgb, a.rgb)
    kp, vis = S.frame_keypoints(PUP, 3, 17)
    np.testing.assert_array_equal(kp, a.keypoints)
    np.testing.assert_array_equal(vis, a.visible)
    # the family's own random streams: the same seed and index draw an unrelated figure in the other family
    fig = S.render_frame(S.SyntheticConfig(image_size=64, clip_length=1), 3, 17)
    assert a.keypoints.shape == (15, 2) and fig.keypoints.shape == (16, 2)


def test_puppets_skeleton_pairs_are_mirror_names_and_differ_from_the_first_family():
    names = S.joint_names(15, "puppets")
    assert len(names) == 15 and len(set(names)) == 15
    pairs = S.left_right_pairs(15, "puppets")
    assert pairs == P._LEFT_RIGHT_PAIRS
    for left, right in pairs:
        assert names[left].startswith("l_") and names[right] == "r_" + names[left][2:]
    assert set(names) != set(S.joint_names(16))  # another joint set, not a renaming
    with pytest.raises(ValueError, match="not a synthetic skeleton"):
        S.SyntheticConfig(family="puppets", n_joints=16)


def test_puppets_frames_shapes_and_nonsquare():
    cfg = S.SyntheticConfig(image_size=48, image_width=72, clip_length=4, family="puppets")
    f = S.render_frame(cfg, 0, 5)
    assert f.rgb.shape == (48, 72, 3) and f.rgb.dtype == np.uint8
    assert f.depth.shape == (48, 72) and f.depth.dtype == np.float32
    assert f.keypoints.shape == (15, 2) and f.visible.shape == (15,) and f.mask.any()
    assert f.palette.shape == (5, 3)
    # a visible keypoint's x is within the width, which is not the height
    assert (f.keypoints[f.visible, 0] <= 71).all() and (f.keypoints[f.visible, 1] <= 47).all()


def test_puppets_depth_separates_the_figure_colour_does_not():
    gaps, near, near_without = [], [], []
    for i in range(0, 320, 16):
        f = S.render_frame(PUP, 0, i)
        gaps.append(f.depth[~f.mask].min() - f.depth[f.mask].max())
    assert min(gaps) > 0.5  # every figure pixel at least half a metre nearer than every pillar and wall pixel

    def near_twins(cfg):
        """Share of figure pixels whose colour is within 3 levels (per channel) of a background pixel's."""
        hit = total = 0
        for i in range(0, 320, 32):
            f = S.render_frame(cfg, 0, i)
            fig = f.rgb[f.mask].astype(int)
            bg = np.unique(f.rgb[~f.mask].astype(int), axis=0)
            d = np.abs(fig[:, None, :] - bg[None, :, :]).max(-1).min(1)
            hit += int((d <= 3).sum())
            total += len(fig)
        return hit / total

    # two lights make the figure's colours a 2-D family per body part, so exact 8-bit twins are rarer than in the
    # first family; within the sensor noise (sd 2 levels) most figure pixels have a twin on the distractors
    with_distractors = near_twins(S.SyntheticConfig(image_size=64, noise_std=0.0, family="puppets"))
    without = near_twins(S.SyntheticConfig(image_size=64, noise_std=0.0, distractor_fraction=0.0, family="puppets"))
    assert with_distractors > 0.5 and without < with_distractors / 4


def test_run_refuses_data_of_the_other_family(tmp_path):
    """`run` finds data at data.root written for the other family and says so, naming the difference."""
    from pipeline.config import load_config
    from pipeline.runner import ensure_synthetic_data
    from tests.conftest import quiet_console

    root = tmp_path / "data"
    write_synthetic(root, n=8, seed=0, image_size=32, clip_length=1, progress=False)
    cfg = load_config("synthetic-puppets", [f"data.root={root}", "data.synth_frames=8", "data.synth_image_size=32"])
    with pytest.raises(ManifestError, match=r"config.family: None there, .puppets. asked.*config.n_joints: 16 there, 15 asked.*data.synth_"):
        ensure_synthetic_data(cfg, quiet_console())


def test_puppets_preset_is_the_synthetic_recipe_on_other_data():
    from pipeline.config import load_config

    a, b = load_config("synthetic"), load_config("synthetic-puppets")
    assert b.data.synth_family == "puppets" and b.data.root != a.data.root
    assert (a.depth, a.teach, a.distill, a.eval) == (b.depth, b.teach, b.distill, b.eval)
    with pytest.raises(ConfigError, match="data.synth_family"):
        load_config("synthetic", ["data.synth_family=robots"])
