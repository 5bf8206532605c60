"""`dkp-pipeline export`: the student's detector as ONNX (dynamic batch, metadata), onnxruntime = torch (issue 26)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tests.conftest import torch_threads  # noqa: E402
from tests.test_predict import ARGS, _smooth_image, _write_png  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random student (width 8, K=4, 32 px) in an artifact-like folder, exported once with the CLI."""
    from pipeline.stages.common import build_model

    d = tmp_path_factory.mktemp("export")
    torch.manual_seed(1)
    model = build_model(ARGS)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    (d / "student").mkdir()
    torch.save({"state_dict": model.state_dict(), "model_args": ARGS}, d / "student" / "model.pt")
    (d / "student" / "artifact.json").write_text(json.dumps({"stage": "distill"}))
    from click.testing import CliRunner

    from pipeline.cli import main

    with torch_threads(1):  # in this process: a second torch import would cost more than the export
        r = CliRunner().invoke(main, ["export", str(d / "student"), "-o", str(d / "out" / "detector.onnx")])
    assert r.exit_code == 0, r.output
    assert "onnxruntime vs torch max |diff| keypoints" in r.output
    return d


def test_onnxruntime_matches_torch_at_two_batch_sizes(exported):
    from pipeline.export import INPUT, session
    from pipeline.stages.common import load_trained

    path = exported / "out" / "detector.onnx"
    assert path.is_file() and not list(path.parent.glob("*.data")) and not list(path.parent.glob(".*tmp*"))
    det = load_trained(exported / "student")[0].detector.eval()
    sess = session(path)
    g = torch.Generator().manual_seed(5)
    for b in (1, 5):  # neither is the batch of 2 the graph was traced with
        x = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
        kp, hm = sess.run(["keypoints", "heatmaps"], {INPUT: x.numpy()})
        with torch.no_grad():
            ref = det(x)
        assert kp.shape == (b, 4, 2) and hm.shape == (b, 4, 8, 8)
        assert np.abs(kp - ref.keypoints.numpy()).max() <= 1e-4
        assert np.abs(hm - ref.heatmaps.numpy()).max() <= 1e-4
        assert np.ptp(kp[..., 0]) > 1e-3  # not a degenerate model with every keypoint in one place


def test_metadata_says_how_to_feed_and_read_it(exported):
    """A user with only the .onnx file and the metadata reproduces `predict`'s pixels."""
    import onnx

    from pipeline.data.images import read_rgb
    from pipeline.export import INPUT, read_metadata, session
    from pipeline.predict import predict_images
    from pipeline.stages.common import load_trained

    path = exported / "out" / "detector.onnx"
    m = onnx.load(str(path))
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 32, 32]
    meta = read_metadata(path)
    assert meta["schema"] == "dkp.detector-onnx/1"
    assert meta["input"]["shape"] == ["batch", 3, 32, 32] and meta["input"]["channels"] == "RGB"
    assert meta["outputs"]["keypoints"]["order"] == "(x, y)" and meta["keypoint_order"] == ["k0", "k1", "k2", "k3"]
    assert "x / 127.5 - 1" in meta["preprocess"]["normalise"] and "centre crop" in meta["preprocess"]["resize"]
    assert "x = (u + 1) / 2 * (S - 1)" in meta["coordinates"]
    assert np.array(meta["links"]).shape == (4, 4)
    assert meta["source"]["sha256"].startswith("sha256:")

    img_path = _write_png(exported / "img.png", _smooth_image(48, 80, seed=3))
    img = read_rgb(img_path)
    import cv2

    S = meta["input"]["shape"][2]
    h, w = img.shape[:2]  # the metadata's recipe, by hand
    s = S / min(h, w)
    nh, nw = max(S, round(h * s)), max(S, round(w * s))
    r = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    y0, x0 = (nh - S) // 2, (nw - S) // 2
    x = (r[y0:y0 + S, x0:x0 + S].astype(np.float32) / 127.5 - 1).transpose(2, 0, 1)[None]
    u = session(path).run(["keypoints"], {INPUT: x})[0][0]
    px = (u + 1) / 2 * (S - 1)  # pixels of the S x S input -> of the original (inverse resize/crop)
    sx, sy = nw / w, nh / h
    orig = np.stack([(px[:, 0] + x0 + 0.5) / sx - 0.5, (px[:, 1] + y0 + 0.5) / sy - 0.5], axis=1)
    ref = predict_images(load_trained(exported / "student")[0], [img_path], torch.device("cpu"))[0]
    np.testing.assert_allclose(orig, ref, atol=1e-3)


def test_teacher_and_missing_packages_are_refused(exported, tmp_path, monkeypatch):
    from pipeline.errors import ConfigError, DkpError
    from pipeline.export import export_onnx

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.pt").write_bytes((exported / "student" / "model.pt").read_bytes())
    (teacher / "artifact.json").write_text(json.dumps({"stage": "teach"}))
    with pytest.raises(DkpError, match="depth teacher"):
        export_onnx(teacher, tmp_path / "t.onnx", check=False)
    import builtins

    real = builtins.__import__

    def no_onnxscript(name, *a, **k):
        if name == "onnxscript":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_onnxscript)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[onnx\]'"):
        export_onnx(exported / "student", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
