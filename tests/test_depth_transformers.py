"""depth.provider: transformers (issue 26): tiny random DPT (BEiT backbone, MiDaS 3.1's layout) and Depth Anything V2
folders written with save_pretrained here; the depth cache equals transformers' own pipeline("depth-estimation")
on the same frames (<= 1e-4 relative, fp32 CPU); what the output means, the weights, config and processor are in
the key; a missing folder or a model that is not depth estimation is a clear error."""
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from pipeline.errors import ConfigError  # noqa: E402
from tests.conftest import quiet_console, torch_threads  # noqa: E402

SIZES = [(40, 70), (48, 48), (52, 36)]  # (H, W): three network shapes, non-square


def _varied(model):
    """Random weights large enough that the depth map varies over the frame (the default init gives a map flat to
    1e-9, which would make the parity test a test of one number)."""
    import torch

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p[0].numel() ** 0.5))
        last = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.weight.abs_()  # the head ends in ReLU (or a sigmoid): positive weights on ReLU features keep it alive
        last.bias.fill_(0.1)
    return model


def _dpt(folder: Path) -> Path:
    import torch
    from transformers import BeitConfig, DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    bb = BeitConfig(image_size=64, patch_size=16, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                    intermediate_size=32, use_relative_position_bias=True, reshape_hidden_states=False,
                    out_features=["stage1", "stage2", "stage3", "stage4"])
    _varied(DPTForDepthEstimation(DPTConfig(backbone_config=bb, neck_hidden_sizes=[8, 8, 16, 16],
                                            fusion_hidden_size=8))).save_pretrained(folder)
    DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=True, ensure_multiple_of=16,
                      resample=2).save_pretrained(folder)
    return folder


def _depth_anything(folder: Path, metric: bool = False) -> Path:
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(1)
    bb = Dinov2Config(image_size=56, patch_size=14, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                      intermediate_size=32, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    extra = {"depth_estimation_type": "metric", "max_depth": 20} if metric else {}
    _varied(DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=bb, patch_size=14, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=8, head_hidden_size=4, **extra))).save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def _frames(root: Path) -> list[np.ndarray]:
    import cv2

    rng = np.random.default_rng(0)
    imgs = []
    for k in range(7):
        h, w = SIZES[k % 3]
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 5 + k * 9) % 256, (yy * 7) % 256, rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
        (root / "images").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / f"f{k}.png"), img[:, :, ::-1])
        imgs.append(img)
    return imgs


def _yaml(tmp_path: Path, root: Path, folder: Path, **depth) -> str:
    import yaml

    d = {"provider": "transformers", "weights": str(folder), "storage_dtype": "float32", "shard_size": 4,
         "batch_size_inference": 2, "num_workers": 0, **depth}
    y = tmp_path / f"hf-{folder.name}.yaml"
    y.write_text(yaml.safe_dump({"base": "synthetic", "name": "hf", "data": {"manifest": "folder", "root": str(root)},
                                 "depth": d}))
    return str(y)


def _reference(folder: Path, imgs) -> list[np.ndarray]:
    """transformers' own pipeline on each frame: predicted_depth at the frame's size."""
    from PIL import Image
    from transformers import pipeline

    from pipeline.stages.depth.hf import load_processor

    pipe = pipeline("depth-estimation", model=str(folder), image_processor=load_processor(folder), device="cpu")
    return [pipe(Image.fromarray(im))["predicted_depth"].float().numpy() for im in imgs]


def _cache(plan) -> list[np.ndarray]:
    from pipeline.depth_cache import DepthCacheReader

    with DepthCacheReader(plan.stages["depth"].path) as r:
        return [r.read(i) for i in range(len(r))]


def _run(y: str, store: Path):
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    with torch_threads(1):
        return run_pipeline(load_config(y), str(store), until="depth", console=quiet_console())


@pytest.mark.parametrize("make", [_dpt, _depth_anything], ids=["dpt-beit", "depth-anything-v2"])
def test_cache_equals_transformers_pipeline(tmp_path, make):
    import json

    from pipeline.config import load_config
    from pipeline.stages.depth.identity import expected_spec

    folder = make(tmp_path / make.__name__.strip("_"))
    imgs = _frames(tmp_path / "data")
    y = _yaml(tmp_path, tmp_path / "data", folder, num_workers=2)
    plan = _run(y, tmp_path / "store")
    spec = json.loads((plan.stages["depth"].path / "artifact.json").read_text())["cache_spec"]
    assert spec == expected_spec(load_config(y), plan.manifest)  # what `cache import --config` checks
    assert spec["provider"] == "transformers" and spec["output_meaning"] == "relative_inverse_depth"
    assert spec["processor_backend"] == "pil" and "ensure_multiple_of" in spec["processor_json"]
    got, ref = _cache(plan), _reference(folder, imgs)
    assert len(got) == 7
    for k, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape == imgs[k].shape[:2]
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), (k, np.abs(a - b).max(), np.abs(b).max())
    for b in ref:  # a random model whose depth varies over the frame: the comparison is of maps, not of one number
        assert np.ptp(b) > 0.05 * np.abs(b).max(), (np.ptp(b), np.abs(b).max())
    rec = plan.stages["depth"].inputs["config"]
    assert rec["weights_sha256"].startswith("sha256:") and rec["transformers"]["output_meaning"] == \
        "relative_inverse_depth"
    assert rec["transformers"]["processor"]["ensure_multiple_of"] in (14, 16)
    assert rec["transformers"]["config"]["model_type"] in ("dpt", "depth_anything")


def test_metric_depth_is_stored_as_its_inverse(tmp_path):
    folder = _depth_anything(tmp_path / "da-metric", metric=True)
    imgs = _frames(tmp_path / "data")[:3]
    for p in sorted((tmp_path / "data" / "images").glob("*.png"))[3:]:
        p.unlink()
    plan = _run(_yaml(tmp_path, tmp_path / "data", folder), tmp_path / "store")
    assert plan.stages["depth"].inputs["config"]["transformers"]["output_meaning"] == "metric_depth"
    for a, b in zip(_cache(plan), _reference(folder, imgs)):
        want = np.where(b > 0, 1.0 / np.maximum(b, 1e-12), np.nan)
        np.testing.assert_allclose(a, want, rtol=1e-4, atol=0)


def test_key_follows_weights_config_and_processor(tmp_path):
    import json
    import shutil

    from pipeline.config import load_config
    from pipeline.graph import build_plan
    from pipeline.store.artifacts import Store

    folder = _dpt(tmp_path / "dpt")
    _frames(tmp_path / "data")

    def key(f):
        return build_plan(load_config(_yaml(tmp_path, tmp_path / "data", f)), Store.from_option(str(tmp_path / "s")),
                          progress=False).stages["depth"].key

    base = key(folder)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert key(copy) == base  # the folder's content, not its path
    p = json.loads((copy / "preprocessor_config.json").read_text())
    p["resample"] = 3
    (copy / "preprocessor_config.json").write_text(json.dumps(p))
    assert key(copy) != base  # a processor setting
    shutil.copy(folder / "preprocessor_config.json", copy / "preprocessor_config.json")
    assert key(copy) == base
    _dpt(tmp_path / "other")  # same architecture, same seed: same weights
    c = json.loads((copy / "config.json").read_text())
    c["neck_ignore_stages"] = [0]
    (copy / "config.json").write_text(json.dumps(c))
    assert key(copy) != base  # a config field
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copy(folder / "config.json", copy / "config.json")
    w = load_file(str(copy / "model.safetensors"))
    name = sorted(w)[0]
    w[name] = w[name] + 1
    save_file(w, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert key(copy) != base  # the weights
    assert torch.is_tensor(w[name])


def test_missing_or_wrong_folders_are_clear_errors(tmp_path):
    import json

    from transformers import ViTConfig, ViTModel

    _frames(tmp_path / "data")
    with pytest.raises(ConfigError, match="depth.weights .*no such folder.*save_pretrained"):
        _run(_yaml(tmp_path, tmp_path / "data", tmp_path / "nowhere"), tmp_path / "s1")
    vit = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=16)).save_pretrained(vit)
    (vit / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "ViTImageProcessor"}))
    with pytest.raises(ConfigError, match=r"not a depth-estimation model \(model_type 'vit'"):
        _run(_yaml(tmp_path, tmp_path / "data", vit), tmp_path / "s2")
    dpt = _dpt(tmp_path / "noproc")
    (dpt / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match="no preprocessor_config.json in it"):
        _run(_yaml(tmp_path, tmp_path / "data", dpt), tmp_path / "s3")
    for s in ("s1", "s2", "s3"):  # refused before anything was written
        assert not list((tmp_path / s).glob("depth/*"))
