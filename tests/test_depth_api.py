"""The documented Python API gives what the `depth` stage caches, frame for frame."""
import numpy as np
import pytest

from tests.test_depth_stage import _FakeMidas, _frames, _run_fake


def test_predict_inverse_depth_equals_the_stage(tmp_path, monkeypatch):
    from dkp_core.midas import get_spec, predict_inverse_depth
    from pipeline.data.images import read_rgb

    fake = _FakeMidas()
    sizes = [(24, 32), (32, 24), (48, 64), (24, 32)]
    cache, _ = _run_fake(tmp_path, monkeypatch, fake, sizes=sizes, shard_size=4, batch_size_inference=8,
                         storage_dtype="float32")
    frames = [read_rgb(tmp_path / "data" / "images" / f"{fid}.png") for fid, _, _ in _frames(cache)]
    got = predict_inverse_depth(fake, get_spec("dpt_beit_base_384"), frames, batch_size=2, device="cpu")
    cached = _frames(cache)
    assert [g.shape for g in got] == sizes
    for g, (_, valid, want) in zip(got, cached):
        assert valid
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


def test_image_to_input_refuses_float_frames():
    from dkp_core.midas import get_spec, image_to_input

    with pytest.raises(ValueError, match="uint8"):
        image_to_input(np.zeros((8, 8, 3), np.float32), get_spec("dpt_levit_224"))
