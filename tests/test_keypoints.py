"""AutoLink keypoint model: shapes, the (x, y) convention, link map, masking, sizes, gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dkp_core.keypoints import (FEATURE_NAMES, AutoLink, Decoder, KeypointDetector, LinkRenderer,
                                convert_autolink_state_dict, coordinate_grid, random_block_mask,
                                soft_argmax)


# ---------------------------------------------------------------- detector

def test_detector_resizes_non_square_input_and_returns_named_features():
    torch.manual_seed(0)
    det = KeypointDetector(n_keypoints=5).eval()
    x = torch.rand(2, 3, 96, 160) * 2 - 1  # H != W and != 128: the detector resizes
    out = det(x, return_features=FEATURE_NAMES)
    assert out.keypoints.shape == (2, 5, 2)
    assert out.logits.shape == out.heatmaps.shape == (2, 5, 32, 32)
    expected = {"down1": (2, 64, 64, 64), "down2": (2, 128, 32, 32), "down3": (2, 256, 16, 16),
                "down4": (2, 512, 8, 8), "up1": (2, 256, 16, 16), "up2": (2, 128, 32, 32),
                "logits": (2, 5, 32, 32), "heatmaps": (2, 5, 32, 32)}
    assert {k: tuple(v.shape) for k, v in out.features.items()} == expected
    assert torch.equal(out.features["logits"], out.logits)
    assert torch.allclose(out.heatmaps.sum(dim=(2, 3)), torch.ones(2, 5), atol=1e-5)
    assert out.keypoints.abs().max() <= 1
    # Resizing inside == resizing outside.
    x128 = F.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False)
    assert torch.allclose(det(x128).keypoints, out.keypoints, atol=1e-6)
    # Nothing requested, nothing returned.
    assert det(x).features == {}


def test_detector_rejects_bad_arguments():
    with pytest.raises(ValueError, match="heatmap_size"):
        KeypointDetector(n_keypoints=4, image_size=128, heatmap_size=64)
    with pytest.raises(ValueError, match="multiple of 16"):
        KeypointDetector(n_keypoints=4, image_size=100, heatmap_size=25)
    det = KeypointDetector(n_keypoints=4, image_size=64, heatmap_size=16)
    with pytest.raises(ValueError, match="valid names"):
        det(torch.zeros(1, 3, 64, 64), return_features=("bottleneck",))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        det(torch.zeros(1, 1, 64, 64))


def test_soft_argmax_delta_pins_x_then_y():
    logits = torch.full((1, 2, 32, 32), -1e4)
    logits[0, 0, 10, 3] = 0.0  # row (y) 10, column (x) 3
    logits[0, 1, 0, 31] = 0.0  # top-right corner
    kp, heat = soft_argmax(logits)
    assert torch.allclose(kp[0, 0], torch.tensor([2 * 3 / 31 - 1, 2 * 10 / 31 - 1]), atol=1e-6)
    assert torch.allclose(kp[0, 1], torch.tensor([1.0, -1.0]), atol=1e-6)
    assert heat[0, 0, 10, 3] == 1.0 and heat.sum() == 2.0
    # Uniform logits -> the centre.
    kp_u, _ = soft_argmax(torch.zeros(1, 1, 32, 32))
    assert torch.allclose(kp_u, torch.zeros(1, 1, 2), atol=1e-6)


def test_coordinate_grid_component_zero_is_x():
    g = coordinate_grid(5)
    assert g.shape == (5, 5, 2)
    assert torch.allclose(g[0, :, 0], torch.linspace(-1, 1, 5))  # x varies along a row
    assert torch.allclose(g[:, 0, 1], torch.linspace(-1, 1, 5))  # y varies down a column
    assert torch.all(g[:, 2, 0] == 0.0)


def test_detector_keypoints_are_soft_argmax_of_its_logits():
    torch.manual_seed(1)
    det = KeypointDetector(n_keypoints=3, image_size=64, heatmap_size=16).eval()
    out = det(torch.randn(2, 3, 64, 64))
    kp, heat = soft_argmax(out.logits)
    assert torch.allclose(out.keypoints, kp) and torch.allclose(out.heatmaps, heat)


# ---------------------------------------------------------------- parameter counts and init

def _conv(i: int, o: int) -> int:
    return 9 * i * o + o


def _res_down(i: int, o: int) -> int:  # two convs from the input, one o->o, three BNs
    return 2 * _conv(i, o) + _conv(o, o) + 3 * 2 * o


def _expected_detector(k: int, c: int = 3) -> int:
    return (_res_down(c, 64) + _res_down(64, 128) + _res_down(128, 256) + _res_down(256, 512)
            + _conv(512, 256) + 2 * 256 + _conv(256, 128) + 2 * 128 + _conv(128, k))


def _expected_decoder(c: int = 3) -> int:
    def block(i, o):  # two convs and two BNs
        return _conv(i, o) + _conv(o, o) + 4 * o
    return (_conv(c + 1, 64) + block(64, 128) + block(128, 256) + block(256, 512) + block(512, 512)
            + block(512, 512) + block(1024, 256) + block(512, 128) + block(256, 64) + _conv(128, c))


@pytest.mark.parametrize("k, millions", [(16, 7.74), (10, 7.73)])
def test_parameter_counts_match_autolink(k, millions):
    model = AutoLink(n_keypoints=k)
    n_det = sum(p.numel() for p in model.detector.parameters())
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    n_links = sum(p.numel() for p in model.links.parameters())
    assert n_det == _expected_detector(k)
    assert round(n_det / 1e6, 2) == millions
    assert n_dec == _expected_decoder() + 1  # + alpha
    assert round((n_dec - 1) / 1e6, 2) == 17.97
    assert n_links == k * k


def test_autolink_init_kaiming_a02_and_zero_bias():
    torch.manual_seed(0)
    det = KeypointDetector(n_keypoints=4)
    w = det.down4.net[4].weight  # 512x512x3x3
    expected_std = math.sqrt(2.0 / (1 + 0.2 ** 2)) / math.sqrt(512 * 9)
    assert abs(w.std().item() / expected_std - 1) < 0.02
    assert all(torch.all(m.bias == 0) for m in det.modules() if isinstance(m, torch.nn.Conv2d))


# ---------------------------------------------------------------- link map

def _brute_force_link_map(kp: torch.Tensor, weights: torch.Tensor, size: int, thick: float) -> torch.Tensor:
    """Per pixel, per edge, AutoLink's three-case distance in plain Python floats."""
    b, k, _ = kp.shape
    line = [-1 + 2 * i / (size - 1) for i in range(size)]
    out = torch.zeros(b, 1, size, size, dtype=torch.float64)
    for n in range(b):
        for row in range(size):
            for col in range(size):
                gx, gy = line[col], line[row]
                best = 0.0
                for i in range(k):
                    for j in range(i + 1, k):
                        ax, ay = kp[n, i].tolist()
                        bx, by = kp[n, j].tolist()
                        dx, dy = bx - ax, by - ay
                        t = ((gx - ax) * dx + (gy - ay) * dy) / (dx * dx + dy * dy)
                        if t <= 0:
                            d2 = (gx - ax) ** 2 + (gy - ay) ** 2
                        elif t >= 1:
                            d2 = (gx - bx) ** 2 + (gy - by) ** 2
                        else:
                            d2 = (gx - ax - t * dx) ** 2 + (gy - ay - t * dy) ** 2
                        best = max(best, float(weights[i, j]) * math.exp(-d2 / thick))
                out[n, 0, row, col] = best
    return out


@pytest.mark.parametrize("chunk_elements", [1 << 24, 7])  # one chunk / one edge per chunk
def test_link_map_equals_brute_force(chunk_elements):
    torch.manual_seed(0)
    links = LinkRenderer(n_keypoints=4, size=9, thick=0.05, chunk_elements=chunk_elements)
    with torch.no_grad():
        links.theta.copy_(torch.randn(4, 4) / links.sklr)  # distinct weights, so the max matters
    kp = torch.rand(2, 4, 2) * 2 - 1
    got = links(kp)
    assert got.shape == (2, 1, 9, 9)
    want = _brute_force_link_map(kp, links.edge_weights().detach(), size=9, thick=0.05)
    assert torch.allclose(got.double(), want, atol=1e-6)


def test_link_map_is_x_y_not_row_col():
    links = LinkRenderer(n_keypoints=2, size=11, thick=1e-3)
    kp = torch.tensor([[[-1.0, 0.0], [1.0, 0.0]]])  # a horizontal segment through the middle row
    m = links(kp)[0, 0]
    assert torch.all(m[5] > 0.9 * m.max())  # the whole middle row lights up
    assert m[0].max() < 1e-6 * m.max()


def test_link_map_gradients_equal_dense_max():
    torch.manual_seed(0)
    k, size, thick = 5, 12, 0.02
    links = LinkRenderer(n_keypoints=k, size=size, thick=thick, chunk_elements=50)
    kp = (torch.rand(2, k, 2) * 2 - 1).requires_grad_()
    links(kp).square().sum().backward()
    g_kp, g_theta = kp.grad.clone(), links.theta.grad.clone()

    kp2 = kp.detach().clone().requires_grad_()
    links.theta.grad = None
    grid = coordinate_grid(size).reshape(1, 1, -1, 2)  # (1, 1, S², 2)
    a, b = kp2[:, links.edge_i].unsqueeze(2), kp2[:, links.edge_j].unsqueeze(2)  # (B, E, 1, 2)
    ab = b - a
    t = (((grid - a) * ab).sum(-1) / ab.square().sum(-1)).clamp(0, 1)  # (B, E, S²)
    d2 = (grid - a - t.unsqueeze(-1) * ab).square().sum(-1)
    w = F.softplus(links.theta * links.sklr)[links.edge_i, links.edge_j].view(1, -1, 1)
    dense = (w * torch.exp(-d2 / thick)).max(dim=1).values  # (B, S²)
    dense.square().sum().backward()
    assert g_theta.abs().sum() > 0
    assert torch.allclose(g_kp, kp2.grad, atol=1e-6)
    assert torch.allclose(g_theta, links.theta.grad, atol=1e-6)


def test_edge_weights_symmetric_and_initialised_near_softplus_minus_4():
    torch.manual_seed(0)
    links = LinkRenderer(n_keypoints=16)
    w = links.edge_weights()
    assert w.shape == (16, 16) and links.n_edges == 120
    assert torch.allclose(w, w.T) and torch.all(w.diagonal() == 0)
    upper = w[torch.triu_indices(16, 16, 1).unbind()]
    assert abs(upper.mean().item() - F.softplus(torch.tensor(-4.0)).item()) < 2e-3


def test_link_map_degenerate_edge_is_finite():
    links = LinkRenderer(n_keypoints=2, size=8)
    kp = torch.zeros(1, 2, 2, requires_grad=True)  # both keypoints at the centre
    m = links(kp)
    m.sum().backward()
    assert torch.isfinite(m).all() and torch.isfinite(kp.grad).all()


# ---------------------------------------------------------------- masking

def test_block_mask_ratio_blocks_and_determinism():
    g = torch.Generator().manual_seed(123)
    m = random_block_mask(64, blocks=16, ratio=0.8, size=128, generator=g, device="cpu")
    assert m.shape == (64, 1, 128, 128) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    cells = m[:, :, ::8, ::8]  # (64, 1, 16, 16): one value per 8x8 cell
    assert torch.equal(cells.repeat_interleave(8, 2).repeat_interleave(8, 3), m)  # cells are constant
    kept = cells.mean().item()
    # 16384 Bernoulli(0.2) cells: std 0.0031, so +-0.015 is ~5 sigma.
    assert abs(kept - 0.2) < 0.015
    same = random_block_mask(64, blocks=16, ratio=0.8, size=128, generator=torch.Generator().manual_seed(123))
    assert torch.equal(same, m)
    nxt = random_block_mask(64, blocks=16, ratio=0.8, size=128, generator=g)
    assert not torch.equal(nxt, m)  # the generator advanced
    # Resume from a saved state reproduces the next mask exactly.
    g2 = torch.Generator().manual_seed(5)
    state = g2.get_state()
    first = random_block_mask(2, generator=g2)
    g2.set_state(state)
    assert torch.equal(random_block_mask(2, generator=g2), first)
    assert random_block_mask(4, ratio=0.0, generator=g2).min() == 1.0  # u > 0 almost surely
    assert random_block_mask(4, ratio=1.0, generator=g2).max() == 0.0
    with pytest.raises(ValueError, match="ratio"):
        random_block_mask(1, ratio=1.5, generator=g2)


# ---------------------------------------------------------------- decoder and the full model

def test_autolink_forward_shapes_mask_and_gradients_reach_theta_and_alpha():
    torch.manual_seed(0)
    model = AutoLink(n_keypoints=4, image_size=64, heatmap_size=16, thick=2e-3)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = model(x, mask_generator=torch.Generator().manual_seed(0), return_features=("logits",))
    assert out.reconstruction.shape == (2, 3, 64, 64)
    assert out.keypoints.shape == (2, 4, 2) and out.edge_map.shape == (2, 1, 64, 64)
    assert set(out.detector_output.features) == {"logits"}
    mask = random_block_mask(2, size=64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.masked_image, x * mask)  # same generator -> same mask
    loss = (out.reconstruction - x).abs().mean()
    loss.backward()
    assert model.links.theta.grad is not None and model.links.theta.grad.abs().sum() > 0
    assert model.decoder.alpha.grad is not None and model.decoder.alpha.grad.abs() > 0
    assert model.detector.head.weight.grad.abs().sum() > 0  # through soft-argmax and the link map
    with pytest.raises(ValueError, match="resize/crop"):
        model(torch.zeros(1, 3, 48, 64), mask_generator=torch.Generator())


def test_one_channel_autolink_reconstructs_one_channel():
    model = AutoLink(n_keypoints=3, in_channels=1, image_size=32, heatmap_size=8)
    out = model(torch.zeros(1, 1, 32, 32), mask_generator=torch.Generator().manual_seed(0))
    assert out.reconstruction.shape == (1, 1, 32, 32)
    assert Decoder(in_channels=1).down0[0].in_channels == 2


def test_convert_autolink_state_dict_loads_strictly():
    model = AutoLink(n_keypoints=3)
    ours = model.state_dict()
    names = {"down1": 0, "down2": 1, "down3": 2, "down4": 3, "up1": 4, "up2": 5, "head": 6}
    theirs = {}
    for key, value in ours.items():  # AutoLink's key layout, written from its module tree
        if key.startswith("detector."):
            block, rest = key[len("detector."):].split(".", 1)
            theirs[f"encoder.detector.conv.{names[block]}.{rest}"] = value.clone()
        elif key == "links.theta":
            theirs["decoder.skeleton_scalar"] = value.clone()
        else:
            theirs[key] = value.clone()
    theirs["encoder.detector.coord"] = torch.zeros(1, 1, 1024, 2)
    theirs["vgg_loss.blocks.0.0.weight"] = torch.zeros(1)
    fresh = AutoLink(n_keypoints=3)
    fresh.load_state_dict(convert_autolink_state_dict(theirs), strict=True)
    assert torch.equal(fresh.links.theta, model.links.theta)
    assert torch.equal(fresh.detector.head.weight, model.detector.head.weight)
    with pytest.raises(KeyError, match="unexpected"):
        convert_autolink_state_dict({"generator.w": torch.zeros(1)})


def test_keypoints_stay_float32_under_autocast():
    model = AutoLink(n_keypoints=3, image_size=32, heatmap_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(1, 3, 32, 32), mask_generator=torch.Generator().manual_seed(0))
    assert out.keypoints.dtype == torch.float32 and out.edge_map.dtype == torch.float32
    assert out.reconstruction.dtype == torch.bfloat16
