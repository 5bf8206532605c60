"""Keypoint evaluation protocols: linear regression from detected keypoints to ground truth.

Unsupervised keypoints carry no semantic labels, so every protocol fits a linear map from the
detected keypoints of a *fit* split to the annotated joints and scores the map on a *test* split.
The three paper protocols reproduce AutoLink's evaluation code (research/paper_autolink.md §3),
including its quirks, so numbers are comparable with the published ones:

- ``h36m_l2``: OLS without intercept; iterative left/right GT swap (the "> 10 samples" rule);
  3-sigma pruning of the fit and a refit. Value: mean L2 / image size x 100 (lower is better).
- ``taichi_mae``: OLS with intercept per GT coordinate, missing GT skipped. Value: the SUM of the 2J
  per-coordinate MAEs in pixels at 256 (lower is better).
- ``deepfashion_pck``: OLS without intercept. Value: % of test joints closer than 6 px at 256
  (higher is better).
- ``normalised_l2``: OLS (intercept optional), no swap quirk or pruning, NaN GT skipped, optional
  clean left/right matching. Value: mean L2 / image size x 100 (lower is better).

Inputs (every protocol): ``det_fit`` (N_fit, K, 2) and ``det_test`` (N_test, K, 2) detected keypoints,
``gt_fit`` (N_fit, J, 2) and ``gt_test`` (N_test, J, 2) ground truth, all in **pixels (x, y)** of the same
square ``image_size`` x ``image_size`` frame (docs/conventions.md); missing GT joints are NaN.
``image_size`` is the side of that frame. The eval stage uses the model frame (detections
``x = (u + 1) / 2 * (image_size - 1)``, GT mapped in with the pixel-centre rule of
pipeline.data.images.square_transform). Taichi and DeepFashion are scored at 256 px: GT and predictions are
mapped to 256 with the same pixel-centre rule (``x' + 0.5 = (x + 0.5) * 256 / image_size``), which undoes
the eval stage's mapping exactly. "Normalised by image size" means divided by ``image_size - 1``, the
span between the first and last pixel centres that AutoLink's [0, 1] Human3.6M landmarks cover
(pipeline/data/layouts/ reads them so); H36M numbers are AutoLink-exact in the 128 px annotation frame.

Why the numbers do not depend on our (x, y) order, although AutoLink works in (row, col): a
permutation of the regression's input columns permutes the coefficients and leaves the
predictions unchanged; the L2 distance and the per-coordinate MAE sum are symmetric in the two
components; and the H36M swap rule permutes *joints* (GT joint order), never components.
Detections are rescaled to AutoLink's feature units (``u * 0.5 + 0.5`` for H36M, times 255 for Taichi
and DeepFashion, i.e. ``x / (image_size - 1)``) so that even the ill-conditioned corner cases match.

Solver: ``np.linalg.lstsq`` in float64. Where AutoLink inverts ``X^T X`` (float32) and falls back to
a ridge term when the inversion fails, lstsq returns the minimum-norm least-squares solution;
the two agree whenever ``X`` has full column rank, which is the case for real detections.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

# AutoLink's H36M left/right correspondences (GT joint indices, 32-joint H36M order), applied in
# sequence to build one permutation. The duplicated 28 in (20, 28), (21, 28) looks like a typo for
# (21, 29); it is kept because the published numbers were computed with it: the permutation maps
# 20 -> 28, 21 -> 28, 28 -> 21 and leaves 29 alone.
H36M_AUTOLINK_SWAP_PAIRS: tuple[tuple[int, int], ...] = (
    (1, 6), (2, 7), (3, 8), (4, 9), (5, 10), (17, 25), (18, 26), (19, 27), (20, 28), (21, 28),
    (22, 30), (23, 31),
)
# The evident intent, for users who want a clean orientation-invariant H36M number (not comparable
# with published tables).
H36M_CORRECTED_SWAP_PAIRS: tuple[tuple[int, int], ...] = (
    (1, 6), (2, 7), (3, 8), (4, 9), (5, 10), (17, 25), (18, 26), (19, 27), (20, 28), (21, 29),
    (22, 30), (23, 31),
)
H36M_N_JOINTS = 32
# AutoLink swaps only when *more than* this many samples prefer the swapped GT.
H36M_SWAP_MIN_SAMPLES = 10
# Taichi and DeepFashion are annotated and scored at 256 x 256.
PAPER_REPORT_SIZE = 256
# AutoLink's detections are scaled by 255 (not 256) for Taichi/DeepFashion: ``(u * 0.5 + 0.5) * 255``.
_AUTOLINK_FEATURE_SCALE = 255.0


@dataclass(frozen=True)
class EvalResult:
    """What a protocol returns.

    ``value`` is the headline number in ``unit``; ``pred_test`` (N_test, J, 2) are the regressed test
    keypoints and ``gt_test`` (N_test, J, 2) the ground truth as scored (after the H36M swaps), both in
    pixels (x, y) of the ``image_size`` frame, NaN where the GT is missing; ``details`` holds small
    JSON-ready numbers (sample counts, fit error, per-coordinate MAEs...).
    """

    protocol: str
    value: float
    unit: str
    higher_is_better: bool
    pred_test: np.ndarray = field(repr=False)
    gt_test: np.ndarray = field(repr=False)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays), for metrics.json."""
        return {
            "protocol": self.protocol,
            "value": float(self.value),
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "details": dict(self.details),
        }


# ----------------------------------------------------------------------------------------------
# Input checks and shared helpers
# ----------------------------------------------------------------------------------------------
def _as_points(name: str, arr: Any, *, allow_nan: bool) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim != 3 or a.shape[2] != 2:
        raise ValueError(
            f"{name}: expected shape (N, K, 2) of pixel (x, y) keypoints, got {a.shape}; "
            f"batch per split, one row of (x, y) per keypoint"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: empty array of shape {a.shape}; each split needs at least one frame")
    if not allow_nan and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).any(axis=2).sum())
        raise ValueError(f"{name}: {bad} keypoints are NaN/Inf; detections must all be finite")
    if allow_nan and np.isinf(a).any():
        raise ValueError(f"{name}: contains Inf; mark missing ground-truth joints with NaN")
    return a


def _check_inputs(
    det_fit: Any, gt_fit: Any, det_test: Any, gt_test: Any, image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    df = _as_points("det_fit", det_fit, allow_nan=False)
    dt = _as_points("det_test", det_test, allow_nan=False)
    gf = _as_points("gt_fit", gt_fit, allow_nan=True)
    gt = _as_points("gt_test", gt_test, allow_nan=True)
    if df.shape[0] != gf.shape[0]:
        raise ValueError(f"det_fit has {df.shape[0]} frames but gt_fit has {gf.shape[0]}; they must be aligned row by row")
    if dt.shape[0] != gt.shape[0]:
        raise ValueError(f"det_test has {dt.shape[0]} frames but gt_test has {gt.shape[0]}; they must be aligned row by row")
    if df.shape[1] != dt.shape[1]:
        raise ValueError(f"det_fit has K={df.shape[1]} keypoints but det_test has K={dt.shape[1]}; use the same detector")
    if gf.shape[1] != gt.shape[1]:
        raise ValueError(f"gt_fit has J={gf.shape[1]} joints but gt_test has J={gt.shape[1]}; use the same annotation")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 2:
        raise ValueError(f"image_size must be an integer >= 2 (side of the square frame in pixels), got {image_size!r}")
    return df, gf, dt, gt, int(image_size)


def _flat(points: np.ndarray) -> np.ndarray:
    return points.reshape(points.shape[0], -1)  # (N, K, 2) -> (N, 2K)


def _with_intercept(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)  # (N, F) -> (N, F + 1)


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(x, y, rcond=None)[0]


def _fit_columns(x: np.ndarray, y: np.ndarray, *, what: str) -> np.ndarray:
    """OLS of every column of ``y`` (N, M) on ``x`` (N, F); rows where a column is NaN are left out
    of that column's fit. Returns beta (F, M)."""
    missing = np.isnan(y)
    if not missing.any():
        return _lstsq(x, y)
    beta = np.empty((x.shape[1], y.shape[1]))
    for m in range(y.shape[1]):
        ok = ~missing[:, m]
        if not ok.any():
            raise ValueError(
                f"{what}: GT column {m} (joint {m // 2}, {'xy'[m % 2]}) is missing in every fit frame; "
                f"drop that joint or add annotated frames to the fit split"
            )
        beta[:, m] = _lstsq(x[ok], y[ok, m])
    return beta


def _to_report(points: np.ndarray, size: int, report_size: int) -> np.ndarray:
    """Pixels of the ``size`` frame -> pixels of the ``report_size`` frame, mapping pixel centres
    (x' + 0.5 = (x + 0.5) * ratio, as cv2.resize and pipeline.data.images.square_transform do), so GT that
    the pipeline resized from a 256 px annotation comes back exactly."""
    return (points + 0.5) * (report_size / size) - 0.5


def _from_report(points: np.ndarray, size: int, report_size: int) -> np.ndarray:
    return (points + 0.5) * (size / report_size) - 0.5


def _per_sample_l2(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Mean over joints of the L2 distance, per sample: (N, J, 2) x2 -> (N,); NaN joints skipped,
    NaN for a sample without any annotated joint."""
    d = np.linalg.norm(pred - gt, axis=2)  # (N, J), NaN where GT missing
    valid = ~np.isnan(d)
    n_valid = valid.sum(axis=1)
    total = np.where(valid, d, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_valid > 0, total / np.maximum(n_valid, 1), np.nan)


def _swap_permutation(n_joints: int, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    perm = list(range(n_joints))
    for a, b in pairs:
        if not (0 <= a < n_joints and 0 <= b < n_joints):
            raise ValueError(f"left/right pair ({a}, {b}) is outside the {n_joints} GT joints")
        # Sequential assignment, exactly like AutoLink: later pairs overwrite earlier ones.
        perm[a] = b
        perm[b] = a
    return np.asarray(perm)


# ----------------------------------------------------------------------------------------------
# Human3.6M (AutoLink datasets/h36m.py: regress_kp + test_epoch_end)
# ----------------------------------------------------------------------------------------------
def h36m_l2(
    det_fit: Any,
    gt_fit: Any,
    det_test: Any,
    gt_test: Any,
    image_size: int,
    *,
    swap_pairs: Sequence[tuple[int, int]] = H36M_AUTOLINK_SWAP_PAIRS,
    max_swap_rounds: int = 1000,
) -> EvalResult:
    """AutoLink's Human3.6M protocol: error normalised by image size, x 100 (lower is better).

    Fit (on the fit split, AutoLink's TrainRegSet = the training frames): OLS without intercept from
    the 2K detected coordinates to the 64 GT coordinates; while more than 10 fit samples are closer
    (mean joint L2) to their left/right-swapped GT, swap those samples' GT and refit. Then drop the
    samples whose error is >= mean + 3 * std (unbiased std, as torch) and refit on the rest.
    Test: predict with that beta; while more than 10 test samples are closer to their swapped GT,
    swap them; the score is the mean over samples of the mean joint L2 computed in the last round
    (AutoLink's loop computes the distance before it decides to stop, so the last <= 10 preferred
    swaps are *not* applied). GT must be the 32 H36M joints in H36M order, without NaN.

    ``swap_pairs`` defaults to AutoLink's list including its (21, 28) typo; pass
    :data:`H36M_CORRECTED_SWAP_PAIRS` for the intended one. ``max_swap_rounds`` only guards against a
    loop that AutoLink would run forever (never observed); hitting it is recorded in ``details``.

    Returns an :class:`EvalResult`: value = 100 * mean L2 / (image_size - 1) (percent of the image
    side, measured between the first and last pixel centres as AutoLink's [0, 1] landmarks are),
    pred_test / gt_test (N_test, 32, 2) pixels (x, y), gt_test after the test-time swaps.
    """
    df, gf, dt, gt, size = _check_inputs(det_fit, gt_fit, det_test, gt_test, image_size)
    n_joints = gf.shape[1]
    if n_joints != H36M_N_JOINTS:
        raise ValueError(
            f"h36m_l2 needs the {H36M_N_JOINTS} Human3.6M joints in H36M order (its swap rule indexes them), "
            f"got J={n_joints}; use the 'normalised_l2' protocol for other skeletons"
        )
    if np.isnan(gf).any() or np.isnan(gt).any():
        raise ValueError("h36m_l2: ground truth contains NaN; Human3.6M annotates every joint, check the GT reader")
    if df.shape[0] < 2:
        raise ValueError(f"h36m_l2: the fit split has {df.shape[0]} frame; the 3-sigma pruning needs at least 2")
    perm = _swap_permutation(n_joints, swap_pairs)

    # AutoLink units: detections u*0.5+0.5 = x/(S-1) in [0, 1]; GT landmarks in [0, 1] with 0 and 1 at
    # the first and last pixel centres, i.e. pixels / (S-1) -- the inverse of the manifest's H36M reader.
    x_fit = _flat(df) / (size - 1)  # (N_fit, 2K)
    y_fit = gf / (size - 1)  # (N_fit, 32, 2)
    rounds_fit, swapped_fit = 0, 0
    while True:
        beta = _lstsq(x_fit, _flat(y_fit))  # (2K, 64)
        pred = (x_fit @ beta).reshape(y_fit.shape)  # (N_fit, 32, 2)
        dist = _per_sample_l2(pred, y_fit)
        y_swapped = y_fit[:, perm]
        should = dist > _per_sample_l2(pred, y_swapped)
        if should.sum() > H36M_SWAP_MIN_SAMPLES and rounds_fit < max_swap_rounds:
            y_fit = np.where(should[:, None, None], y_swapped, y_fit)
            rounds_fit += 1
            swapped_fit += int(should.sum())
        else:
            break
    # 3-sigma pruning uses torch's default unbiased std (ddof=1).
    keep = dist < dist.mean() + 3.0 * dist.std(ddof=1)
    beta = _lstsq(x_fit[keep], _flat(y_fit[keep]))
    fit_err = _per_sample_l2((x_fit[keep] @ beta).reshape(y_fit[keep].shape), y_fit[keep]).mean()

    x_test = _flat(dt) / (size - 1)
    y_test = gt / (size - 1)
    pred_test = (x_test @ beta).reshape(y_test.shape)  # (N_test, 32, 2)
    rounds_test, swapped_test = 0, 0
    while True:
        dist_test = _per_sample_l2(pred_test, y_test)
        y_swapped = y_test[:, perm]
        should = dist_test > _per_sample_l2(pred_test, y_swapped)
        if should.sum() > H36M_SWAP_MIN_SAMPLES and rounds_test < max_swap_rounds:
            y_test = np.where(should[:, None, None], y_swapped, y_test)
            rounds_test += 1
            swapped_test += int(should.sum())
        else:
            break
    value = 100.0 * float(dist_test.mean())
    return EvalResult(
        protocol="h36m_l2",
        value=value,
        unit="% of image size (mean L2)",
        higher_is_better=False,
        pred_test=pred_test * (size - 1),
        gt_test=y_test * (size - 1),
        details={
            "n_fit": int(df.shape[0]),
            "n_fit_kept": int(keep.sum()),
            "n_test": int(dt.shape[0]),
            "fit_error": 100.0 * float(fit_err),
            "swap_rounds_fit": rounds_fit,
            "swapped_samples_fit": swapped_fit,
            "swap_rounds_test": rounds_test,
            "swapped_samples_test": swapped_test,
            "swap_round_limit_hit": bool(rounds_fit >= max_swap_rounds or rounds_test >= max_swap_rounds),
            "image_size": size,
        },
    )


# ----------------------------------------------------------------------------------------------
# Taichi (AutoLink datasets/taichi.py, equivalent to motion-cosegmentation's evaluate.py)
# ----------------------------------------------------------------------------------------------
def taichi_mae(
    det_fit: Any,
    gt_fit: Any,
    det_test: Any,
    gt_test: Any,
    image_size: int,
    *,
    report_size: int = PAPER_REPORT_SIZE,
) -> EvalResult:
    """AutoLink's Taichi protocol: the SUM over GT joints and coordinates of the test MAE, in pixels
    at ``report_size`` (256, lower is better).

    For each GT joint j and coordinate c separately: OLS *with* intercept from the 2K detected
    coordinates to GT[:, j, c] over the fit rows where that coordinate is annotated; MAE over the test
    rows where it is annotated. A GT coordinate is missing when it is NaN, or equal to -1 (the raw
    Taichi pickle's code, checked per coordinate like AutoLink's ``|v + 1| > 1e-6``). A coordinate
    with no annotated test row contributes nothing (counted in ``details``).

    Returns an :class:`EvalResult`: value = sum of MAEs at ``report_size`` px; pred_test (N_test, J, 2)
    pixels (x, y) at ``image_size`` for every test row; ``details['mae']`` the (J, 2) per-coordinate MAEs.
    """
    df, gf, dt, gt, size = _check_inputs(det_fit, gt_fit, det_test, gt_test, image_size)
    missing_fit = np.isnan(gf) | (np.abs(gf + 1.0) <= 1e-6)
    missing_test = np.isnan(gt) | (np.abs(gt + 1.0) <= 1e-6)
    x_fit = _with_intercept(_flat(df) / (size - 1) * _AUTOLINK_FEATURE_SCALE)  # (N_fit, 2K + 1)
    x_test = _with_intercept(_flat(dt) / (size - 1) * _AUTOLINK_FEATURE_SCALE)
    # Missing GT is masked above, so the -1 codes are never rescaled into real-looking values.
    gf_r, gt_r = _to_report(gf, size, report_size), _to_report(gt, size, report_size)
    n_joints = gf.shape[1]
    pred = np.empty((dt.shape[0], n_joints, 2))  # at report_size
    mae = np.full((n_joints, 2), np.nan)
    for j in range(n_joints):
        for c in range(2):
            ok = ~missing_fit[:, j, c]
            if not ok.any():
                raise ValueError(
                    f"taichi_mae: GT joint {j} coordinate {'xy'[c]} is missing in all {gf.shape[0]} fit frames; "
                    f"the fit split must annotate every joint at least once"
                )
            beta = _lstsq(x_fit[ok], gf_r[ok, j, c])  # (2K + 1,)
            pred[:, j, c] = x_test @ beta
            ok_t = ~missing_test[:, j, c]
            if ok_t.any():
                mae[j, c] = np.abs(pred[ok_t, j, c] - gt_r[ok_t, j, c]).mean()
    scored = ~np.isnan(mae)
    gt_scored = np.where(missing_test, np.nan, gt)
    return EvalResult(
        protocol="taichi_mae",
        value=float(mae[scored].sum()),
        unit=f"px at {report_size} (sum of {int(scored.sum())} per-coordinate MAEs)",
        higher_is_better=False,
        pred_test=_from_report(pred, size, report_size),
        gt_test=gt_scored,
        details={
            "n_fit": int(df.shape[0]),
            "n_test": int(dt.shape[0]),
            "mae": [[None if np.isnan(v) else float(v) for v in row] for row in mae],
            "n_coordinates_scored": int(scored.sum()),
            "n_coordinates_without_test_gt": int((~scored).sum()),
            "missing_fraction_test": float(missing_test.mean()),
            "report_size": report_size,
            "image_size": size,
        },
    )


# ----------------------------------------------------------------------------------------------
# DeepFashion (AutoLink datasets/deepfashion.py)
# ----------------------------------------------------------------------------------------------
def deepfashion_pck(
    det_fit: Any,
    gt_fit: Any,
    det_test: Any,
    gt_test: Any,
    image_size: int,
    *,
    threshold_px: float = 6.0,
    report_size: int = PAPER_REPORT_SIZE,
) -> EvalResult:
    """AutoLink's DeepFashion protocol: percentage of test joints whose regressed position is
    strictly closer than ``threshold_px`` pixels at ``report_size`` (PCK@6 px at 256; higher is better).

    OLS without intercept from the 2K detected coordinates to all GT coordinates (fit split), then the
    per-joint L2 error on the test split. NaN GT (absent in DeepFashion) is left out of the fit per
    coordinate and of the score.

    Returns an :class:`EvalResult`: value = 100 * fraction of (frame, joint) pairs with error <
    threshold; pred_test (N_test, J, 2) pixels (x, y) at ``image_size``.
    """
    df, gf, dt, gt, size = _check_inputs(det_fit, gt_fit, det_test, gt_test, image_size)
    x_fit = _flat(df) / (size - 1) * _AUTOLINK_FEATURE_SCALE  # (N_fit, 2K)
    x_test = _flat(dt) / (size - 1) * _AUTOLINK_FEATURE_SCALE
    beta = _fit_columns(x_fit, _flat(_to_report(gf, size, report_size)), what="deepfashion_pck")  # (2K, 2J)
    pred = (x_test @ beta).reshape(gt.shape)  # (N_test, J, 2) at report_size
    err = np.linalg.norm(pred - _to_report(gt, size, report_size), axis=2)  # (N_test, J), NaN where GT missing
    valid = ~np.isnan(err)
    hits = (err[valid] < threshold_px)
    return EvalResult(
        protocol="deepfashion_pck",
        value=100.0 * float(hits.mean()),
        unit=f"% of joints within {threshold_px:g} px at {report_size}",
        higher_is_better=True,
        pred_test=_from_report(pred, size, report_size),
        gt_test=gt,
        details={
            "n_fit": int(df.shape[0]),
            "n_test": int(dt.shape[0]),
            "n_joints_scored": int(valid.sum()),
            "mean_error_px": float(err[valid].mean()),
            "threshold_px": float(threshold_px),
            "report_size": report_size,
            "image_size": size,
        },
    )


# ----------------------------------------------------------------------------------------------
# Generic normalised L2 (folder and synthetic datasets)
# ----------------------------------------------------------------------------------------------
def normalised_l2(
    det_fit: Any,
    gt_fit: Any,
    det_test: Any,
    gt_test: Any,
    image_size: int,
    *,
    intercept: bool = False,
    flip_pairs: Sequence[tuple[int, int]] | None = None,
    max_flip_rounds: int = 50,
) -> EvalResult:
    """H36M-style error normalised by the image size, x 100 (lower is better), without AutoLink's
    quirks: no "> 10 samples" swap rule, no 3-sigma pruning, NaN GT joints skipped (per coordinate in
    the fit, per joint in the score).

    OLS from the 2K detected coordinates (plus a constant when ``intercept``; H36M uses none) to the GT.
    With ``flip_pairs`` (GT joint index pairs (left, right), each joint in at most one pair) the metric
    is left/right orientation invariant: the fit alternates refitting and giving each fit sample the
    orientation (GT or mirrored GT) that its prediction is closer to, until no sample changes or
    ``max_flip_rounds``; each test sample is scored against the closer orientation.

    Returns an :class:`EvalResult`: value = 100 * mean over test frames of the mean joint L2 /
    (image_size - 1), the same normalisation as :func:`h36m_l2`;
    pred_test / gt_test (N_test, J, 2) pixels (x, y), gt_test in the orientation that was scored.
    """
    df, gf, dt, gt, size = _check_inputs(det_fit, gt_fit, det_test, gt_test, image_size)
    n_joints = gf.shape[1]
    perm = None
    if flip_pairs:
        seen = [j for pair in flip_pairs for j in pair]
        if len(set(seen)) != len(seen):
            raise ValueError(f"flip_pairs {list(flip_pairs)}: a joint appears in more than one pair; pairs must be disjoint")
        perm = _swap_permutation(n_joints, flip_pairs)

    def features(d: np.ndarray) -> np.ndarray:
        x = _flat(d) / (size - 1)
        return _with_intercept(x) if intercept else x

    x_fit, x_test = features(df), features(dt)
    y_fit = gf / (size - 1)
    rounds = 0
    while True:
        beta = _fit_columns(x_fit, _flat(y_fit), what="normalised_l2")
        if perm is None or rounds >= max_flip_rounds:
            break
        pred = (x_fit @ beta).reshape(y_fit.shape)
        better = _per_sample_l2(pred, y_fit[:, perm]) < _per_sample_l2(pred, y_fit)
        if not better.any():
            break
        y_fit = np.where(better[:, None, None], y_fit[:, perm], y_fit)
        rounds += 1
    y_test = gt / (size - 1)
    pred_test = (x_test @ beta).reshape(y_test.shape)  # (N_test, J, 2)
    dist = _per_sample_l2(pred_test, y_test)
    if perm is not None:
        flipped = y_test[:, perm]
        dist_flipped = _per_sample_l2(pred_test, flipped)
        use_flip = dist_flipped < dist
        y_test = np.where(use_flip[:, None, None], flipped, y_test)
        dist = np.where(use_flip, dist_flipped, dist)
    scored = ~np.isnan(dist)
    if not scored.any():
        raise ValueError("normalised_l2: no test frame has an annotated joint; check gt_test")
    return EvalResult(
        protocol="normalised_l2",
        value=100.0 * float(dist[scored].mean()),
        unit="% of image size (mean L2)",
        higher_is_better=False,
        pred_test=pred_test * (size - 1),
        gt_test=y_test * (size - 1),
        details={
            "n_fit": int(df.shape[0]),
            "n_test": int(dt.shape[0]),
            "n_test_scored": int(scored.sum()),
            "intercept": bool(intercept),
            "flip_rounds_fit": rounds,
            "image_size": size,
        },
    )


# ----------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------
PROTOCOLS: dict[str, Callable[..., EvalResult]] = {
    "h36m_l2": h36m_l2,
    "taichi_mae": taichi_mae,
    "deepfashion_pck": deepfashion_pck,
    "normalised_l2": normalised_l2,
}
# Short names used by the experiment config (``eval.protocol``) and the dataset manifests.
PROTOCOL_ALIASES: dict[str, str] = {
    "h36m": "h36m_l2",
    "taichi": "taichi_mae",
    "deepfashion": "deepfashion_pck",
    "l2": "normalised_l2",
}


def evaluate(
    protocol: str,
    *,
    det_fit: Any,
    gt_fit: Any,
    det_test: Any,
    gt_test: Any,
    image_size: int,
    **options: Any,
) -> EvalResult:
    """Run the named protocol (a key of :data:`PROTOCOLS` or :data:`PROTOCOL_ALIASES`); ``options`` go to
    the protocol function as keyword arguments. Returns its :class:`EvalResult`."""
    name = PROTOCOL_ALIASES.get(protocol, protocol)
    fn = PROTOCOLS.get(name)
    if fn is None:
        valid = sorted(PROTOCOLS) + sorted(PROTOCOL_ALIASES)
        raise ValueError(f"unknown evaluation protocol {protocol!r}; valid names: {', '.join(valid)}")
    return fn(det_fit, gt_fit, det_test, gt_test, image_size, **options)


def mean_pose_floor(
    protocol: str,
    *,
    gt_fit: Any,
    gt_test: Any,
    image_size: int,
    **options: Any,
) -> EvalResult:
    """The protocol's "no detector" reference: the fit split's mean pose predicted for every test frame.

    Computed through the protocol itself, with a detector that returns the same keypoint (the frame
    centre) for every frame: a linear map from a constant input can only output a constant, and the
    least-squares constant is the mean of the fit split's ground truth (per coordinate, missing GT
    skipped; after the protocol's own swaps, pruning or left/right matching, which therefore apply to
    the floor exactly as they apply to a model). A model that does not beat this value has learned
    nothing the regression could use. ``options`` are the protocol's, as for :func:`evaluate`.
    """
    gf = _as_points("gt_fit", gt_fit, allow_nan=True)
    gt = _as_points("gt_test", gt_test, allow_nan=True)
    centre = (float(image_size) - 1.0) / 2.0
    det_fit = np.full((gf.shape[0], 1, 2), centre)
    det_test = np.full((gt.shape[0], 1, 2), centre)
    return evaluate(protocol, det_fit=det_fit, gt_fit=gf, det_test=det_test, gt_test=gt, image_size=image_size,
                    **options)
