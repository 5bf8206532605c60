"""Does the method learn? One small seeded run of the real pipeline (synthetic data written to disk, the depth cache,
teach, eval's regression protocol, floor and heatmap mass on the figure) in which the depth teacher must beat the
floor by a clear margin, with its keypoints on the figure.

Finite numbers are not learning: every other eval test would pass with a detector that outputs noise. Nor is the
floor alone enough here: on depth maps almost any detector's keypoints move with the near blob, so a regression
from them beats the mean pose even when the detector learned nothing useful. Measured on the development VM (seed
0, this file's settings, one thread, ~37 s of CPU time per run: data, depth import, 300 teacher steps, eval):

| teacher run | × floor | heatmap mass on the figure (× its area) |
|---|---|---|
| as it is | 0.503 | 1.77 |
| loss with its sign flipped | 0.555 | 0.19 |
| loss against the target's mean (the target ignored) | 0.626 | 0.90 |
| loss without gradient (prediction detached) | 0.794 | 0.94 |

So the check asks for both: below 0.65 x the floor and more than 1.35 x the figure's area of heatmap mass on it.
The tests below break the loss (sign), the link renderer and the data path with a test-local monkeypatch and
show that the check fails on each.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import quiet_console, torch_threads

LEARN_YAML = """\
base: synthetic
name: learn
# every frame a new scene (the preset's data, at 32 px and 400 frames)
data: {{root: {root}, synth_frames: 400, synth_seed: 0, synth_image_size: 32, synth_clip_length: 1}}
teach:
  model: {{n_keypoints: 10, image_size: 32, heatmap_size: 8, width: 8, thick: 2.0e-3}}
  amp: "off"
  steps: 300
  batch_size: 16
  deterministic: true
  checkpoint_every: 1000
  eval_every: 0
distill:  # not what this test is about: one step of the gamma = 0 student, which eval needs in the plan
  model: {{n_keypoints: 10, image_size: 32, heatmap_size: 8, width: 8, thick: 2.0e-3}}
  amp: "off"
  gamma: 0
  steps: 1
  batch_size: 4
  checkpoint_every: 1000
  eval_every: 0
eval: {{baseline: false}}
"""
# the teacher must be this far below the floor (lower is better; the good run: 0.50) and put this much more of its
# heatmap mass on the figure than a detector blind to it would (the good run: 1.77; broken ones 0.19-0.94)
MARGIN = 0.65
ON_FIGURE = 1.35


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The 400 frames, written once for the module (every run reads them; none writes them)."""
    from pipeline.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("learn-data") / "data"
    write_synthetic(root, n=400, seed=0, image_size=32, clip_length=1, progress=False)
    return root


def learning_run(folder, root) -> dict:
    """Build the small experiment in a fresh store under ``folder``; return eval's metrics.json."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    y = folder / "learn.yaml"
    y.write_text(LEARN_YAML.format(root=root))
    with torch_threads(1):
        plan = run_pipeline(load_config(str(y)), str(folder / "store"), console=quiet_console())
    return json.loads((plan.stages["eval"].path / "metrics.json").read_text())


def check_teacher_learns(metrics: dict) -> None:
    """The depth teacher's L2 is below MARGIN x the floor's (the mean pose) on frames it never saw, and its heatmaps
    put more than ON_FIGURE x the figure's area of their mass on the figure."""
    teacher, floor = metrics["teacher"], metrics["floor"]
    mass = teacher["figure_heatmap_mass"]["ratio"]
    assert teacher["value"] < MARGIN * floor["value"] and mass > ON_FIGURE, (
        f"the depth teacher does not beat the floor by a clear margin with its keypoints on the figure: "
        f"{teacher['value']:.2f} vs floor {floor['value']:.2f} ({teacher['ratio_to_floor']:.3f} x; needs < {MARGIN}), "
        f"heatmap mass on the figure {mass:.2f} x its area (needs > {ON_FIGURE})")


def test_the_depth_teacher_beats_the_floor(tmp_path, data_root):
    check_teacher_learns(learning_run(tmp_path, data_root))


def _break_loss(monkeypatch):
    """A reconstruction loss with its sign flipped (maximised): its teacher still beats the floor (0.555 x), but
    not with its keypoints on the figure (0.19 x its area)."""
    from dkp_core import losses

    real = losses.MultiScaleL1SSIM.forward
    monkeypatch.setattr(losses.MultiScaleL1SSIM, "forward",
                        lambda self, prediction, target: -real(self, prediction, target))


def _break_links(monkeypatch):
    """A link renderer that draws nothing: the decoder never sees the keypoints, so nothing teaches them."""
    import torch

    from dkp_core.keypoints import links

    monkeypatch.setattr(links.LinkRenderer, "forward",
                        lambda self, keypoints: torch.zeros(keypoints.shape[0], 1, self.size, self.size,
                                                            device=keypoints.device, dtype=keypoints.dtype))


def _break_data(monkeypatch):
    """An off-by-one between a frame and its depth map (every read returns the next frame's map)."""
    from pipeline.depth_cache import reader

    real = reader.DepthCacheReader.read
    monkeypatch.setattr(reader.DepthCacheReader, "read",
                        lambda self, i: real(self, (int(i) + 1) % 320))  # 320 = the train frames, all valid


@pytest.mark.parametrize("breakage", [_break_loss, _break_links, _break_data], ids=["loss", "links", "data"])
def test_the_check_fails_when_learning_is_broken(breakage, tmp_path, data_root, monkeypatch):
    breakage(monkeypatch)
    metrics = learning_run(tmp_path, data_root)
    with pytest.raises(AssertionError, match="does not beat the floor by a clear margin"):
        check_teacher_learns(metrics)
