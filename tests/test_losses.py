"""Losses: distillation (hand-computed), perceptual (random VGG weights, no download), L1+SSIM,
the factory, and the VGG weights loader's errors."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from dkp_core.losses import (MultiScaleL1SSIM, PerceptualLoss, _vgg16_features, distillation_loss,
                             keypoint_distillation_loss, make_reconstruction_loss)
from pipeline.errors import CheckpointError
from pipeline.weights.vgg import load_vgg16_state_dict

FLATTENS = ("sample", "keypoint", "location")


# ---------------------------------------------------------------- distillation

@pytest.mark.parametrize("flatten", FLATTENS)
def test_distillation_identical_opposite_orthogonal(flatten):
    torch.manual_seed(0)
    t = torch.randn(3, 4, 5, 5)
    assert distillation_loss(t.clone(), t, flatten=flatten).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(-t, t, flatten=flatten).item() == pytest.approx(2.0, abs=1e-6)
    # Orthogonal under every flattening: disjoint supports (student on even channels and even
    # locations, teacher on odd channels and odd locations).
    s = torch.zeros(2, 2, 2, 2)
    s[:, 0, 0, 0] = 1.0
    te = torch.zeros(2, 2, 2, 2)
    te[:, 1, 0, 1] = 1.0
    te[:, 0, 1, 1] = 1.0  # non-zero per channel too
    s[:, 1, 1, 0] = 1.0
    assert distillation_loss(s, te, flatten=flatten).item() == pytest.approx(1.0, abs=1e-6)


def test_distillation_hand_computed_flattenings_differ():
    # B=1, C=2 channels ("keypoints"), L=2 locations.
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    # sample: cos((1,0,0,1), (1,0,1,0)) = 1/2
    assert distillation_loss(s, t, flatten="sample").item() == pytest.approx(0.5, abs=1e-6)
    # keypoint: channel 0 cos 1, channel 1 cos 0 -> mean(0, 1)
    assert distillation_loss(s, t, flatten="keypoint").item() == pytest.approx(0.5, abs=1e-6)
    # location: loc 0 cos((1,0),(1,1)) = 1/sqrt2, loc 1 cos((0,1),(0,0)) = 0 (zero vector)
    expected = ((1 - 1 / math.sqrt(2)) + 1) / 2
    assert distillation_loss(s, t, flatten="location").item() == pytest.approx(expected, abs=1e-6)


def test_distillation_gradient_reaches_student_only_and_errors():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    distillation_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_loss(torch.zeros(1, 2, 3), torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="valid: sample"):
        distillation_loss(s, t, flatten="pixel")
    # Keypoints (B, K, 2) work with every flattening.
    kp = torch.randn(2, 5, 2)
    assert distillation_loss(kp, kp, flatten="keypoint").item() == pytest.approx(0.0, abs=1e-6)


def test_keypoint_term_hand_computed():
    # B=1, K=2: distances (0.3, 0.4) -> 0.25 and 0 -> mean 0.125; the teacher gets no gradient
    s = torch.tensor([[[0.3, 0.4], [0.5, -0.5]]], requires_grad=True)
    t = torch.tensor([[[0.0, 0.0], [0.5, -0.5]]], requires_grad=True)
    loss = keypoint_distillation_loss(s, t)
    assert loss.item() == pytest.approx(0.125, abs=1e-7)
    loss.backward()
    torch.testing.assert_close(s.grad, torch.tensor([[[0.3, 0.4], [0.0, 0.0]]]))  # d/ds mean = 2 (s - t) / K
    assert t.grad is None
    with pytest.raises(ValueError, match=r"\(B, K, 2\)"):
        keypoint_distillation_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))


def test_teacher_keypoints_from_heatmaps_equal_soft_argmax():
    from dkp_core.keypoints.detector import soft_argmax
    from dkp_core.keypoints.teacher import FrozenTeacher

    target_keypoints = FrozenTeacher.keypoints

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6) * 3
    kp, heat = soft_argmax(logits)
    torch.testing.assert_close(target_keypoints(heat, "heatmaps"), kp)
    torch.testing.assert_close(target_keypoints(logits, "logits"), kp)
    with pytest.raises(ValueError, match="logits or heatmaps"):
        target_keypoints(logits, "up2")


# ---------------------------------------------------------------- perceptual

@pytest.fixture(scope="module")
def random_vgg_state_dict():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feats = _vgg16_features(None)
    sd = {f"features.{k}": v for k, v in feats.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # the real file has a classifier: must be ignored
    return sd


@pytest.fixture(scope="module")
def perceptual(random_vgg_state_dict):
    return PerceptualLoss(random_vgg_state_dict)


def test_perceptual_loads_given_weights_frozen_and_eval(perceptual, random_vgg_state_dict):
    assert torch.equal(perceptual.blocks[0][0].weight, random_vgg_state_dict["features.0.weight"])
    assert torch.equal(perceptual.blocks[3][21 - 16].weight, random_vgg_state_dict["features.21.weight"])
    assert [len(b) for b in perceptual.blocks] == [4, 5, 7, 7]
    assert all(not p.requires_grad for p in perceptual.parameters())
    perceptual.train()
    assert not perceptual.training and not any(m.training for m in perceptual.modules())
    assert perceptual.pretrained


def test_perceptual_values_and_gradients(perceptual):
    torch.manual_seed(0)
    y = torch.rand(2, 3, 32, 48) * 2 - 1
    x = (torch.rand(2, 3, 32, 48) * 2 - 1).requires_grad_()
    assert perceptual(y, y).item() == 0.0
    loss = perceptual(x, y)
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert x.grad.abs().sum() > 0
    # One-channel (depth) images are repeated to three channels.
    assert perceptual(y[:, :1], y[:, :1].clone()).item() == 0.0
    assert perceptual(x[:, :1].detach(), y[:, :1]).item() > 0


def test_perceptual_rejects_wrong_state_dict():
    with pytest.raises(ValueError, match="lacks 20 feature weights"):
        PerceptualLoss({"classifier.0.weight": torch.zeros(1)})


def test_perceptual_without_weights_warns():
    with pytest.warns(UserWarning, match="random VGG16"):
        loss = make_reconstruction_loss("perceptual")
    assert isinstance(loss, PerceptualLoss) and not loss.pretrained


# ---------------------------------------------------------------- L1 + SSIM and the factory

def test_l1ssim_zero_for_identical_and_grows_with_difference():
    torch.manual_seed(0)
    loss = make_reconstruction_loss("l1ssim", scales=3, ssim_weight=0.85)
    assert isinstance(loss, MultiScaleL1SSIM)
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(y, y.clone()).item() == pytest.approx(0.0, abs=1e-6)
    small = loss(y + 0.05 * torch.randn_like(y), y).item()
    large = loss(y + 0.5 * torch.randn_like(y), y).item()
    assert 0 < small < large
    # SSIM sees structure that L1 alone misses: a constant shift costs L1 only.
    pure_l1 = MultiScaleL1SSIM(scales=1, ssim_weight=0.0)(y + 0.2, y).item()
    assert pure_l1 == pytest.approx(0.1, abs=1e-5)  # 0.2 in [-1, 1] = 0.1 in [0, 1]


def test_make_reconstruction_loss_lists_valid_names():
    with pytest.raises(ValueError, match="l1, l1ssim, mse, perceptual"):
        make_reconstruction_loss("l2")


def test_pixel_losses_by_hand():
    """l1 and mse: mean |d| and mean d² of the difference of the images mapped from [-1, 1] to [0, 1]."""
    x = torch.tensor([[[[-1.0, 0.0], [1.0, 0.5]]]])  # (1, 1, 2, 2)
    y = torch.tensor([[[[-1.0, 1.0], [0.0, -0.5]]]])
    # differences on [0, 1]: 0, -0.5, 0.5, 0.5
    assert make_reconstruction_loss("l1")(x, y).item() == pytest.approx(1.5 / 4)
    assert make_reconstruction_loss("mse")(x, y).item() == pytest.approx(0.75 / 4)
    assert make_reconstruction_loss("l1")(x, x).item() == 0.0
    # the same number as l1ssim reduced to one scale of pure L1
    z = torch.rand(2, 3, 8, 8) * 2 - 1
    assert make_reconstruction_loss("l1")(z, -z).item() == pytest.approx(MultiScaleL1SSIM(scales=1, ssim_weight=0.0)(z, -z).item())
    xr = x.clone().requires_grad_(True)
    make_reconstruction_loss("mse")(xr, y).backward()
    assert torch.allclose(xr.grad, (xr.detach() - y) / 8)  # d/dx mean(((x - y)/2)²) = (x - y)/(2·N), N = 4


# ---------------------------------------------------------------- VGG weights loader

def test_vgg_loader_missing_explicit_path(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError) as err:
        load_vgg16_state_dict(str(missing))
    msg = str(err.value)
    assert str(missing) in msg and "vgg16-397923af.pth" in msg and "l1ssim" in msg


def test_vgg_loader_missing_default_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(CheckpointError) as err:
        load_vgg16_state_dict(None)
    expected = tmp_path / "th" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert str(expected) in str(err.value)


def test_vgg_loader_reads_cache_and_rejects_garbage(tmp_path, monkeypatch, random_vgg_state_dict):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    small = {k: v for k, v in random_vgg_state_dict.items() if k.startswith("features.0.")}
    torch.save(small, cache / "vgg16-397923af.pth")
    got = load_vgg16_state_dict(None)
    assert torch.equal(got["features.0.weight"], small["features.0.weight"])
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_vgg16_state_dict(str(bad))
    other = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not a torchvision vgg16"):
        load_vgg16_state_dict(str(other))
