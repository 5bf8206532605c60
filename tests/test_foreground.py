import numpy as np
import pytest

from pipeline.data.foreground import foreground_masks, heatmap_mass_in_mask


def test_mass_in_mask_hand_computed():
    masks = np.zeros((1, 8, 8), np.float32)
    masks[0, :4, :4] = 1  # top-left quarter
    heat = np.zeros((1, 2, 4, 4))
    heat[0, 0, 0, 0] = 1.0  # inside
    heat[0, 1, 3, 3] = 1.0  # outside
    r = heatmap_mass_in_mask(heat, masks)
    assert r["mask_area"] == pytest.approx(0.25)
    assert r["mass_in_mask"] == pytest.approx(0.5)
    assert r["ratio"] == pytest.approx(2.0)
    uniform = np.full((1, 2, 4, 4), 1 / 16)
    assert heatmap_mass_in_mask(uniform, masks)["ratio"] == pytest.approx(1.0)


def test_synthetic_masks_match_the_figure(tmp_path):
    from pipeline.data.build import build_manifest
    from pipeline.data.synth import write_synthetic

    write_synthetic(tmp_path / "s", n=6, seed=3, image_size=32, progress=False)
    m = build_manifest("synthetic", tmp_path / "s", progress=False)
    idx = list(range(len(m)))
    masks = foreground_masks(m, idx, 32)
    assert masks is not None and masks.shape == (len(m), 32, 32)
    assert 0.02 < masks.mean() < 0.6
    # visible GT keypoints fall on (or right next to) the mask
    kp = m.keypoints
    hits = []
    for n in idx:
        for x, y in kp[n]:
            if np.isfinite(x):
                xi, yi = int(round(x)), int(round(y))
                hits.append(masks[n, max(0, yi - 1):yi + 2, max(0, xi - 1):xi + 2].max())
    assert np.mean(hits) > 0.9
