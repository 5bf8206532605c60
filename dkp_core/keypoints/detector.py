"""AutoLink's keypoint detector: an hourglass CNN, a spatial softmax and a soft-argmax.

Architecture, init and defaults follow AutoLink's ``models/encoder.py`` (research/paper_autolink.md
§2.2, §2.6). One deliberate difference: keypoints come out as **(x, y)**, not AutoLink's
(row, col) (docs/conventions.md). The convolution weights are unaffected by that choice, so
AutoLink weights still load (``dkp_core.keypoints.autolink.convert_autolink_state_dict``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# LeakyReLU slope used everywhere in AutoLink; the Kaiming init uses the same value.
LEAKY_SLOPE = 0.2

# Names accepted by ``KeypointDetector.forward(return_features=...)``; E1..E8 in
# research/paper_autolink.md §1.4 (the distillation-layer ablation).
FEATURE_NAMES: tuple[str, ...] = ("down1", "down2", "down3", "down4", "up1", "up2", "logits", "heatmaps")


def init_autolink_weights(module: nn.Module) -> None:
    """AutoLink's init: Kaiming-normal (a=0.2, fan_in, leaky_relu) on every Conv2d/Linear weight,
    zero biases; BatchNorm keeps PyTorch's defaults."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def coordinate_grid(size: int, *, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Pixel-centre coordinates of a ``size``×``size`` map in normalised units.

    Returns ``(size, size, 2)``: ``grid[row, col] = (x, y)`` with ``x = linspace(-1, 1, size)[col]``
    and ``y = linspace(-1, 1, size)[row]`` (±1 at the centres of the first/last pixel,
    docs/conventions.md). Component 0 is x, which is where we differ from AutoLink's (row, col).
    """
    line = torch.linspace(-1.0, 1.0, size, device=device, dtype=dtype)
    ys, xs = torch.meshgrid(line, line, indexing="ij")  # each (size, size)
    return torch.stack((xs, ys), dim=-1)  # (size, size, 2) = (x, y)


def soft_argmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Spatial softmax (temperature 1, as AutoLink) followed by the expected coordinate.

    ``logits``: ``(B, K, h, w)`` with ``h == w``.
    Returns ``(keypoints, heatmaps)``: keypoints ``(B, K, 2)`` as (x, y) in [-1, 1];
    heatmaps ``(B, K, h, w)``, each map non-negative and summing to 1.
    """
    b, k, h, w = logits.shape
    if h != w:
        raise ValueError(f"soft_argmax expects square heatmaps, got {h}x{w}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        heatmaps = F.softmax(logits.float().reshape(b, k, h * w), dim=-1).reshape(b, k, h, w)
    return expected_coordinates(heatmaps), heatmaps


def expected_coordinates(heatmaps: Tensor) -> Tensor:
    """The expected (x, y) of each map of ``heatmaps`` ``(B, K, h, h)`` (non-negative, each summing to 1) on
    :func:`coordinate_grid`: ``(B, K, 2)`` in [-1, 1]."""
    b, k, h, w = heatmaps.shape
    # float32 even under autocast: a fp16/bf16 matmul would round keypoints to ~1/4 px at 128.
    with torch.autocast(device_type=heatmaps.device.type, enabled=False):
        grid = coordinate_grid(h, device=heatmaps.device).reshape(h * w, 2)  # (h*w, 2)
        return heatmaps.float().reshape(b, k, h * w) @ grid  # (B, K, 2)


class ResDownBlock(nn.Module):
    """Residual block that halves the resolution by bilinear interpolation (AutoLink's ``ResBlock``).

    Submodule layout (``conv_res``/``net`` Sequentials, same indices) mirrors AutoLink so that its
    checkpoints load by name.
    """

    def __init__(self, *, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_res = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=0.5, mode="bilinear", align_corners=False),
            nn.BatchNorm2d(out_channels),
        )
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=0.5, mode="bilinear", align_corners=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
        )
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, Cin, H, W)`` -> ``(B, Cout, H/2, W/2)``."""
        return self.act(self.net(x) + self.conv_res(x))


class BottleneckBlock(nn.Module):
    """conv3x3-BN-LeakyReLU-conv3x3-BN plus the input, then LeakyReLU: same channels and resolution (the blocks
    ``extra_blocks`` adds to the detector; not in AutoLink)."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        return self.act(self.net(x) + x)


class UpBlock(nn.Module):
    """Bilinear ×2, conv3×3, BN, LeakyReLU (AutoLink's ``TransposedBlock``; no transposed conv)."""

    def __init__(self, *, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, Cin, H, W)`` -> ``(B, Cout, 2H, 2W)``."""
        return self.net(x)


@dataclass
class DetectorOutput:
    """What :class:`KeypointDetector` returns.

    keypoints: ``(B, K, 2)`` (x, y) in [-1, 1], ±1 at the centres of the first/last heatmap cell.
    logits: ``(B, K, h, w)`` heatmap logits before the softmax ("E7").
    heatmaps: ``(B, K, h, w)`` spatial softmax of ``logits`` ("E8"), each map sums to 1.
    features: the intermediate tensors asked for by name (see ``FEATURE_NAMES``).
    """

    keypoints: Tensor
    logits: Tensor
    heatmaps: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


class KeypointDetector(nn.Module):
    """AutoLink's detector: 4 residual down blocks (3->64->128->256->512), 2 up blocks (->128),
    a conv3×3 to K logits, spatial softmax and soft-argmax.

    The input is first resized (bilinear, ``align_corners=False``) to ``image_size``×``image_size``,
    as AutoLink does, so any input size and aspect ratio is accepted. The heatmap resolution is fixed
    by the architecture at ``image_size / 4``; ``heatmap_size`` is taken only to be checked, so a
    config that asks for something else fails at construction instead of silently meaning
    something different.
    """

    def __init__(self, *, n_keypoints: int, in_channels: int = 3, image_size: int = 128,
                 heatmap_size: int = 32, width: int = 64, extra_blocks: int = 0) -> None:
        super().__init__()
        if n_keypoints < 1:
            raise ValueError(f"n_keypoints must be >= 1, got {n_keypoints}")
        if image_size % 16 != 0 or image_size < 16:
            # Four halvings to the bottleneck: anything else would round and misalign the up path.
            raise ValueError(f"image_size must be a positive multiple of 16, got {image_size}")
        if heatmap_size != image_size // 4:
            raise ValueError(
                f"heatmap_size={heatmap_size} is not supported for image_size={image_size}: the "
                f"detector's heatmaps are image_size/4 = {image_size // 4} (AutoLink's architecture); "
                f"set heatmap_size to {image_size // 4} or change image_size")
        self.n_keypoints = n_keypoints
        self.in_channels = in_channels
        self.image_size = image_size
        self.heatmap_size = heatmap_size

        w = width  # AutoLink: 64; smaller widths make CPU presets fast, same topology
        self.width = width
        self.down1 = ResDownBlock(in_channels=in_channels, out_channels=w)  # S/2
        self.down2 = ResDownBlock(in_channels=w, out_channels=2 * w)  # S/4
        self.down3 = ResDownBlock(in_channels=2 * w, out_channels=4 * w)  # S/8
        self.down4 = ResDownBlock(in_channels=4 * w, out_channels=8 * w)  # S/16
        if extra_blocks < 0:
            raise ValueError(f"extra_blocks must be >= 0, got {extra_blocks}")
        # A deeper detector for architecture studies: residual blocks at the S/16 bottleneck, resolution kept. Only
        # created when asked for, so AutoLink's state-dict names (and its checkpoints) are unchanged at 0.
        if extra_blocks:
            self.mid = nn.Sequential(*(BottleneckBlock(channels=8 * w) for _ in range(extra_blocks)))
        self.up1 = UpBlock(in_channels=8 * w, out_channels=4 * w)  # S/8
        self.up2 = UpBlock(in_channels=4 * w, out_channels=2 * w)  # S/4
        self.head = nn.Conv2d(2 * w, n_keypoints, kernel_size=3, padding=1)
        init_autolink_weights(self)

    def forward(self, x: Tensor, return_features: Sequence[str] = ()) -> DetectorOutput:
        """Detect keypoints in ``x`` ``(B, in_channels, H, W)`` (normalised to [-1, 1]).

        Returns a :class:`DetectorOutput`; ``features`` holds exactly the names in
        ``return_features`` (any of ``FEATURE_NAMES``), each a tensor that is part of the graph.
        """
        if isinstance(return_features, str):
            return_features = (return_features,)
        unknown = [n for n in return_features if n not in FEATURE_NAMES]
        if unknown:
            raise ValueError(f"unknown detector feature(s) {unknown}; valid names: {', '.join(FEATURE_NAMES)}")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"detector expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)

        feats: dict[str, Tensor] = {}
        h = x
        for name in ("down1", "down2", "down3", "down4", "up1", "up2"):
            h = getattr(self, name)(h)
            if name == "down4" and hasattr(self, "mid"):
                h = self.mid(h)  # (B, 8w, S/16, S/16): the extra depth, before what down4 names
            feats[name] = h
        logits = self.head(h)  # (B, K, S/4, S/4)
        keypoints, heatmaps = soft_argmax(logits)
        feats["logits"] = logits
        feats["heatmaps"] = heatmaps
        return DetectorOutput(keypoints=keypoints, logits=logits, heatmaps=heatmaps,
                              features={n: feats[n] for n in return_features})
