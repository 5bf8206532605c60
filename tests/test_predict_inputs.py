"""`predict` on the images people have (grayscale, 16-bit, RGBA, EXIF-rotated, tiny, very wide, more than one batch,
names that are not UTF-8) and on videos (CSV, COCO JSON, --overlay video), issue 26."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import DkpError
from tests.conftest import quiet_console, run_cli
from tests.test_predict import ARGS, _smooth_image, _write_png

ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture
def student(tmp_path) -> Path:
    from pipeline.stages.common import build_model

    torch.manual_seed(0)
    d = tmp_path / "distill-artifact"
    d.mkdir()
    torch.save({"state_dict": build_model(ARGS).state_dict(), "model_args": ARGS}, d / "model.pt")
    return d


def _model(student):
    from pipeline.stages.common import load_trained

    return load_trained(student)[0]


def _kp_of(model, rgb: np.ndarray) -> np.ndarray:
    from pipeline.predict import detect

    return detect(model, [rgb], ["x"], torch.device("cpu"))[0]


def _predict(student, inputs, out, **kw):
    from pipeline.predict import predict_command

    return predict_command(str(student), [str(p) for p in inputs], str(out), "cpu", quiet_console(), **kw)


def test_image_kinds_give_the_keypoints_of_their_rgb(student, tmp_path):
    """Each kind decodes to the RGB training would see, so its keypoints are those of that RGB."""
    import cv2

    model = _model(student)
    rgb = _smooth_image(40, 56, seed=7)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    d = tmp_path / "in"
    d.mkdir()
    cv2.imwrite(str(d / "gray.png"), gray)
    cv2.imwrite(str(d / "gray16.png"), gray.astype(np.uint16) * 257)
    cv2.imwrite(str(d / "rgb16.png"), (rgb[:, :, ::-1].astype(np.uint16) * 257))
    rgba = np.concatenate([rgb[:, :, ::-1], np.full((40, 56, 1), 7, np.uint8)], axis=2)  # alpha dropped
    cv2.imwrite(str(d / "rgba.png"), rgba)
    doc = _predict(student, [d / "gray.png", d / "gray16.png", d / "rgb16.png", d / "rgba.png"], tmp_path / "out")
    got = {Path(e["image"]).name: np.array(e["keypoints"]) for e in doc["images"]}
    gray3 = np.repeat(gray[:, :, None], 3, axis=2)
    np.testing.assert_allclose(got["gray.png"], _kp_of(model, gray3), atol=1e-4)
    np.testing.assert_allclose(got["gray16.png"], _kp_of(model, gray3), atol=1e-4)
    np.testing.assert_allclose(got["rgb16.png"], _kp_of(model, rgb), atol=1e-4)
    np.testing.assert_allclose(got["rgba.png"], _kp_of(model, rgb), atol=1e-4)


def test_exif_rotated_jpeg_is_predicted_upright(student, tmp_path):
    from tests.test_hostile_inputs import _jpeg_with_orientation

    from pipeline.data.images import read_rgb

    shown = _smooth_image(40, 64, seed=8)  # how a viewer shows it: 64 wide, 40 high
    _jpeg_with_orientation(tmp_path / "rot.jpg", shown, 6)
    doc = _predict(student, [tmp_path / "rot.jpg"], tmp_path / "out")
    e = doc["images"][0]
    assert (e["width"], e["height"]) == (64, 40)
    np.testing.assert_allclose(np.array(e["keypoints"]), _kp_of(_model(student), read_rgb(tmp_path / "rot.jpg")),
                               atol=1e-4)


def test_tiny_wide_and_too_wide_frames(student, tmp_path):
    import cv2

    tiny = _write_png(tmp_path / "tiny.png", _smooth_image(1, 1, seed=1))
    two = _write_png(tmp_path / "two.png", _smooth_image(2, 3, seed=2))
    wide = _write_png(tmp_path / "wide.png", _smooth_image(6, 3000, seed=3))
    doc = _predict(student, [tiny, two, wide], tmp_path / "out")
    for e in doc["images"]:
        kp = np.array(e["keypoints"])
        assert kp.shape == (4, 2) and np.isfinite(kp).all()
        side = min(e["width"], e["height"])  # inside the centre square the detector sees
        assert (kp[:, 0] >= (e["width"] - side) / 2 - 0.5 - 1e-6).all()
        assert (kp[:, 0] <= (e["width"] + side) / 2 - 0.5 + 1e-6).all()
        ov = cv2.imread(str(tmp_path / "out" / e["overlay"]))
        assert max(ov.shape[:2]) <= 4096 and min(ov.shape[:2]) >= 1  # overlays stay a sane size
    strip = tmp_path / "strip.png"
    cv2.imwrite(str(strip), np.zeros((1, 70000, 3), np.uint8))
    with pytest.raises(DkpError, match=r"strip\.png: 70000x1 px is too elongated .* crop or pad it"):
        _predict(student, [strip], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_more_images_than_one_batch(student, tmp_path):
    d = tmp_path / "many"
    for i in range(21):
        _write_png(d / f"f{i:02d}.png", _smooth_image(24 + i, 30, seed=i))
    doc = _predict(student, [d], tmp_path / "out", batch=4)
    assert len(doc["images"]) == 21
    model = _model(student)
    from pipeline.data.images import read_rgb

    for e in doc["images"][::5]:  # batched = one at a time
        np.testing.assert_allclose(np.array(e["keypoints"]), _kp_of(model, read_rgb(e["image"])), atol=1e-5)


def test_non_utf8_file_names(student, tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9-\xff.png"  # Latin-1 bytes: not valid UTF-8
    name = os.fsdecode(raw)
    import cv2

    ok, png = cv2.imencode(".png", _smooth_image(20, 30, seed=9))  # not imwrite: OpenCV crashes on such names
    assert ok
    Path(name).write_bytes(png.tobytes())
    out = tmp_path / "out"
    r = run_cli(["predict", str(student), str(tmp_path), "-o", str(out)], env=ENV)
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "keypoints.json").read_text())
    assert len(doc["images"]) == 1 and np.array(doc["images"][0]["keypoints"]).shape == (4, 2)
    assert (out / doc["images"][0]["overlay"]).exists()


# ------------------------------------------------------------------------------------------------ videos


def test_video_csv_coco_and_overlay(student, tmp_path):
    pytest.importorskip("av")
    from pipeline.data.video import iter_video, moving_figure, probe_video, write_video

    src = moving_figure(20, 36, 52)
    gaps = [40, 40, 120]
    pts = [int(x) for x in np.cumsum([0] + [gaps[k % 3] for k in range(19)])]  # variable frame rate, in ms
    video = write_video(tmp_path / "walk.mkv", src, pts=pts, time_base=1 / 1000)
    out = tmp_path / "out"
    r = run_cli(["predict", str(student), str(video), "-o", str(out), "--overlay", "--batch", "6"], env=ENV)
    assert r.returncode == 0, r.stderr
    model = _model(student)
    with open(out / "walk.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["frame", "x0", "y0", "x1", "y1", "x2", "y2", "x3", "y3"]
    assert [int(r[0]) for r in rows[1:]] == list(range(20))  # one row per frame, in order
    for k in (0, 7, 19):  # the keypoints of that frame, in its pixels
        np.testing.assert_allclose(np.array(rows[k + 1][1:], float).reshape(4, 2), _kp_of(model, src[k]), atol=2e-3)
    coco = json.loads((out / "walk.coco.json").read_text())
    assert len(coco["images"]) == len(coco["annotations"]) == 20
    assert coco["images"][5]["file_name"] == "walk.mkv/5"
    assert coco["images"][5]["time_s"] == pytest.approx(pts[5] / 1000)
    ann = coco["annotations"][7]
    assert ann["image_id"] == coco["images"][7]["id"] and ann["num_keypoints"] == 4
    np.testing.assert_allclose(np.array(ann["keypoints"]).reshape(4, 3)[:, :2], _kp_of(model, src[7]), atol=2e-3)
    assert (np.array(ann["keypoints"]).reshape(4, 3)[:, 2] == 2).all()
    assert coco["categories"][0]["keypoints"] == ["k0", "k1", "k2", "k3"]
    info = probe_video(b"", out / "walk.overlay.mp4")  # the overlay: every frame, the source's timing
    assert len(info["pts"]) == 20
    times = [t for _, t, _ in iter_video(out / "walk.overlay.mp4")]
    np.testing.assert_allclose(times, np.asarray(pts) / 1000, atol=1e-3)
    doc = json.loads((out / "keypoints.json").read_text())
    assert doc["videos"][0]["frames"] == 20 and doc["videos"][0]["overlay"] == "walk.overlay.mp4"
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_bad_video_is_named_before_anything_is_written(student, tmp_path):
    good = _write_png(tmp_path / "a.png", _smooth_image(20, 20, seed=1))
    bad = tmp_path / "clip.mov"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(DkpError, match=r"clip\.mov: cannot be opened"):
        _predict(student, [good, bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()
