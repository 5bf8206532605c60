"""AutoLink's link (edge) map: every pair of keypoints joined by a Gaussian line segment with a
learned strength, combined by a max (research/paper_autolink.md §2.4).

Distances are in normalised [-1, 1] units on the ``linspace(-1, 1, size)`` pixel-centre grid
(docs/conventions.md), keypoints are (x, y).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkp_core.keypoints.detector import coordinate_grid


def segment_sq_distance(points: Tensor, a: Tensor, b: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Squared distance from ``points`` to the segments ``a``–``b`` (broadcasting, last dim = 2).

    Returns a tensor of the broadcast shape without the last dim, in squared input units.
    ``eps`` keeps a degenerate segment (a == b) finite: it becomes the distance to ``a``.
    """
    ab = b - a
    ap = points - a
    t = (ap * ab).sum(-1) / (ab.square().sum(-1) + eps)
    # Clamping t to [0, 1] is AutoLink's three-case rule (before a / on the segment / after b).
    t = t.clamp(0.0, 1.0)
    nearest = a + t.unsqueeze(-1) * ab
    return (points - nearest).square().sum(-1)


def _neg_sq_distance_planes(gx: Tensor, gy: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``-d²`` from grid points (``gx``, ``gy`` each (1, 1, P)) to segments ``a``–``b`` ((B, c, 2) each):
    :func:`segment_sq_distance` computed on separate x/y planes, in place where possible. Returns (B, c, P)."""
    ax, ay = a[..., 0:1], a[..., 1:2]  # (B, c, 1)
    abx, aby = b[..., 0:1] - ax, b[..., 1:2] - ay
    inv_len = 1.0 / (abx * abx + aby * aby + 1e-8)
    apx, apy = gx - ax, gy - ay  # (B, c, P)
    t = (apx * abx).add_(apy * aby).mul_(inv_len).clamp_(0.0, 1.0)
    dx = apx.sub_(t * abx)
    dy = apy.sub_(t.mul_(aby))
    return dx.mul_(dx).add_(dy.mul_(dy)).neg_()


class LinkRenderer(nn.Module):
    """Renders the link map of K keypoints: all K(K-1)/2 pairs (i < j),
    ``E(g) = max_ij softplus(sklr·θ_ij) · exp(-d_ij(g)² / thick)``.

    ``θ`` is a (K, K) parameter (only its strict upper triangle is used), initialised to
    ``(N(0, 1)/10 - 4)/sklr`` so every weight starts near softplus(-4) ≈ 0.018; ``sklr`` acts as a
    learning-rate multiplier for θ under Adam. ``thick`` is in squared normalised units
    (5e-4 ≈ a Gaussian σ of one pixel at 128).

    Memory: a dense (B, edges, size², ...) evaluation needs several GB at K=16, B=64, size=128
    once autograd keeps its intermediates. Since the gradient of a max flows only into the winning
    edge, the renderer finds the winner per pixel without autograd, edge chunk by edge chunk, then
    recomputes only the winning edge's value with autograd: peak memory is
    O(B·size²·chunk) and the values and gradients equal those of the dense max.
    """

    def __init__(self, *, n_keypoints: int, size: int = 128, thick: float = 5e-4, sklr: float = 512.0,
                 chunk_elements: int = 1 << 24) -> None:
        super().__init__()
        if n_keypoints < 2:
            raise ValueError(f"a link map needs at least 2 keypoints, got n_keypoints={n_keypoints}")
        if thick <= 0 or sklr <= 0:
            raise ValueError(f"thick and sklr must be > 0, got thick={thick}, sklr={sklr}")
        self.n_keypoints = n_keypoints
        self.size = size
        self.thick = float(thick)
        self.sklr = float(sklr)
        # Upper bound on the elements of one (B, edge chunk, size²) temporary in the search pass.
        self.chunk_elements = int(chunk_elements)
        self.theta = nn.Parameter((torch.randn(n_keypoints, n_keypoints) / 10 - 4) / self.sklr)
        i, j = torch.triu_indices(n_keypoints, n_keypoints, offset=1)  # each (E,)
        # Buffers so they follow .to(device); not persistent: they are a function of n_keypoints.
        self.register_buffer("edge_i", i, persistent=False)
        self.register_buffer("edge_j", j, persistent=False)

    @property
    def n_edges(self) -> int:
        return int(self.edge_i.numel())

    def edge_weights(self) -> Tensor:
        """Symmetric ``(K, K)`` matrix of link strengths softplus(sklr·θ), zero on the diagonal
        (for visualisation; the lower triangle mirrors the upper one)."""
        w = torch.triu(F.softplus(self.theta * self.sklr), diagonal=1)
        return w + w.transpose(0, 1)

    def forward(self, keypoints: Tensor) -> Tensor:
        """``keypoints`` ``(B, K, 2)`` (x, y) in [-1, 1] -> link map ``(B, 1, size, size)``,
        values in [0, max edge weight] (not normalised, as AutoLink)."""
        b, k, _ = keypoints.shape
        if k != self.n_keypoints:
            raise ValueError(f"LinkRenderer built for {self.n_keypoints} keypoints, got {k}")
        s2 = self.size * self.size
        kp = keypoints.float()  # distances in fp32 even under autocast: exp(-d²/5e-4) underflows in fp16
        grid = coordinate_grid(self.size, device=kp.device, dtype=kp.dtype).reshape(1, 1, s2, 2)  # (1, 1, S², 2)
        w_all = F.softplus(self.theta.float() * self.sklr)[self.edge_i, self.edge_j]  # (E,)

        # Pass 1, no autograd: the winning edge of every pixel. Compared in log space,
        # log w - d² / thick, so the search needs no exp and no pixel underflows to a tie at 0; x and y
        # are separate planes (a trailing dim of 2 makes every elementwise op strided).
        chunk = max(1, self.chunk_elements // max(1, b * s2))
        with torch.no_grad():
            gx = grid[..., 0]  # (1, 1, S²)
            gy = grid[..., 1]
            log_w = torch.log(w_all)  # (E,); softplus > 0
            best_val = torch.full((b, s2), -math.inf, device=kp.device, dtype=kp.dtype)
            best_idx = torch.zeros((b, s2), device=kp.device, dtype=torch.long)
            for start in range(0, self.n_edges, chunk):
                ei = self.edge_i[start:start + chunk]
                ej = self.edge_j[start:start + chunk]
                score = _neg_sq_distance_planes(gx, gy, kp[:, ei], kp[:, ej])  # (B, c, S²) = -d²
                score.div_(self.thick).add_(log_w[start:start + chunk].view(1, -1, 1))
                cval, cidx = score.max(dim=1)  # (B, S²) each
                better = cval > best_val  # strict: on a tie across chunks the earlier chunk keeps the pixel
                best_val = torch.where(better, cval, best_val)
                best_idx = torch.where(better, cidx + start, best_idx)

        # Pass 2, with autograd: recompute only the winning edge per pixel.
        ei = self.edge_i[best_idx]  # (B, S²)
        ej = self.edge_j[best_idx]  # (B, S²)
        a = torch.gather(kp, 1, ei.unsqueeze(-1).expand(b, s2, 2))  # (B, S², 2)
        bb = torch.gather(kp, 1, ej.unsqueeze(-1).expand(b, s2, 2))  # (B, S², 2)
        d2 = segment_sq_distance(grid.reshape(1, s2, 2), a, bb)  # (B, S²)
        value = w_all[best_idx] * torch.exp(-d2 / self.thick)  # (B, S²)
        return value.reshape(b, 1, self.size, self.size)
