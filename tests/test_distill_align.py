"""Distillation between models that differ (issue 27): attention transfer and a learned 1x1 adapter for
intermediate layers of other widths, heatmaps between other widths and depths, a teacher of another resolution;
and the deeper detector (model.extra_blocks) that the architecture-pairs study uses."""
from __future__ import annotations

import json

import pytest
import torch

from dkp_core.losses import attention_map, distillation_loss
from tests.conftest import quiet_console


# ---------------------------------------------------------------- the loss
def test_attention_transfer_compares_where_activations_are_whatever_the_widths():
    torch.manual_seed(0)
    t = torch.randn(3, 8, 6, 6)
    # the same spatial pattern of energy in a student of another width: no loss
    s = torch.cat([t, t], dim=1)  # (3, 16, 6, 6): each channel twice, the channel mean of squares unchanged
    assert distillation_loss(s, t, flatten="attention").item() == pytest.approx(0.0, abs=1e-6)
    # energy elsewhere: a loss, and a gradient that reaches the student only
    moved = torch.roll(t, shifts=3, dims=-1).repeat(1, 2, 1, 1).requires_grad_(True)
    loss = distillation_loss(moved, t, flatten="attention")
    assert 0.0 < loss.item() <= 1.0
    loss.backward()
    assert moved.grad is not None and moved.grad.abs().sum() > 0
    # hand-computed: one location with all the energy against one with none -> orthogonal maps
    a, b = torch.zeros(1, 2, 1, 2), torch.zeros(1, 5, 1, 2)
    a[0, :, 0, 0], b[0, :, 0, 1] = 1.0, 3.0
    assert distillation_loss(a, b, flatten="attention").item() == pytest.approx(1.0, abs=1e-6)
    assert attention_map(a).shape == (1, 2)
    with pytest.raises(ValueError, match="one batch and spatial shape"):
        distillation_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 5, 5), flatten="attention")


def test_match_target_resizes_and_keeps_heatmaps_distributions():
    from pipeline.stages.distill.run import match_target

    h = torch.softmax(torch.randn(2, 4, 16 * 16), -1).reshape(2, 4, 16, 16)
    small = match_target(h, (12, 12), "heatmaps")
    assert small.shape == (2, 4, 12, 12)
    torch.testing.assert_close(small.sum(dim=(-2, -1)), torch.ones(2, 4))
    big = match_target(h, (20, 20), "heatmaps")
    torch.testing.assert_close(big.sum(dim=(-2, -1)), torch.ones(2, 4))
    f = torch.randn(2, 8, 6, 6)
    assert match_target(f, (6, 6), "up2") is f
    assert match_target(f, (12, 12), "up2").shape == (2, 8, 12, 12)


# ---------------------------------------------------------------- the deeper detector
def test_extra_blocks_deepen_the_detector_and_leave_autolinks_names_alone():
    from dkp_core.keypoints import AutoLink

    plain = AutoLink(n_keypoints=4, image_size=32, heatmap_size=8, width=8)
    deep = AutoLink(n_keypoints=4, image_size=32, heatmap_size=8, width=8, extra_blocks=2)
    assert not any(k.startswith("detector.mid") for k in plain.state_dict())  # AutoLink checkpoints still load
    extra = set(deep.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("detector.mid.") for k in extra)
    x = torch.randn(2, 3, 32, 32)
    out = deep.detector(x, return_features=("down4", "up2"))
    assert out.heatmaps.shape == (2, 4, 8, 8) and out.features["down4"].shape == (2, 64, 2, 2)
    with pytest.raises(ValueError, match="extra_blocks"):
        AutoLink(n_keypoints=4, image_size=32, heatmap_size=8, width=8, extra_blocks=-1)


# ---------------------------------------------------------------- through the stage
@pytest.fixture(scope="module")
def tiny(tiny_store):
    """The tiny experiment up to `teach` (teacher width 8) once for this file."""
    return {**tiny_store(until="teach"), "runs": {}}


def distill(tiny, *overrides: str):
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    key = tuple(sorted(overrides))
    if key not in tiny["runs"]:
        cfg = load_config(tiny["yaml"], ["distill.log_every=1", "distill.gamma=1", *overrides])
        tiny["runs"][key] = run_pipeline(cfg, tiny["store"], until="distill", console=quiet_console()).stages["distill"]
    return tiny["runs"][key]


def _kd(sp) -> list[float]:
    return [json.loads(line)["kd_loss"] for line in (sp.path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("student", [("distill.model.width=16",), ("distill.model.width=4",),
                                     ("distill.model.width=16", "distill.model.extra_blocks=1")],
                         ids=["wider", "narrower", "wider-and-deeper"])
def test_heatmaps_distil_between_other_widths_and_depths(tiny, student):
    from pipeline.stages import common

    sp = distill(tiny, "distill.layer=heatmaps", "distill.flatten=keypoint", *student)
    kd = _kd(sp)
    assert len(kd) == 6 and all(0.0 <= v <= 2.0 for v in kd)
    model, payload = common.load_trained(sp.path)
    assert payload["model_args"]["width"] == int(student[0].split("=")[1])
    assert "distill_adapter" not in payload["model_args"]


def test_an_intermediate_layer_of_another_width_needs_a_bridge(tiny):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"distill.layer=up2: .*other channel counts.*distill.adapter: true.*"
                                          r"distill.flatten: attention"):
        distill(tiny, "distill.layer=up2", "distill.flatten=location", "distill.model.width=16")


def test_the_adapter_is_trained_stored_and_loaded_with_the_student(tiny):
    from pipeline.stages import common

    sp = distill(tiny, "distill.layer=up2", "distill.flatten=location", "distill.adapter=true",
                 "distill.model.width=16")
    model, payload = common.load_trained(sp.path)  # loads whole: eval and predict see a plain student
    assert payload["model_args"]["distill_adapter"] == [32, 16]  # up2: 2 x width channels, student -> teacher
    conv = model.distill_adapter
    assert tuple(conv.weight.shape) == (16, 32, 1, 1)
    torch.manual_seed(payload["config"]["seed"])  # the student as distill built it, before training
    initial = common.build_model(payload["model_args"]).distill_adapter
    assert not torch.equal(conv.weight, initial.weight)  # the adapter was trained with the student
    kd = _kd(sp)
    assert all(0.0 <= v <= 2.0 for v in kd)
    rec = json.loads((sp.path / "artifact.json").read_text())
    assert rec["inputs"]["config"]["adapter"] is True


def test_attention_distils_an_intermediate_layer_across_widths(tiny):
    sp = distill(tiny, "distill.layer=up1", "distill.flatten=attention", "distill.model.width=4")
    assert all(0.0 <= v <= 1.0 for v in _kd(sp))


def test_a_teacher_of_another_resolution_is_resized_to_the_student(tiny):
    """Teacher at 32 px (8 x 8 heatmaps), student at 16 px (4 x 4): the targets are area-averaged and renormalised."""
    sp = distill(tiny, "distill.layer=heatmaps", "distill.flatten=keypoint", "distill.model.image_size=16",
                 "distill.model.heatmap_size=4", "distill.model.mask_blocks=8")
    assert all(0.0 <= v <= 2.0 for v in _kd(sp))
