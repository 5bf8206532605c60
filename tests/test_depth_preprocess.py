"""MiDaS preprocessing: the cheaper CPU path is run.py's bit for bit; ``depth.preprocess: device`` (decode on the
model's device, torch resize + normalise) is close to it, keyed apart from it, and falls back on the CPU.

The device path runs here on CPU tensors: the same torch ops as on CUDA (torchvision's CPU JPEG decoder instead
of nvJPEG), so what these tests check is the wiring and the arithmetic, not CUDA's decoder.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dkp_core.midas import get_spec, list_models
from dkp_core.midas.transforms import preprocess, preprocess_tensor, preprocess_u8, target_size
from tests.test_depth_stage import _FakeMidas, _frames, _run_fake

SIZES = [(24, 32), (37, 53), (300, 500), (1000, 1000)]  # (H, W): up- and downscaling, odd sizes, H36M's frames


def _run_py_preprocess(img: np.ndarray, spec) -> np.ndarray:
    """MiDaS run.py's transform as written there (and as this project's preprocess was before it got cheaper):
    float64, cv2 resize, broadcast (x - mean) / std, HWC -> CHW, float32 last."""
    img = img.astype(np.float64)
    h, w = target_size(img.shape[0], img.shape[1], spec)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
    img = (img - np.asarray(spec.mean, dtype=np.float64)) / np.asarray(spec.std, dtype=np.float64)
    return np.ascontiguousarray(np.transpose(img, (2, 0, 1))).astype(np.float32)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB: gradients (smooth) plus noise (every level), channels distinct."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), rng.integers(0, 256, (h, w))],
                    -1).astype(np.uint8)


@pytest.mark.parametrize("model_type", list_models())
def test_cpu_preprocess_is_run_py_bit_for_bit(model_type):
    spec = get_spec(model_type)
    for h, w in SIZES:
        img = _image(h, w)
        as_stage = img.astype(np.float32) / 255.0  # what the stage feeds (and fed) preprocess
        want = _run_py_preprocess(as_stage, spec)
        got_u8 = preprocess_u8(img, spec)
        assert got_u8.dtype == np.float32 and got_u8.flags["C_CONTIGUOUS"] and got_u8.shape == want.shape
        np.testing.assert_array_equal(got_u8, want)
        np.testing.assert_array_equal(preprocess(as_stage, spec), want)
        f64 = img / 255.0  # run.py's own float64 input
        np.testing.assert_array_equal(preprocess(f64, spec), _run_py_preprocess(f64, spec))


def test_preprocess_u8_refuses_other_inputs():
    with pytest.raises(ValueError, match="uint8"):
        preprocess_u8(np.zeros((8, 8, 3), np.float32), get_spec("dpt_levit_224"))
    with pytest.raises(ValueError, match="uint8"):
        preprocess_u8(np.zeros((8, 8), np.uint8), get_spec("dpt_levit_224"))


def test_read_rgb_gives_the_bytes_it_gave_before(tmp_path):
    """read_rgb swaps channels with cv2.cvtColor now: the same bytes as the strided numpy copy it replaced."""
    from pipeline.data.images import read_rgb

    img = _image(21, 34)  # RGB
    rgba = np.concatenate([img, np.full((21, 34, 1), 7, np.uint8)], -1)
    cases = {"rgb.png": (img[:, :, ::-1], img), "rgba.png": (rgba[:, :, [2, 1, 0, 3]], img),
             "gray.png": (img[:, :, 0], np.repeat(img[:, :, :1], 3, axis=2))}
    for name, (on_disk, want) in cases.items():
        cv2.imwrite(str(tmp_path / name), np.ascontiguousarray(on_disk))
        got = read_rgb(tmp_path / name)
        assert got.dtype == np.uint8 and got.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_jpeg_header_reads_size_components_and_depth_without_decoding():
    from pipeline.data.images import jpeg_header

    img = _image(37, 53)
    for params in ([], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]):
        raw = cv2.imencode(".jpg", img, params)[1].ravel()
        assert jpeg_header(raw) == (37, 53, 3, 8)
        assert jpeg_header(raw[:200]) == (37, 53, 3, 8)  # the header is at the start
    assert jpeg_header(cv2.imencode(".jpg", img[:, :, 0])[1].ravel()) == (37, 53, 1, 8)
    assert jpeg_header(cv2.imencode(".png", img)[1].ravel()) is None
    assert jpeg_header(np.frombuffer(b"\xff\xd8\xff", np.uint8)) is None
    assert jpeg_header(np.frombuffer(b"\xff\xd8\xff\xe0\x00\x10JFIF", np.uint8)) is None  # cut before SOF


@pytest.mark.parametrize("model_type", ["dpt_levit_224", "dpt_swin2_tiny_256", "dpt_beit_base_384",
                                        "dpt_beit_large_512"])
def test_device_preprocess_is_close_to_run_py(model_type):
    """float32 torch bicubic with cv2 INTER_CUBIC's kernel: close to run.py's float64 (measured: at most 2.3e-4
    of the [-1, 1] input range, mean <= 6e-6, at 1000 px -> 224 / 384; ~5e-7 where the scale is kind to
    cv2's coefficient tables). Even float64 torch differs from cv2 by up to 9e-5 there: cv2's weights are
    not computed exactly at every position."""
    spec = get_spec(model_type)
    for h, w in SIZES:
        img = _image(h, w)
        want = _run_py_preprocess(img.astype(np.float32) / 255.0, spec)
        got = preprocess_tensor(torch.from_numpy(img).permute(2, 0, 1)[None].repeat(2, 1, 1, 1), spec)
        assert got.dtype == torch.float32 and got.shape == (2, *want.shape)
        for k in range(2):
            np.testing.assert_allclose(got[k].numpy(), want, rtol=0, atol=5e-4)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_tensor(torch.zeros(1, 3, 8, 8), spec)


# ------------------------------------------------------------------------------------------------ the stage
def _jpeg_and_png_dataset(root: Path, sizes, png: tuple = ()) -> None:
    (root / "images").mkdir(parents=True)
    for k, (h, w) in enumerate(sizes):
        ext = ".png" if k in png else ".jpg"
        cv2.imwrite(str(root / "images" / f"im{k}{ext}"), _image(h, w, seed=k)[:, :, ::-1].copy())


SIZES_STAGE = [(48, 64), (48, 64), (64, 48), (48, 64), (96, 128)]  # BEiT: (288, 384) x 4 frames, (384, 288) x 1


def _stage(tmp_path, monkeypatch, preprocess_option: str, **kw):
    root = tmp_path / "data"
    if not root.exists():
        _jpeg_and_png_dataset(root, SIZES_STAGE, png=(3,))
    fake = _FakeMidas()
    cache, out = _run_fake(tmp_path, monkeypatch, fake, sizes=None, shard_size=5, batch_size_inference=8,
                           storage_dtype="float32", preprocess=preprocess_option, **kw)
    return cache, fake, out


def test_device_preprocess_through_the_stage(tmp_path, monkeypatch):
    """JPEGs decoded by torchvision, the PNG by OpenCV in the worker; same batches and depth within float32
    rounding of the CPU path; the cache spec says which path made it (the default's spec is unchanged)."""
    cpu, fake_cpu, _ = _stage(tmp_path, monkeypatch, "cpu")
    dev, fake_dev, _ = _stage(tmp_path, monkeypatch, "device")
    assert sorted(c["shape"] for c in fake_dev.calls) == sorted(c["shape"] for c in fake_cpu.calls) == [
        (1, 3, 384, 288), (4, 3, 288, 384)]
    a, b = _frames(cpu), _frames(dev)
    assert [f[:2] for f in a] == [f[:2] for f in b] == [(f"im{k}", True) for k in range(5)]
    for (_, _, x), (_, _, y), hw in zip(a, b, SIZES_STAGE):
        assert x.shape == y.shape == hw and x.std() > 0
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-4 * np.abs(x).max())
    spec_cpu = json.loads((cpu / "artifact.json").read_text())["cache_spec"]
    spec_dev = json.loads((dev / "artifact.json").read_text())["cache_spec"]
    assert "preprocess" not in spec_cpu and spec_dev["preprocess"] == "device"
    assert {k: v for k, v in spec_dev.items() if k != "preprocess"} == spec_cpu


def test_device_decode_failure_falls_back_to_opencv_then_skips(tmp_path, monkeypatch):
    """A JPEG the device decoder refuses is decoded by OpenCV (same values as the CPU path); one nobody can
    decode is a named error, or with --skip-bad-frames an invalid frame."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    refused = []

    def picky(data, **kw):  # refuses im1 (and so any batch holding it)
        items = data if isinstance(data, list) else [data]
        if any(len(t) == len(picky.im1) and bool((t == picky.im1).all()) for t in items):
            refused.append(len(items))
            raise RuntimeError("nvjpeg: unsupported (test)")
        return real(data, **kw)

    cpu, _, _ = _stage(tmp_path, monkeypatch, "cpu")
    picky.im1 = torch.from_numpy(np.fromfile(tmp_path / "data" / "images" / "im1.jpg", np.uint8))
    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    dev, _, _ = _stage(tmp_path, monkeypatch, "device")
    assert refused == [3, 1]  # the batch of the three (288, 384) JPEGs, then im1 alone
    np.testing.assert_allclose(_frames(dev)[1][2], _frames(cpu)[1][2], rtol=0, atol=1e-4)

    # im2: a valid header and end marker around garbage: neither decoder can read it
    p = tmp_path / "data" / "images" / "im2.jpg"
    raw = p.read_bytes()
    sos = raw.index(b"\xff\xda")
    p.write_bytes(raw[:sos] + b"\x00" * 64 + b"\xff\xd9")
    from pipeline.errors import ManifestError

    with pytest.raises(ManifestError, match="im2"):
        _stage(tmp_path, monkeypatch, "device", options=None)
    skipped, _, _ = _stage(tmp_path, monkeypatch, "device", options={"skip_bad_frames": True})
    rec = json.loads((skipped / "artifact.json").read_text())
    assert [s["frame"] for s in rec["skipped_frames"]] == ["im2"] and "im2.jpg" in rec["skipped_frames"][0]["reason"]
    assert [v for _, v, _ in _frames(skipped)] == [True, True, False, True, True]


def test_preprocess_enters_the_depth_key_only_when_it_changes_values(tmp_path):
    """cpu (the default) leaves the depth key exactly as before the option existed; device changes it; the
    files provider never reads it."""
    from pipeline import config as C
    from pipeline.store.artifacts import Store, artifact_key
    from pipeline.config import load_config
    from pipeline.graph import build_plan

    root = tmp_path / "data"
    _jpeg_and_png_dataset(root, SIZES_STAGE[:2])
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"stand-in weights")
    y = tmp_path / "e.yaml"
    y.write_text(json.dumps({"name": "e", "data": {"manifest": "folder", "root": str(root)},
                             "depth": {"provider": "midas", "model_type": "dpt_levit_224", "weights": str(weights)}}))

    def depth(*sets):  # on the CPU, where preprocess auto is cpu (tests/test_golden_keys.py: auto on CUDA)
        cfg = load_config(str(y), ["depth.device=cpu", *sets])
        return build_plan(cfg, Store(tmp_path / "store"), progress=False).stages["depth"], cfg

    cpu, cfg = depth()
    explicit, _ = depth("depth.preprocess=cpu")
    dev, _ = depth("depth.preprocess=device")
    assert cpu.key == explicit.key != dev.key
    assert "preprocess" not in cpu.inputs["config"] and dev.inputs["config"]["preprocess"] == "device"
    # the key the code computed before depth.preprocess existed: the same semantic fields without it (and without
    # tf32, which came later and stays out of the key at its default, and degrade, which only the teacher reads;
    # tests/test_golden_keys.py pins literals)
    old_sem = {k: v for k, v in C.semantic_dict(cpu.settings.config).items() if k not in ("preprocess", "tf32", "degrade")}
    old_sem["weights_sha256"] = cpu.inputs["config"]["weights_sha256"]
    assert artifact_key("depth", old_sem, cpu.inputs["upstream"], cpu.inputs["fingerprint"], schema=1) == cpu.key
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="depth.preprocess: 'gpu' is not one of auto, cpu, device"):
        load_config(str(y), ["depth.preprocess=gpu"])


def test_files_provider_key_ignores_preprocess(tiny_experiment):
    from tests.test_depth_stage import _plan, _synth

    _synth(tiny_experiment)
    _, default = _plan(tiny_experiment)
    _, device = _plan(tiny_experiment, None, "depth.preprocess=device")
    assert default["depth"].key == device["depth"].key and "preprocess" not in device["depth"].inputs["config"]
