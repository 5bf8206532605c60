"""Losses: reconstruction (VGG16 perceptual as AutoLink, or weight-free: multi-scale L1+SSIM, plain L1, MSE) and
the Distill-DKP distillation term (research/paper_autolink.md §1.0, §1.4, §2.7).

No file I/O here: the VGG16 weights come in as a state dict (``pipeline.weights.vgg`` loads them).
"""
from __future__ import annotations

import warnings
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# relu1_2, relu2_2, relu3_3, relu4_3 of torchvision's vgg16().features (AutoLink's slices).
VGG_SLICES: tuple[tuple[int, int], ...] = ((0, 4), (4, 9), (9, 16), (16, 23))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _vgg16_features(vgg_state_dict: Mapping[str, Tensor] | None) -> nn.Sequential:
    """``vgg16().features[:23]`` with the given weights (torchvision's ``vgg16-397923af.pth`` key
    layout, ``features.N.weight``/``bias``; classifier keys are ignored) or random weights."""
    import torchvision  # heavy import, only where the perceptual loss is built

    # Built on the meta device: the classifier (~124 M parameters) is never allocated or
    # initialised, which matters on CPU.
    with torch.device("meta"):
        full = torchvision.models.vgg16(weights=None)
    features = full.features[:VGG_SLICES[-1][1]]
    features = features.to_empty(device="cpu")
    if vgg_state_dict is None:
        for m in features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        return features
    wanted = {k for k in features.state_dict()}
    sub = {k[len("features."):]: v for k, v in vgg_state_dict.items()
           if k.startswith("features.") and k[len("features."):] in wanted}
    missing = sorted(wanted - set(sub))
    if missing:
        raise ValueError(f"VGG16 state dict lacks {len(missing)} feature weights (e.g. 'features.{missing[0]}'); "
                         "expected torchvision's vgg16 layout (vgg16-397923af.pth)")
    for k, v in sub.items():
        shape = features.state_dict()[k].shape
        if v.shape != shape:
            raise ValueError(f"VGG16 state dict: 'features.{k}' has shape {tuple(v.shape)}, expected {tuple(shape)}")
    features.load_state_dict(sub, strict=True)
    return features


class PerceptualLoss(nn.Module):
    """AutoLink's VGG16 perceptual loss: sum over relu1_2, relu2_2, relu3_3, relu4_3 of the mean
    absolute feature difference, equal weights.

    Inputs ``(B, C, H, W)`` in [-1, 1] with C = 3 (C = 1 is repeated to 3) are mapped to [0, 1],
    ImageNet-normalised and bilinearly resized to 224×224. The VGG is frozen and always in eval
    mode (``train()`` does not change that). ``vgg_state_dict=None`` gives a randomly initialised
    VGG: only for tests, a warning says so. Returns a scalar tensor.
    """

    def __init__(self, vgg_state_dict: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        if vgg_state_dict is None:
            warnings.warn("PerceptualLoss built with random VGG16 weights: fine for tests, meaningless for training",
                          stacklevel=2)
        self.pretrained = vgg_state_dict is not None
        features = _vgg16_features(vgg_state_dict)
        self.blocks = nn.ModuleList(features[a:b] for a, b in VGG_SLICES)
        for p in self.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        super().train(False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        # Frozen feature extractor: stays in eval whatever the owning module does.
        return super().train(False)

    def _prepare(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"PerceptualLoss expects 1 or 3 channels, got {tuple(x.shape)}")
        x = ((x + 1) / 2 - self.mean) / self.std
        return F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Scalar loss between ``prediction`` and ``target`` (same shape); gradients reach
        ``prediction`` only."""
        x = self._prepare(prediction)
        with torch.no_grad():
            y = self._prepare(target)
            y_feats = []
            for block in self.blocks:
                y = block(y)
                y_feats.append(y)
        loss = x.new_zeros(())
        for block, yf in zip(self.blocks, y_feats):
            x = block(x)
            loss = loss + F.l1_loss(x, yf)
        return loss


def _ssim_map(x: Tensor, y: Tensor) -> Tensor:
    """Per-pixel SSIM of images in [0, 1] over 3×3 windows (reflection padded), ``(B, C, H, W)``."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    x = F.pad(x, (1, 1, 1, 1), mode="reflect")
    y = F.pad(y, (1, 1, 1, 1), mode="reflect")
    mu_x = F.avg_pool2d(x, 3, 1)
    mu_y = F.avg_pool2d(y, 3, 1)
    var_x = F.avg_pool2d(x * x, 3, 1) - mu_x ** 2
    var_y = F.avg_pool2d(y * y, 3, 1) - mu_y ** 2
    cov = F.avg_pool2d(x * y, 3, 1) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)
    return num / den


class MultiScaleL1SSIM(nn.Module):
    """Weight-free reconstruction loss for offline use (no VGG download): at ``scales`` resolutions
    (2×2 average pooling between them), ``ssim_weight · (1 - SSIM)/2 + (1 - ssim_weight) · L1``,
    averaged over pixels and scales. SSIM uses 3×3 windows, computed on [0, 1] images; L1 on the
    [-1, 1] inputs mapped to [0, 1]. Identical images give 0. Returns a scalar tensor.
    """

    def __init__(self, scales: int = 3, ssim_weight: float = 0.85) -> None:
        super().__init__()
        if scales < 1 or not 0.0 <= ssim_weight <= 1.0:
            raise ValueError(f"need scales >= 1 and ssim_weight in [0, 1], got {scales}, {ssim_weight}")
        self.scales = scales
        self.ssim_weight = float(ssim_weight)

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        x = (prediction.float() + 1) / 2
        y = (target.float() + 1) / 2
        total = x.new_zeros(())
        for s in range(self.scales):
            if s:
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            if min(x.shape[-2:]) < 2:
                raise ValueError(f"image too small for {self.scales} scales: {tuple(prediction.shape[-2:])}")
            l1 = (x - y).abs().mean()
            dssim = ((1 - _ssim_map(x, y)) / 2).clamp(0, 1).mean()
            total = total + self.ssim_weight * dssim + (1 - self.ssim_weight) * l1
        return total / self.scales


class PixelLoss(nn.Module):
    """Plain per-pixel reconstruction loss, the simplest weight-free baseline: mean ``|x - y|``
    (``norm="l1"``) or mean ``(x - y)²`` (``norm="mse"``) of the [-1, 1] inputs mapped to [0, 1],
    single scale. Identical images give 0. Returns a scalar tensor.
    """

    def __init__(self, norm: str = "l1") -> None:
        super().__init__()
        if norm not in ("l1", "mse"):
            raise ValueError(f"norm must be 'l1' or 'mse', got {norm!r}")
        self.norm = norm

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        d = (prediction.float() - target.float()) / 2  # difference of the [0, 1] images
        return d.abs().mean() if self.norm == "l1" else (d * d).mean()


DISTILLATION_FLATTENS = ("sample", "keypoint", "location", "attention")


def attention_map(features: Tensor) -> Tensor:
    """Attention transfer's spatial map (Zagoruyko & Komodakis, 2017): the channel mean of the squared activations,
    ``(B, C, *spatial)`` -> ``(B, L)`` with L the number of locations. It has no channel axis, so models of any
    widths compare."""
    b = features.shape[0]
    return features.float().pow(2).mean(dim=1).reshape(b, -1)  # (B, L)


def distillation_loss(student: Tensor, teacher: Tensor, *, flatten: str = "sample") -> Tensor:
    """Distill-DKP's term: mean over the batch of ``1 - cos(student, teacher)``, in [0, 2].

    Written ``1 - cos`` (not ``-cos``): same gradient, but 0 at a perfect match. The teacher is a
    target: it is detached. Both tensors ``(B, C, *spatial)`` of the same shape; ``flatten``:
      - ``"sample"``: one cosine per sample over the whole flattened tensor (the default reading);
      - ``"keypoint"``: one cosine per channel (keypoint map) over its spatial values, averaged;
      - ``"location"``: one cosine per spatial location over the channels, averaged;
      - ``"attention"``: one cosine per sample between the :func:`attention_map` s (where the activations are
        strong), so the channel counts may differ (same batch and spatial shape). For unit-norm maps
        ``1 - cos`` is half attention transfer's squared distance.
    Returns a scalar tensor.
    """
    if flatten == "attention":
        if student.ndim < 3 or student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(f"attention distillation needs (B, C, *spatial) tensors of one batch and spatial shape, "
                             f"got {tuple(student.shape)} and {tuple(teacher.shape)}")
        cos = F.cosine_similarity(attention_map(student), attention_map(teacher.detach()), dim=1)  # (B,)
        return (1 - cos).mean()
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} embeddings differ in shape")
    if flatten not in DISTILLATION_FLATTENS:
        raise ValueError(f"unknown flatten {flatten!r}; valid: {', '.join(DISTILLATION_FLATTENS)}")
    s = student.float()
    t = teacher.detach().float()
    b = s.shape[0]
    if flatten == "sample":
        cos = F.cosine_similarity(s.reshape(b, -1), t.reshape(b, -1), dim=1)  # (B,)
    else:
        if s.ndim < 3:
            raise ValueError(f"flatten={flatten!r} needs (B, C, *spatial) tensors, got {tuple(s.shape)}")
        s3 = s.reshape(b, s.shape[1], -1)  # (B, C, L)
        t3 = t.reshape(b, t.shape[1], -1)  # (B, C, L)
        dim = 2 if flatten == "keypoint" else 1
        cos = F.cosine_similarity(s3, t3, dim=dim)  # (B, C) or (B, L)
    return (1 - cos).mean()


def keypoint_distillation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over batch and keypoints of the squared distance between ``(B, K, 2)`` keypoints (the teacher's
    detached): the coordinate term ``distill.keypoint_weight`` adds to the cosine. Returns a scalar tensor."""
    if student.shape != teacher.shape or student.ndim != 3 or student.shape[-1] != 2:
        raise ValueError(f"keypoints must both be (B, K, 2), got {tuple(student.shape)} and {tuple(teacher.shape)}")
    return (student.float() - teacher.detach().float()).pow(2).sum(-1).mean()


RECONSTRUCTION_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "perceptual": PerceptualLoss,
    "l1ssim": MultiScaleL1SSIM,
    "l1": lambda: PixelLoss("l1"),
    "mse": lambda: PixelLoss("mse"),
}


def make_reconstruction_loss(name: str, **kwargs) -> nn.Module:
    """Build a reconstruction loss by name (``"perceptual"`` needs ``vgg_state_dict=``)."""
    try:
        factory = RECONSTRUCTION_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown reconstruction loss {name!r}; valid: {', '.join(sorted(RECONSTRUCTION_LOSSES))}") from None
    return factory(**kwargs)
