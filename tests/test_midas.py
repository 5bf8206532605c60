"""MiDaS 3.1 on timm >= 1.0: registry, official-checkpoint loading, parity, transforms.

Parity fixtures (../shared/fixtures/midas, made with the official MiDaS code on timm 0.6.13)
are optional: tests that need them skip when ../shared (beside the checkout) is absent. Models without
fixtures (BEiT-L, Swin-L/B, Swin2-L/B, ViT-L, hybrid) are checked on the meta device (shapes, key
counts), which builds them in about a second without memory; ViT/hybrid and BEiT block walks are
also checked on tiny real models against timm's own forward.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dkp_core.midas import create_model, get_spec, list_models, load_official_state_dict
from dkp_core.midas.families.beit import BeitBackbone, beit_relative_position_index
from dkp_core.midas.families.vit import VitBackbone
from dkp_core.midas.transforms import postprocess, preprocess, target_size

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "midas"
FIXTURE_MODELS = ("dpt_levit_224", "dpt_swin2_tiny_256", "dpt_beit_base_384")
ATOL = 1e-4  # fp32 CPU; the official code re-run on the same weights differs by <= 1.8e-5

# Official checkpoint key counts (derived buffers and unused heads included), counted by
# instantiating the official code on timm 0.6.13 (research/midas.md §2.1), and what our model
# leaves out of them: derived buffers + ImageNet head(s) + the deepest fusion block's RCU1 (4).
OFFICIAL_KEYS = {  # model: (official keys, derived, ignored head keys)
    "dpt_beit_large_512": (487, 24, 2), "dpt_beit_large_384": (487, 24, 2),
    "dpt_beit_base_384": (283, 12, 2), "dpt_swin2_large_384": (477, 2, 2),
    "dpt_swin2_base_384": (477, 2, 2), "dpt_swin2_tiny_256": (273, 2, 2),
    "dpt_swin_large_384": (414, 35, 2), "dpt_levit_224": (465, 14, 14),
    "dpt_large_384": (368, 0, 2), "dpt_hybrid_384": (368, 0, 2),
}

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"parity fixtures absent: {FIXTURES}")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    from tests.conftest import torch_threads

    with torch_threads(2):
        yield


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------

def test_list_models_is_the_midas31_dpt_zoo():
    assert list_models() == sorted([
        "dpt_beit_large_512", "dpt_beit_large_384", "dpt_beit_base_384", "dpt_swin2_large_384",
        "dpt_swin2_base_384", "dpt_swin2_tiny_256", "dpt_swin_large_384", "dpt_levit_224",
        "dpt_large_384", "dpt_hybrid_384"])


def test_unknown_name_lists_valid_names():
    for fn in (get_spec, create_model):
        with pytest.raises(ValueError) as e:
            fn("dpt_beit_large_1024")
        assert "dpt_beit_large_1024" in str(e.value)
        assert all(n in str(e.value) for n in list_models())


@pytest.mark.parametrize("name", list_models())
def test_spec(name):
    s = get_spec(name)
    assert s.model_type == name
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.net_w = 1  # type: ignore[misc]
    assert s.mean == (0.5, 0.5, 0.5) and s.std == (0.5, 0.5, 0.5)  # MiDaS's, not timm's ImageNet
    assert s.resize_method == "minimal" and s.ensure_multiple_of == 32
    assert s.interpolation == "cv2.INTER_CUBIC"
    assert s.output_meaning == "relative inverse depth (larger = nearer)"
    assert s.weights_file == f"{name}.pt"
    assert s.weights_url.startswith("https://github.com/isl-org/MiDaS/releases/download/v3")
    assert s.weights_url.endswith("/" + s.weights_file)
    square = s.backbone in ("swin", "swin2", "levit")
    assert s.keep_aspect_ratio is (not square)
    assert s.resize_mode == ("square" if square else "minimal")
    assert s.net_w == s.net_h == int(name.rsplit("_", 1)[1])
    json.dumps(s.to_dict())  # travels into artifact keys and HDF5 attributes


@pytest.mark.parametrize("name", list_models())
def test_builds_and_shapes_on_meta(name):
    """Every model builds (random init, no download) and maps (B,3,H,W) -> (B,H,W).

    On the meta device: a real random-init build takes 1.4 s (swin2_tiny) to 4.5 s and 2.4 GB
    peak RSS (beit_large_512), and Swin only runs at its native 384², so real builds of all ten
    would not fit this file's time budget; the fixture models are built for real below."""
    s = get_spec(name)
    model = create_model(name, device="meta")
    sizes = [(s.net_h, s.net_w)]
    if s.keep_aspect_ratio:
        sizes.append((s.net_h - 96, s.net_w + 128))  # non-square, multiple of 32 as run.py makes it
    for h, w in sizes:
        x = torch.empty(2, 3, h, w, device="meta")
        feats = model.forward_features(x)
        assert [f.shape[1] for f in feats] == list(s.in_channels)
        if s.backbone == "levit":
            assert [tuple(f.shape[2:]) for f in feats] == [(14, 14), (7, 7), (4, 4)]
        else:
            assert [tuple(f.shape[2:]) for f in feats] == [(h // k, w // k) for k in (4, 8, 16, 32)]
        assert tuple(model(x).shape) == (2, h, w)
    official, derived, head = OFFICIAL_KEYS[name]
    assert len(model.state_dict()) == official - derived - head - 4


@pytest.mark.parametrize("name", list_models())
def test_official_key_maps_undo_each_other(name):
    """Each family's two key maps are inverses: our keys -> official names -> ours is the identity, and nothing
    is dropped on the way (no derived buffer, no ignored head in our state dict)."""
    from dkp_core.midas import convert_official_state_dict, official_layout_state_dict

    model = create_model(name, device="meta")
    official = official_layout_state_dict(model, name)
    assert not any(".reassemble." in k for k in official)  # the reassemble stage under its official name
    back, derived, ignored = convert_official_state_dict(model, official, name)
    assert list(back) == list(model.state_dict()) and derived == [] and ignored == []


def test_family_names_are_tested_only_in_their_modules():
    """dkp_core/midas/families/ holds everything that differs between backbone families; no other module of
    the package branches on a family name (``spec.backbone == "levit"``)."""
    import re

    repo = Path(__file__).resolve().parents[1]
    branch = re.compile(r"""backbone\s*(==|!=|\bin\b)\s*[("']""")
    found = [f"{p.relative_to(repo)}:{i}" for root in ("dkp_core", "pipeline") for p in sorted((repo / root).rglob("*.py"))
             if "families" not in p.parts for i, line in enumerate(p.read_text().splitlines(), 1) if branch.search(line)]
    assert found == []


def test_square_backbones_refuse_other_sizes():
    model = create_model("dpt_swin2_tiny_256", device="meta")
    with pytest.raises(ValueError, match="256x256"):
        model(torch.empty(1, 3, 256, 320, device="meta"))
    with pytest.raises(ValueError, match="multiples of 16"):
        create_model("dpt_beit_base_384", device="meta")(torch.empty(1, 3, 384, 392, device="meta"))


def test_random_init_forward_is_relative_inverse_depth():
    model = create_model("dpt_levit_224")
    assert not model.training
    with torch.inference_mode():
        y = model(torch.rand(1, 3, 224, 224) * 2 - 1)
    assert y.shape == (1, 224, 224) and y.dtype == torch.float32
    assert torch.isfinite(y).all() and (y >= 0).all()  # final ReLU


# ------------------------------------------------------------------------------------------------
# BEiT at any multiple of 16, and torch.compile
# ------------------------------------------------------------------------------------------------

def test_beit_relative_position_index_matches_timm():
    from timm.models.beit import gen_relative_position_index

    for hw in ((3, 5), (4, 4), (6, 2)):
        assert torch.equal(beit_relative_position_index(*hw), gen_relative_position_index(hw))


def _tiny_beit():
    torch.manual_seed(0)
    bb = BeitBackbone(timm_name="beit_base_patch16_224", hooks=(0, 1, 2, 3), in_channels=(8, 16, 32, 32),
                      vit_features=32, timm_kwargs=dict(depth=4, embed_dim=32, num_heads=2)).eval()
    with torch.no_grad():  # non-trivial relative position tables (timm zero-inits them)
        for blk in bb.model.blocks:
            blk.attn.relative_position_bias_table.normal_(0, 1.0)
    return bb


def test_beit_native_size_equals_timm_forward():
    """At the build size no table is resized: our block walk must equal timm's own blocks."""
    bb = _tiny_beit()
    x = torch.randn(2, 3, 224, 224)
    m = bb.model
    with torch.no_grad():
        t = m.patch_embed(x)
        t = torch.cat([m.cls_token.expand(2, -1, -1), t], dim=1)
        ref = []
        for blk in m.blocks:
            t = blk(t)
            ref.append(t)
        ours = bb(x)
        expect = [r(f, (14, 14)) for r, f in zip(bb.reassemble, ref)]
    for a, b in zip(ours, expect):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_beit_compiles_fullgraph_on_nonsquare_input():
    """fullgraph=True: no graph breaks (the numpy-int window size broke MiDaS under compile).

    aot_eager traces what inductor would compile; inductor itself costs ~35 s of CPU compile
    for this tiny model, too slow for the suite (docs/midas.md)."""
    bb = _tiny_beit()
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        ref = bb(x)
        out = torch.compile(bb, backend="aot_eager", fullgraph=True)(x)
    assert [tuple(o.shape) for o in out] == [(1, 8, 12, 20), (1, 16, 6, 10), (1, 32, 3, 5), (1, 32, 2, 3)]
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hybrid", [False, True], ids=["vit", "hybrid"])
def test_vit_walk_equals_timm_forward_intermediates(hybrid):
    """No fixture exists for dpt_large_384 / dpt_hybrid_384: at the build size (no position
    embedding resize) our token walk must equal timm's own ``forward_intermediates``."""
    torch.manual_seed(0)
    name = "vit_base_r50_s16_384" if hybrid else "vit_base_patch16_384"
    bb = VitBackbone(timm_name=name, hooks=(0, 1, 2, 3), in_channels=(256, 512, 32, 32) if hybrid else (8, 16, 32, 32),
                     vit_features=32, hybrid=hybrid,
                     timm_kwargs=dict(depth=4, embed_dim=32, num_heads=2, img_size=64)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = bb(x)
        spatial = bb.model.forward_intermediates(x, indices=[2, 3] if hybrid else [0, 1, 2, 3],
                                                 return_prefix_tokens=True, norm=False, intermediates_only=True)
        expect = []
        if hybrid:
            cnn = bb.model.patch_embed.backbone
            y = cnn.stem(x)
            expect += [cnn.stages[0](y), cnn.stages[1](cnn.stages[0](y))]
            torch.testing.assert_close(cnn.norm(cnn.stages(cnn.stem(x))), cnn(x))  # nothing hidden in cnn(x)
        for i, (grid_map, prefix) in enumerate(spatial):
            tokens = torch.cat([prefix, grid_map.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + 16, C)
            expect.append(bb.reassemble[len(expect)](tokens, (4, 4)))
    assert [tuple(o.shape) for o in ours] == [tuple(e.shape) for e in expect]
    for a, b in zip(ours, expect):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# parity against the official code (fixtures)
# ------------------------------------------------------------------------------------------------

def _make_weights_module():
    spec = importlib.util.spec_from_file_location("midas_make_weights", FIXTURES / "make_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fixture_models():
    """Lazily built {model_type: (model, official state dict, spec json)} shared by the module."""
    cache = {}

    def get(name):
        if name not in cache:
            mw = _make_weights_module()
            spec = mw.load_spec(str(FIXTURES / f"{name}.spec.json"))
            sd = mw.make_state_dict(spec, seed=0)
            model = create_model(name)
            load_official_state_dict(model, sd, name)
            cache[name] = (model, sd, spec)
        return cache[name]

    return get


def _cases():
    if not FIXTURES.is_dir():
        return [pytest.param("none", 0, marks=needs_fixtures)]
    out = []
    for name in FIXTURE_MODELS:
        io = torch.load(FIXTURES / f"{name}.io.pt", weights_only=True)
        out += [pytest.param(name, i, id=f"{name}-{c['name']}") for i, c in enumerate(io["cases"])]
    return out


# BEiT-B at 384 costs 2-7 s per image on 2 busy cores: its batch-of-2 case runs image 0 only
# (batching changes outputs by <= 2.4e-5, research §4.3) and skips the whole-batch channel stats.
FIRST_IMAGE_ONLY = {("dpt_beit_base_384", "square_b2")}


@needs_fixtures
@pytest.mark.parametrize("name,case_index", _cases())
def test_parity_with_official(fixture_models, name, case_index):
    model, _, _ = fixture_models(name)
    case = torch.load(FIXTURES / f"{name}.io.pt", weights_only=True)["cases"][case_index]
    x, expected, ref_feats = case["input"].float(), case["output"], case["features"]
    whole_batch = (name, case["name"]) not in FIRST_IMAGE_ONLY
    if not whole_batch:
        x, expected, ref_feats = x[:1], expected[:1], [f[:1] for f in ref_feats]
    with torch.inference_mode():
        y, feats = model.forward_with_features(x)
    assert y.shape == expected.shape
    assert (y - expected).abs().max().item() <= ATOL
    assert expected.std() > 0.5  # the fixture is not a trivial all-zero map
    assert len(feats) == len(ref_feats)
    for i, (f, ref) in enumerate(zip(feats, ref_feats)):
        assert list(f.shape[1:]) == list(case["feature_shapes"][i][1:])
        assert (f[:, : ref.shape[1]] - ref).abs().max().item() <= ATOL
        if whole_batch:  # channel statistics cover the channels beyond the stored first 16
            f64 = f.double()
            mean = f64.mean(dim=(0, 2, 3)).float()
            std = f64.std(dim=(0, 2, 3), correction=0).float()
            assert (mean - case["feature_channel_mean"][i]).abs().max().item() <= ATOL
            assert (std - case["feature_channel_std"][i]).abs().max().item() <= ATOL


# ------------------------------------------------------------------------------------------------
# loader: derived buffers, ignored keys, wrong checkpoints
# ------------------------------------------------------------------------------------------------

@needs_fixtures
def test_loader_accepts_derived_buffers_and_missing_unused_keys(fixture_models):
    model, sd, spec = fixture_models("dpt_levit_224")
    x = torch.load(FIXTURES / "dpt_levit_224.io.pt", weights_only=True)["cases"][0]["input"].float()[:1]
    with torch.inference_mode():
        ref = model(x)
    # As in a real official file: derived buffers present (values are architecture-determined).
    derived = {k: torch.zeros(shape, dtype=torch.int64) for k, shape, dtype, role in spec["keys"]
               if role == "derived"}
    assert len(derived) == 14
    full = dict(sd, **derived)
    # As in a stripped conversion: ImageNet heads and the unused RCU left out.
    stripped = {k: v for k, v in sd.items()
                if not k.startswith(("pretrained.model.head", "scratch.refinenet3.resConfUnit1"))}
    assert len(stripped) < len(sd)
    for variant in (full, stripped):
        other = create_model("dpt_levit_224")
        load_official_state_dict(other, variant, "dpt_levit_224")
        with torch.inference_mode():
            assert torch.equal(other(x), ref)


@needs_fixtures
def test_loader_rejects_wrong_checkpoints(fixture_models):
    _, sd_levit, _ = fixture_models("dpt_levit_224")
    model = create_model("dpt_swin2_tiny_256", device="meta")
    with pytest.raises(ValueError) as e:
        load_official_state_dict(model, sd_levit, "dpt_swin2_tiny_256")
    msg = str(e.value)
    assert "dpt_swin2_tiny_256" in msg and "missing" in msg and "unexpected" in msg
    assert "pretrained.model.layers.0.blocks.0.attn.qkv.weight" in msg or "in all" in msg

    levit = create_model("dpt_levit_224", device="meta")
    one_missing = dict(sd_levit)
    del one_missing["scratch.layer2_rn.weight"]
    with pytest.raises(ValueError, match=r"1 missing.*scratch\.layer2_rn\.weight"):
        load_official_state_dict(levit, one_missing, "dpt_levit_224")
    extra = dict(sd_levit, **{"pretrained.model.blocks.99.m.qkv.c.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 unexpected.*blocks\.99"):
        load_official_state_dict(levit, extra, "dpt_levit_224")
    reshaped = dict(sd_levit, **{"scratch.output_conv.4.weight": torch.zeros(1, 8, 3, 3)})
    with pytest.raises(ValueError, match=r"another shape.*output_conv\.4\.weight"):
        load_official_state_dict(levit, reshaped, "dpt_levit_224")


@needs_fixtures
def test_load_midas_file_side(fixture_models, tmp_path):
    from pipeline.errors import CheckpointError
    from pipeline.weights.midas import load_midas

    _, sd, _ = fixture_models("dpt_levit_224")
    path = tmp_path / "dpt_levit_224.pt"
    torch.save(sd, path)
    model, sha = load_midas("dpt_levit_224", path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    case = torch.load(FIXTURES / "dpt_levit_224.io.pt", weights_only=True)["cases"][0]
    with torch.inference_mode():
        assert (model(case["input"].float()) - case["output"]).abs().max().item() <= ATOL

    def expect(model_type, p, *needles):
        with pytest.raises(CheckpointError) as e:
            load_midas(model_type, p)
        msg = str(e.value)
        spec = get_spec(model_type)
        for s in (model_type, spec.weights_file, spec.weights_url, *needles):
            assert s in msg, (s, msg)

    expect("dpt_swin2_tiny_256", tmp_path / "nope.pt", "not found")
    expect("dpt_swin2_tiny_256", path, "not a MiDaS checkpoint", "suggests model type 'dpt_levit_224'")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a torch file")
    expect("dpt_levit_224", junk, "cannot be read")
    pickled = tmp_path / "code.pt"
    torch.save({"cfg": argparse.Namespace(a=1)}, pickled)  # weights_only refuses arbitrary classes
    expect("dpt_levit_224", pickled, "cannot be read")
    with pytest.raises(CheckpointError, match="valid: "):
        load_midas("midas_v21_small_256", path)


# ------------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw,net512,net384", [
    # (H, W) -> run.py sizes, computed with MiDaS's own Resize class (research/midas.md §1.3)
    ((1000, 1000), (512, 512), (384, 384)),
    ((256, 256), (512, 512), (384, 384)),
    ((1101, 750), (736, 512), (576, 384)),  # DeepFashion in-shop: the width is fitted
    ((1080, 1920), (512, 896), None),
    ((480, 640), (512, 672), None),
    ((192, 256), (384, 512), None),
])
def test_target_size_keep_aspect_as_run_py(hw, net512, net384):
    assert target_size(*hw, get_spec("dpt_beit_large_512")) == net512
    if net384 is not None:
        assert target_size(*hw, get_spec("dpt_beit_large_384")) == net384
    assert target_size(*hw, get_spec("dpt_swin2_tiny_256")) == (256, 256)
    assert target_size(*hw, get_spec("dpt_levit_224")) == (224, 224)


def test_preprocess_non_square():
    rng = np.random.default_rng(0)
    img = rng.random((300, 500, 3)).astype(np.float32)
    img[..., 0], img[..., 2] = 0.1, 0.9  # R and B constant: checks channel order and normalisation
    spec = get_spec("dpt_beit_base_384")
    x = preprocess(img, spec)
    # scale_w = 0.768 is closer to 1 than scale_h = 1.28: 300*0.768 = 230.4 -> 224, 500 -> 384
    assert x.shape == (3, 224, 384) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    assert x.shape[1] % 32 == 0 and x.shape[2] % 32 == 0
    np.testing.assert_allclose(x[0], -0.8, atol=1e-6)  # (0.1 - 0.5) / 0.5
    np.testing.assert_allclose(x[2], 0.8, atol=1e-6)
    import cv2

    g = cv2.resize(img[..., 1].astype(np.float64), (384, 224), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_allclose(x[1], ((g - 0.5) / 0.5).astype(np.float32), atol=1e-6)
    assert preprocess(img, get_spec("dpt_swin2_tiny_256")).shape == (3, 256, 256)
    with pytest.raises(ValueError, match="uint8"):
        preprocess((img * 255).astype(np.uint8), spec)


def test_postprocess_back_to_original_size():
    pred = torch.rand(2, 224, 384)
    out = postprocess(pred, (300, 500))
    assert out.shape == (2, 300, 500)
    ref = F.interpolate(pred[:, None], size=(300, 500), mode="bicubic", align_corners=False)[:, 0]
    assert torch.equal(out, ref)
    torch.testing.assert_close(postprocess(torch.full((1, 32, 64), 3.0), (50, 70)), torch.full((1, 50, 70), 3.0))
