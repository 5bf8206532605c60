"""`dkp-pipeline predict`: keypoints in original-image pixels, overlays, inputs as files or folders, bad inputs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import DkpError
from tests.conftest import run_cli

ENV = {"OMP_NUM_THREADS": "1"}
ARGS = dict(n_keypoints=4, in_channels=3, image_size=32, heatmap_size=8, thick=2e-3, sklr=512.0, mask_ratio=0.8,
            mask_blocks=16, width=8)


@pytest.fixture
def student(tmp_path) -> Path:
    """A random-init student saved the way the trainer saves model.pt, in an artifact-like directory."""
    from pipeline.stages.common import build_model

    torch.manual_seed(0)
    model = build_model(ARGS)
    d = tmp_path / "distill-artifact"
    d.mkdir()
    torch.save({"state_dict": model.state_dict(), "model_args": ARGS}, d / "model.pt")
    return d


def _write_png(path: Path, rgb: np.ndarray) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))
    return path


def _smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A blob image, so that a random detector's keypoints are not all at the centre."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float64)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 16)
        img += rng.uniform(0, 255, 3) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def test_model_to_image_inverts_square_transform():
    from pipeline.data.images import square_transform
    from pipeline.predict import model_to_image

    rng = np.random.default_rng(0)
    for h, w, s in [(64, 128, 32), (128, 64, 32), (37, 53, 16), (480, 640, 128), (32, 32, 32)]:
        pts = rng.uniform(0, [w - 1, h - 1], size=(5, 2))
        sx, sy, ox, oy = square_transform(h, w, s)
        in_model = np.stack([pts[:, 0] * sx + ox, pts[:, 1] * sy + oy], axis=1)
        np.testing.assert_allclose(model_to_image(in_model, h, w, s), pts, atol=1e-9)


def test_keypoints_are_in_original_image_pixels(student, tmp_path):
    """A 64x128 image and its centre 64x64 crop give the same detector input (2x INTER_AREA blocks, crop on
    a block boundary), so their keypoints must differ by exactly the crop offset (32 px in x)."""
    from pipeline.predict import predict_images
    from pipeline.stages.common import load_trained

    wide = _smooth_image(64, 128, seed=1)
    a = _write_png(tmp_path / "wide.png", wide)
    b = _write_png(tmp_path / "crop.png", wide[:, 32:96])
    model, _ = load_trained(student)
    kp_wide, kp_crop = predict_images(model, [a, b], torch.device("cpu"))
    assert kp_wide.shape == (4, 2)
    assert np.ptp(kp_crop[:, 0]) > 0.5, "degenerate test: all keypoints at one x"
    np.testing.assert_allclose(kp_wide[:, 0] - 32, kp_crop[:, 0], atol=1e-4)
    np.testing.assert_allclose(kp_wide[:, 1], kp_crop[:, 1], atol=1e-4)
    # and the crop's keypoints are the detector's, mapped from [-1, 1] to pixels of the 64 px image
    from pipeline.data.datasets import rgb_to_tensor
    from pipeline.data.images import resize_square

    x = rgb_to_tensor(resize_square(wide[:, 32:96], 32))[None]
    u = model.detector(x).keypoints[0].detach().numpy()
    np.testing.assert_allclose(kp_crop, ((u + 1) / 2 * 31 + 0.5) * 2 - 0.5, atol=1e-4)


def test_predict_command_files_and_folders(student, tmp_path):
    from rich.console import Console

    from pipeline.predict import predict_command

    f1 = _write_png(tmp_path / "in" / "a.png", _smooth_image(48, 80, seed=2))
    folder = tmp_path / "folder"
    _write_png(folder / "b.png", _smooth_image(40, 40, seed=3))
    _write_png(folder / "sub" / "a.png", _smooth_image(50, 30, seed=4))  # same stem as f1
    (folder / "notes.md").write_text("not an image, skipped inside folders")
    out = tmp_path / "out"
    doc = predict_command(str(student / "model.pt"), [str(f1), str(folder), str(f1)], str(out), "cpu",
                          Console(file=open("/dev/null", "w")))
    on_disk = json.loads((out / "keypoints.json").read_text())
    assert on_disk == json.loads(json.dumps(doc))
    names = [Path(e["image"]).name for e in on_disk["images"]]
    assert names == ["a.png", "b.png", "a.png"]  # the repeated file once, folders sorted recursively
    overlays = [e["overlay"] for e in on_disk["images"]]
    assert len(set(overlays)) == 3
    import cv2

    for e in on_disk["images"]:
        kp = np.array(e["keypoints"])
        assert kp.shape == (4, 2)
        # inside the centre square the detector sees
        w, h = e["width"], e["height"]
        side = min(w, h)
        assert (kp[:, 0] >= (w - side) / 2 - 0.5).all() and (kp[:, 0] <= (w + side) / 2 - 0.5).all()
        assert (kp[:, 1] >= (h - side) / 2 - 0.5).all() and (kp[:, 1] <= (h + side) / 2 - 0.5).all()
        ov = cv2.imread(str(out / e["overlay"]))
        scale = max(1, 256 // side)
        assert ov.shape == (h * scale, w * scale, 3)
    assert on_disk["n_keypoints"] == 4 and on_disk["model_image_size"] == 32


def test_bad_inputs_are_named(student, tmp_path):
    from rich.console import Console

    from pipeline.predict import predict_command

    quiet = Console(file=open("/dev/null", "w"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DkpError, match="folder .*empty: no image files"):
        predict_command(str(student), [str(empty)], str(tmp_path / "o1"), "cpu", quiet)
    txt = tmp_path / "data.csv"
    txt.write_text("a,b\n1,2\n")
    with pytest.raises(DkpError, match=r"data\.csv: not a decodable image"):
        predict_command(str(student), [str(txt)], str(tmp_path / "o2"), "cpu", quiet)
    assert not (tmp_path / "o2").exists()  # nothing written before every input is known good
    not_model = tmp_path / "nomodel"
    not_model.mkdir()
    with pytest.raises(DkpError, match="no trained model here"):
        predict_command(str(not_model), [str(txt)], str(tmp_path / "o3"), "cpu", quiet)


def test_cli_predict_and_non_image_exit_code(student, tmp_path):
    img = _write_png(tmp_path / "frames" / "f0.png", _smooth_image(32, 48, seed=5))
    out = tmp_path / "pred"
    r = run_cli(["predict", str(student), str(img.parent), "-o", str(out)], cwd=tmp_path, env=ENV)
    assert r.returncode == 0, r.stderr + r.stdout
    doc = json.loads((out / "keypoints.json").read_text())
    assert len(doc["images"]) == 1 and (out / "overlays" / "f0.png").is_file()

    bad = tmp_path / "frames" / "clip.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    r = run_cli(["predict", str(student), str(img), str(bad), "-o", str(tmp_path / "pred2")], cwd=tmp_path, env=ENV)
    assert r.returncode == 2, r.stderr + r.stdout
    assert "clip.mp4" in r.stderr and "Traceback" not in r.stderr
