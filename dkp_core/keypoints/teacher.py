"""The frozen teacher of distillation: a trained AutoLink that stays frozen, whatever is done to it.

:class:`FrozenTeacher` owns the three rules the distill stage relied on in three places before (DINOv2's habit:
a frozen teacher stays in ``eval()`` and under ``no_grad``, asserted):

- frozen: every parameter ``requires_grad=False``, and ``eval()`` that a ``train()`` call cannot undo (the
  wrapper ignores ``train(True)`` on the model, and :meth:`check` asserts it before every use);
- its embedding of a layer, always computed in fp32 under ``no_grad`` with autocast off, so a live target inside
  the student's autocast equals what an embedding cache computed beforehand;
- its keypoints (soft-argmax of its logits, or the expected coordinates of its heatmaps).
"""
from __future__ import annotations

import torch
from torch import nn

from dkp_core.keypoints.detector import expected_coordinates, soft_argmax

KEYPOINT_LAYERS = ("logits", "heatmaps")  # the layers the teacher's keypoints can be read from


class FrozenTeacher:
    """A trained AutoLink ``model`` (its detector is what is distilled), frozen for good."""

    def __init__(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        model.eval()
        model.train = _stays_in_eval.__get__(model)  # a train() call (a trainer's, a DDP wrapper's) cannot undo it
        self.model = model

    @property
    def image_size(self) -> int:
        """The side of the square input it was trained at (from its model.pt's arguments)."""
        return int(self.model.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "FrozenTeacher":
        self.model.to(device)
        return self

    def check(self) -> None:
        """Assert the teacher is still frozen: in eval mode, no parameter that wants a gradient."""
        assert not self.model.training, "the teacher must stay in eval() during distillation"
        assert not any(p.requires_grad for p in self.model.parameters()), "the teacher's weights must stay frozen"

    def embedding(self, depth: torch.Tensor, layer: str) -> torch.Tensor:
        """The teacher's ``layer`` tensor (B, C, h, w) float32 for depth input (B, 3, S, S): no gradient, autocast
        off, whatever context the caller runs in."""
        self.check()
        with torch.no_grad(), torch.autocast(depth.device.type, enabled=False):
            out = self.model.detector(depth.float(), return_features=(layer,))
        return out.features[layer].float()

    @staticmethod
    def keypoints(t: torch.Tensor, layer: str) -> torch.Tensor:
        """The teacher's keypoints (B, K, 2) in [-1, 1] (x, y) from its ``layer`` tensor: soft-argmax of the
        logits, or the expected coordinates of the heatmaps (each map already sums to 1)."""
        if layer == "logits":
            return soft_argmax(t)[0]
        if layer != "heatmaps":
            raise ValueError(f"the teacher's keypoints come from {' or '.join(KEYPOINT_LAYERS)}, not {layer!r}")
        return expected_coordinates(t)


def _stays_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    """``nn.Module.train`` of a frozen teacher: always ``eval()``."""
    return nn.Module.train(self, False)
