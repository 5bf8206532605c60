"""Evaluation protocols against hand-built cases whose answer is known in closed form."""
from __future__ import annotations

import numpy as np
import pytest

from dkp_core import metrics as M

S = 128  # image side in pixels for most cases


def _linear_case(rng, n, k, j, *, size=S, intercept=False):
    """Detections in the image and GT that is an exact linear (or affine) function of them."""
    det = rng.uniform(0, size - 1, size=(n, k, 2))
    a = rng.normal(size=(2 * k, 2 * j)) / k
    gt = det.reshape(n, -1) @ a  # (N, 2J)
    if intercept:
        gt = gt + rng.normal(size=(1, 2 * j)) * 10
    return det, gt.reshape(n, j, 2), a


def _identity_case(rng, n, j, size=S):
    """GT == detections (K == J): every protocol's regression is exact."""
    det = rng.uniform(5, size - 6, size=(n, j, 2))
    return det, det.copy()


# ---------------------------------------------------------------- exact fits give a perfect score
@pytest.mark.parametrize("protocol", ["h36m_l2", "normalised_l2", "taichi_mae"])
def test_exact_linear_map_scores_zero(protocol):
    rng = np.random.default_rng(0)
    det, gt, a = _linear_case(rng, 80, 8, 32)
    res = M.evaluate(protocol, det_fit=det[:60], gt_fit=gt[:60], det_test=det[60:], gt_test=gt[60:], image_size=S)
    assert res.value == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(res.pred_test, gt[60:], atol=1e-6)
    assert res.pred_test.shape == (20, 32, 2)


def test_exact_linear_map_deepfashion_is_100_percent():
    rng = np.random.default_rng(1)
    det, gt, _ = _linear_case(rng, 50, 16, 17, size=256)
    res = M.deepfashion_pck(det[:40], gt[:40], det[40:], gt[40:], 256)
    assert res.value == pytest.approx(100.0)
    assert res.higher_is_better


def test_taichi_needs_its_intercept_and_h36m_has_none():
    rng = np.random.default_rng(2)
    det, gt, _ = _linear_case(rng, 80, 8, 18, intercept=True)
    tai = M.taichi_mae(det[:60], gt[:60], det[60:], gt[60:], S)
    assert tai.value == pytest.approx(0.0, abs=1e-6)
    # Without an intercept the constant offset cannot be represented exactly.
    l2 = M.normalised_l2(det[:60], gt[:60], det[60:], gt[60:], S, intercept=False)
    l2i = M.normalised_l2(det[:60], gt[:60], det[60:], gt[60:], S, intercept=True)
    assert l2.value > 1e-3
    assert l2i.value == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- known residuals
def test_normalised_l2_known_two_point_residual():
    rng = np.random.default_rng(3)
    det, gt = _identity_case(rng, 40, 10)
    det_test, gt_test = _identity_case(rng, 2, 10)
    gt_test = gt_test.copy()
    gt_test[0, 3] += (3.0, 4.0)  # one joint 5 px off in sample 0; sample 1 exact
    res = M.normalised_l2(det, gt, det_test, gt_test, S)
    # per-sample mean joint L2: 5/10 px and 0 px; mean over the 2 samples: 0.25 px; / (S - 1) * 100.
    assert res.value == pytest.approx(100 * 0.25 / (S - 1), rel=1e-9)


def test_h36m_known_residual():
    rng = np.random.default_rng(4)
    det, gt = _identity_case(rng, 150, 32)
    det_t, gt_t = _identity_case(rng, 4, 32)
    gt_t = gt_t.copy()
    gt_t[1, 0] += (0.0, 8.0)  # joint 0 is not in any swap pair
    res = M.h36m_l2(det, gt, det_t, gt_t, S)
    assert res.value == pytest.approx(100 * (8.0 / 32) / 4 / (S - 1), rel=1e-9)
    assert res.details["swapped_samples_test"] == 0


def test_taichi_known_mae_is_summed_at_256():
    rng = np.random.default_rng(5)
    det, gt = _identity_case(rng, 40, 18)
    det_t, gt_t = _identity_case(rng, 2, 18)
    gt_t = gt_t.copy()
    gt_t[0, 2, 1] += 4.0  # 4 px at 128 = 8 px at 256, on one of the two test rows -> MAE 4
    gt_t[1, 5, 0] -= 2.0  # 2 px at 128 = 4 px at 256 -> MAE 2 on another coordinate
    res = M.taichi_mae(det, gt, det_t, gt_t, S)
    assert res.value == pytest.approx(6.0, rel=1e-9)
    assert res.details["mae"][2][1] == pytest.approx(4.0)
    assert res.details["mae"][5][0] == pytest.approx(2.0)


# ---------------------------------------------------------------- Taichi missing joints
@pytest.mark.parametrize("missing", [np.nan, -1.0])
def test_taichi_skips_missing_joints(missing):
    rng = np.random.default_rng(6)
    det, gt, _ = _linear_case(rng, 80, 6, 18, intercept=True)
    gt = gt.copy()
    # Missing entries that would wreck the fit and the score if they were used.
    gt[:60][rng.random((60, 18)) < 0.1] = missing
    gt[60:][rng.random((20, 18)) < 0.1] = missing
    gt[60:, 7, :] = missing  # joint 7 missing in every test frame: contributes nothing
    res = M.taichi_mae(det[:60], gt[:60], det[60:], gt[60:], S)
    assert res.value == pytest.approx(0.0, abs=1e-6)
    assert res.details["n_coordinates_scored"] == 34
    assert res.details["mae"][7] == [None, None]
    assert np.isnan(res.gt_test[:, 7]).all()


def test_taichi_missing_in_all_fit_frames_is_a_clear_error():
    rng = np.random.default_rng(7)
    det, gt = _identity_case(rng, 20, 18)
    gt = gt.copy()
    gt[:, 4, 0] = np.nan
    with pytest.raises(ValueError, match="joint 4 coordinate x is missing in all 20 fit frames"):
        M.taichi_mae(det, gt, det, gt, S)


# ---------------------------------------------------------------- DeepFashion threshold
@pytest.mark.parametrize("offset,hit", [(6 - 1e-6, True), (6 + 1e-6, False)])
def test_deepfashion_pck_threshold_boundary(offset, hit):
    rng = np.random.default_rng(8)
    det, gt = _identity_case(rng, 40, 17, size=256)
    det_t, gt_t = _identity_case(rng, 1, 17, size=256)
    gt_t = gt_t.copy()
    gt_t[0, 0] += (0.0, offset)  # strictly below 6 px counts
    res = M.deepfashion_pck(det, gt, det_t, gt_t, 256)
    assert res.value == pytest.approx(100.0 * (16 + hit) / 17)


@pytest.mark.parametrize("offset,hit", [(5.99, True), (6.01, False)])
def test_deepfashion_pck_is_judged_at_256_px_when_gt_was_resized_to_128(offset, hit):
    """The eval stage maps 256 px annotations into the 128 px model frame with the pixel-centre rule
    (pipeline.data.images.square_transform); the protocol must map them back and apply 6 px at 256."""
    rng = np.random.default_rng(8)
    det = rng.uniform(5, 122, size=(41, 17, 2))  # detections in the 128 px frame
    gt256 = det / 127 * 255  # exactly linear in AutoLink's features, no intercept needed
    gt256[40, 0] += (0.0, offset)
    gt128 = (gt256 + 0.5) * 0.5 - 0.5  # what pipeline.stages.eval.run passes
    res = M.deepfashion_pck(det[:40], gt128[:40], det[40:], gt128[40:], 128)
    assert res.value == pytest.approx(100.0 * (16 + hit) / 17)
    np.testing.assert_allclose(res.pred_test[0, 1:], gt128[40, 1:], atol=1e-6)


# ---------------------------------------------------------------- H36M swap rule and pruning
def test_autolink_permutation_keeps_the_21_28_typo():
    perm = M._swap_permutation(32, M.H36M_AUTOLINK_SWAP_PAIRS)
    assert perm[20] == 28 and perm[21] == 28 and perm[28] == 21 and perm[29] == 29
    assert perm[1] == 6 and perm[6] == 1 and perm[0] == 0
    fixed = M._swap_permutation(32, M.H36M_CORRECTED_SWAP_PAIRS)
    assert (fixed[fixed] == np.arange(32)).all()  # the corrected one is an involution


def _mirrored(gt, pairs):
    return gt[:, M._swap_permutation(gt.shape[1], pairs)]


@pytest.mark.parametrize("n_swapped,expect_swap", [(10, False), (11, True)])
def test_h36m_test_swap_needs_more_than_10_samples(n_swapped, expect_swap):
    rng = np.random.default_rng(9)
    det, gt = _identity_case(rng, 150, 32)
    det_t, gt_t = _identity_case(rng, 30, 32)
    pairs = M.H36M_CORRECTED_SWAP_PAIRS
    gt_t = gt_t.copy()
    gt_t[:n_swapped] = _mirrored(gt_t[:n_swapped], pairs)  # GT annotated with left/right exchanged
    res = M.h36m_l2(det, gt, det_t, gt_t, S, swap_pairs=pairs)
    plain = M.normalised_l2(det, gt, det_t, gt_t, S)
    if expect_swap:
        assert res.value == pytest.approx(0.0, abs=1e-6)
        assert res.details["swapped_samples_test"] == n_swapped
        assert plain.value > 1.0
    else:
        # No swap: the AutoLink score equals the plain normalised L2.
        assert res.details["swapped_samples_test"] == 0
        assert res.value == pytest.approx(plain.value, rel=1e-9)
        assert res.value > 1.0


def test_h36m_fit_swaps_mislabelled_fit_samples():
    rng = np.random.default_rng(10)
    det, gt = _identity_case(rng, 200, 32)
    det_t, gt_t = _identity_case(rng, 10, 32)
    pairs = M.H36M_CORRECTED_SWAP_PAIRS
    gt = gt.copy()
    gt[:25] = _mirrored(gt[:25], pairs)  # 25 fit samples mislabelled
    res = M.h36m_l2(det, gt, det_t, gt_t, S, swap_pairs=pairs)
    plain = M.normalised_l2(det, gt, det_t, gt_t, S)
    assert res.details["swapped_samples_fit"] >= 25
    assert res.value == pytest.approx(0.0, abs=1e-6)
    assert plain.value > 0.5  # the unswapped fit is corrupted


def test_h36m_three_sigma_pruning_removes_an_outlier():
    rng = np.random.default_rng(11)
    det, gt = _identity_case(rng, 150, 32)
    det_t, gt_t = _identity_case(rng, 10, 32)
    gt = gt.copy()
    gt[7, 0] += (0.0, 3000.0)  # one wildly wrong annotation on a non-swapped joint
    res = M.h36m_l2(det, gt, det_t, gt_t, S)
    plain = M.normalised_l2(det, gt, det_t, gt_t, S)
    assert res.details["n_fit_kept"] == 149
    assert res.value == pytest.approx(0.0, abs=1e-6)
    assert plain.value > 1e-2


def test_normalised_l2_flip_pairs_is_orientation_invariant():
    rng = np.random.default_rng(12)
    pairs = [(1, 2), (3, 4)]
    det, gt = _identity_case(rng, 50, 6)
    det_t, gt_t = _identity_case(rng, 5, 6)
    gt = gt.copy()
    gt[:10] = _mirrored(gt[:10], pairs)
    gt_t = gt_t.copy()
    gt_t[:2] = _mirrored(gt_t[:2], pairs)
    res = M.normalised_l2(det, gt, det_t, gt_t, S, flip_pairs=pairs)
    assert res.value == pytest.approx(0.0, abs=1e-6)
    assert M.normalised_l2(det, gt, det_t, gt_t, S).value > 0.5
    with pytest.raises(ValueError, match="disjoint"):
        M.normalised_l2(det, gt, det_t, gt_t, S, flip_pairs=[(1, 2), (2, 3)])


# ---------------------------------------------------------------- conventions and determinism
@pytest.mark.parametrize("protocol", ["h36m_l2", "taichi_mae", "deepfashion_pck", "normalised_l2"])
def test_value_does_not_depend_on_xy_order_and_is_deterministic(protocol):
    rng = np.random.default_rng(13)
    det = rng.uniform(0, S - 1, size=(70, 8, 2))
    gt = det[:, rng.integers(0, 8, size=32)] + rng.normal(scale=3.0, size=(70, 32, 2))  # noisy, non-exact
    if protocol == "taichi_mae":
        gt[rng.random((70, 32)) < 0.05] = np.nan
    args = dict(det_fit=det[:50], gt_fit=gt[:50], det_test=det[50:], gt_test=gt[50:], image_size=S)
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    a = M.evaluate(protocol, **args)
    b = M.evaluate(protocol, **args)
    yx = {k: (v[..., ::-1] if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    c = M.evaluate(protocol, **yx)
    assert a.value == b.value
    np.testing.assert_array_equal(a.pred_test, b.pred_test)
    assert a.value == pytest.approx(c.value, rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(a.pred_test, c.pred_test[..., ::-1], atol=1e-8)
    assert a.value > 0
    for k, v in before.items():  # inputs untouched
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(args[k], v)
    d = a.to_dict()
    assert d["protocol"] == protocol and isinstance(d["value"], float) and "pred_test" not in d


def test_aliases_match_config_names():
    rng = np.random.default_rng(14)
    det, gt = _identity_case(rng, 30, 32)
    for alias, name in M.PROTOCOL_ALIASES.items():
        res = M.evaluate(alias, det_fit=det, gt_fit=gt, det_test=det, gt_test=gt, image_size=S)
        assert res.protocol == name


# ---------------------------------------------------------------- errors
def test_unknown_protocol_lists_valid_names():
    with pytest.raises(ValueError) as e:
        M.evaluate("pck", det_fit=np.zeros((1, 1, 2)), gt_fit=np.zeros((1, 1, 2)),
                   det_test=np.zeros((1, 1, 2)), gt_test=np.zeros((1, 1, 2)), image_size=S)
    for name in ["h36m_l2", "taichi_mae", "deepfashion_pck", "normalised_l2", "l2"]:
        assert name in str(e.value)


def test_shape_errors_name_the_array():
    rng = np.random.default_rng(15)
    det, gt = _identity_case(rng, 10, 32)
    with pytest.raises(ValueError, match=r"det_fit: expected shape \(N, K, 2\).*\(10, 64\)"):
        M.normalised_l2(det.reshape(10, 64), gt, det, gt, S)
    with pytest.raises(ValueError, match="det_test has 9 frames but gt_test has 10"):
        M.normalised_l2(det, gt, det[:9], gt, S)
    with pytest.raises(ValueError, match="K=32 keypoints but det_test has K=31"):
        M.normalised_l2(det, gt, det[:, :31], gt, S)
    with pytest.raises(ValueError, match="image_size must be an integer"):
        M.normalised_l2(det, gt, det, gt, 0)
    with pytest.raises(ValueError, match="det_fit: 1 keypoints are NaN"):
        bad = det.copy()
        bad[0, 0, 0] = np.nan
        M.normalised_l2(bad, gt, det, gt, S)
    with pytest.raises(ValueError, match="J=17; use the 'normalised_l2' protocol"):
        M.h36m_l2(det, gt[:, :17], det, gt[:, :17], S)
    with pytest.raises(ValueError, match="contains NaN"):
        g = gt.copy()
        g[0, 0] = np.nan
        M.h36m_l2(det, g, det, gt, S)


# ---------------------------------------------------------------- the mean-pose floor
def test_floor_is_the_fit_mean_pose_scored_by_hand():
    # size 11: normalised by 10 px. Fit mean of joint 0 = (4, 2); test errors 3 px and 5 px -> 30 % and 50 %.
    gt_fit = np.array([[[0.0, 0.0]], [[4.0, 0.0]], [[8.0, 6.0]]])
    gt_test = np.array([[[4.0, 5.0]], [[7.0, 6.0]]])
    r = M.mean_pose_floor("l2", gt_fit=gt_fit, gt_test=gt_test, image_size=11)
    assert r.value == pytest.approx(40.0)
    np.testing.assert_allclose(r.pred_test, [[[4.0, 2.0]], [[4.0, 2.0]]], atol=1e-9)


def test_floor_goes_through_left_right_matching_by_hand():
    # Two fit frames with joint 0 left (x=2) and joint 1 right (x=8), one mirrored. The plain mean is
    # (4, 0) / (6, 0); the mirrored frame is then closer to its swapped GT (2 px vs 4 px), is flipped, and
    # the refit mean is (2, 0) / (8, 0). The test frame is mirrored too: scored against its swap, 3 px off.
    gt_fit = np.array([[[2.0, 0.0], [8.0, 0.0]], [[2.0, 0.0], [8.0, 0.0]], [[8.0, 0.0], [2.0, 0.0]]])
    gt_test = np.array([[[8.0, 3.0], [2.0, 3.0]]])
    r = M.mean_pose_floor("l2", gt_fit=gt_fit, gt_test=gt_test, image_size=11, flip_pairs=[(0, 1)])
    assert r.value == pytest.approx(30.0)
    assert r.details["flip_rounds_fit"] == 1
    plain = M.mean_pose_floor("l2", gt_fit=gt_fit, gt_test=gt_test, image_size=11)
    # unmatched: mean (4, 0) / (6, 0) against (8, 3) / (2, 3): 5 px each
    assert plain.value == pytest.approx(50.0)


def test_floor_for_taichi_and_deepfashion_by_hand():
    # At 256 px the papers' report frame is the model frame, so the numbers are plain pixel errors.
    rng = np.random.default_rng(3)
    gt_fit = rng.uniform(20, 230, size=(40, 3, 2))
    gt_fit[5, 1, 0] = np.nan  # a missing coordinate is left out of the mean
    gt_test = rng.uniform(20, 230, size=(10, 3, 2))
    mean = np.nanmean(gt_fit, axis=0)  # (3, 2)
    taichi = M.mean_pose_floor("taichi", gt_fit=gt_fit, gt_test=gt_test, image_size=256)
    assert taichi.value == pytest.approx(np.abs(gt_test - mean).mean(axis=0).sum(), rel=1e-9)
    df = M.mean_pose_floor("deepfashion", gt_fit=gt_fit, gt_test=gt_test, image_size=256)
    assert df.value == pytest.approx(100.0 * (np.linalg.norm(gt_test - mean, axis=2) < 6.0).mean())


def test_floor_h36m_runs_the_protocol_on_the_mean_pose():
    rng = np.random.default_rng(4)
    base = rng.uniform(30, 90, size=(1, 32, 2))
    gt_fit = base + rng.normal(scale=1.0, size=(50, 32, 2))
    gt_test = base + rng.normal(scale=1.0, size=(20, 32, 2))
    r = M.mean_pose_floor("h36m", gt_fit=gt_fit, gt_test=gt_test, image_size=128)
    # By hand: the first fit is the mean pose; no frame prefers its left/right swap (tiny noise); the
    # 3-sigma rule drops frames whose mean joint error to it is >= mean + 3 sd; the refit is the mean of the rest.
    y = gt_fit / 127.0
    dist = np.linalg.norm(y - y.mean(axis=0), axis=2).mean(axis=1)
    keep = dist < dist.mean() + 3.0 * dist.std(ddof=1)
    mean = y[keep].mean(axis=0)
    want = 100.0 * np.linalg.norm(gt_test / 127.0 - mean, axis=2).mean()
    assert r.details["swap_rounds_fit"] == r.details["swap_rounds_test"] == 0
    assert r.details["n_fit_kept"] == int(keep.sum())
    assert r.value == pytest.approx(want, rel=1e-9)
