"""The bad inputs a second probe found (issue 13), each through the CLI; the table is docs/reliability.md.

Same rules as tests/test_bad_inputs.py (whose fixtures are reused): exit code 2 with one message naming
the thing and the fix, or the documented conversion; no traceback; finished work untouched. The
annotation/split key cases ("edit after a finished run") are in tests/test_stale_inputs.py.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_bad_inputs import Exp, _env, assert_kept, assert_user_error, built, exp, prebuilt, snapshot  # noqa: F401


def imwrite(path: Path, img: np.ndarray) -> None:
    """cv2.imwrite through bytes (the file name may not be valid UTF-8)."""
    import cv2

    ok, buf = cv2.imencode(path.suffix, img)
    assert ok
    Path(path).write_bytes(buf.tobytes())


def to_png_depth(e: Exp) -> None:
    """The dataset's depth as 16-bit PNGs in millimetres (depth_scale 0.001), as depth cameras export it."""
    for f in sorted((e.root / "depth").glob("*.npy")):
        imwrite(f.with_suffix(".png"), np.round(np.load(f) * 1000).astype(np.uint16))
        f.unlink()
    meta = e.root / "dataset.yaml"
    meta.write_text(meta.read_text().replace("depth_scale: 1.0", "depth_scale: 0.001"))


def drop_csv_rows(e: Exp, *frame_ids: str) -> None:
    path = e.root / "keypoints.csv"
    rows = [r for r in csv.reader(path.open(newline="")) if r[0] not in frame_ids]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


# --------------------------------------------------------------------------------------------------
# item 2: depth 0 = no reading


def test_depth_png_zero_is_no_reading(exp):
    import cv2

    from pipeline.data.datasets import normalise_inverse_depth
    from pipeline.depth_cache import DepthCacheReader

    to_png_depth(exp)
    d4 = cv2.imdecode(np.fromfile(exp.root / "depth" / "f000004.png", np.uint8), cv2.IMREAD_UNCHANGED)
    d4[:8] = 0  # the top quarter has no reading (Kinect / RealSense write 0 there)
    imwrite(exp.root / "depth" / "f000004.png", d4)
    imwrite(exp.root / "depth" / "f000009.png", np.zeros_like(d4))  # a frame with no reading at all
    p = exp.cli("depth")
    assert_user_error(p, "depth/f000009.png", "no valid pixel", "--skip-bad-frames")
    p = exp.cli("depth", "--skip-bad-frames")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 of 48 depth files have holes" in " ".join(p.stdout.split())
    dep = exp.status()["depth"]
    assert "1 unreadable frame(s) skipped" in dep["progress"] and "1 frame(s) with depth holes" in dep["progress"]
    with DepthCacheReader(dep["path"]) as r:
        assert not r.is_valid(9)
        inv = r.read(4)
    assert np.isnan(inv[:8]).all() and np.isfinite(inv[8:]).all()
    teacher_input = normalise_inverse_depth(inv)
    real = teacher_input[8:]
    # min-max over the valid pixels only: the real scene spans [-1, 1] (it used to be flattened to -1 by the
    # holes read as 1/1e-6, infinitely near); holes are "far" (-1)
    assert real.min() == pytest.approx(-1.0) and real.max() == pytest.approx(1.0) and real.std() > 0.05
    assert (teacher_input[:8] == -1).all()


# --------------------------------------------------------------------------------------------------
# item 3: out-of-range and non-finite config values


@pytest.mark.parametrize("override, needle", [
    ("distill.gamma=-1", "config field distill.gamma: -1.0 is out of range; valid: >= 0"),
    ("distill.gamma=.nan", "config field distill.gamma: nan is not a finite number"),
    ("teach.lr=.inf", "config field teach.lr: inf is not a finite number"),
    ("teach.model.n_keypoints=0", "config field teach.model.n_keypoints: 0 is out of range; valid: >= 2"),
    ("teach.model.image_size=7", "config field teach.model.image_size: 7 is out of range; valid: >= 16 and a "
                                 "multiple of 16"),
    ("distill.model.mask_ratio=1.5", "config field distill.model.mask_ratio: 1.5 is out of range; valid: [0, 1]"),
    ("teach.model.width=0", "config field teach.model.width: 0 is out of range; valid: >= 1"),
    ("teach.model.thick=-1", "config field teach.model.thick: -1.0 is out of range; valid: > 0"),
    ("depth.shard_size=0", "config field depth.shard_size: 0 is out of range; valid: >= 1"),
    ("data.synth_clip_length=0", "config field data.synth_clip_length: 0 is out of range; valid: >= 1"),
    ("distill.warmup_steps=-5", "config field distill.warmup_steps: -5 is out of range; valid: >= 0"),
    ("teach.model.heatmap_size=16", "teach.model.heatmap_size: 16 does not fit teach.model.image_size=32; "
                                    "valid: image_size / 4 = 8"),
])
def test_config_value_out_of_range(built, override, needle):
    before = snapshot(built.store)
    p = built.cli("run", "--set", override)
    assert_user_error(p, needle)
    assert_kept(before, built.store)


# --------------------------------------------------------------------------------------------------
# item 4: predict with the teacher


def _saved_model(d: Path, config: dict, stage: str | None) -> Path:
    import torch

    from pipeline.stages.common import build_model

    args = dict(n_keypoints=4, in_channels=3, image_size=32, heatmap_size=8, thick=5e-4, sklr=512.0,
                mask_ratio=0.8, mask_blocks=16, width=8)
    d.mkdir(parents=True)
    torch.save({"format": "dkp-model/1", "state_dict": build_model(args).state_dict(), "model_args": args,
                "config": config}, d / "model.pt")
    if stage:
        (d / "artifact.json").write_text(json.dumps({"stage": stage, "key": "0" * 64}))
    return d


def test_predict_refuses_the_teacher(tmp_path, prebuilt):
    from click.testing import CliRunner

    from pipeline.cli import main

    img = prebuilt / "data" / "images" / "f000001.png"
    teacher = _saved_model(tmp_path / "teach" / "abc", {"steps": 6, "depth_norm": "minmax"}, "teach")
    loose = _saved_model(tmp_path / "loose", {"steps": 6, "depth_norm": "minmax"}, None)  # model.pt alone
    student = _saved_model(tmp_path / "distill" / "def", {"steps": 6, "gamma": 0.1, "layer": "logits"}, "distill")
    for model in (teacher, loose / "model.pt"):
        r = CliRunner().invoke(main, ["predict", str(model), str(img), "-o", str(tmp_path / "out")])
        err = " ".join(r.stderr.split())
        assert r.exit_code == 2 and "depth teacher" in err and "not the RGB images" in err and "distill" in err, err
        assert not (tmp_path / "out" / "keypoints.json").exists()
    r = CliRunner().invoke(main, ["predict", str(student), str(img), "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "out" / "keypoints.json").exists()


# --------------------------------------------------------------------------------------------------
# item 5: experiment names that would leave the store


def test_experiment_name_cannot_leave_the_store(built):
    before = snapshot(built.store)
    dep = built.status()["depth"]
    for name in ("../escape", f"../depth/{Path(dep['path']).name}/artifact", "a/b", ".hidden", ""):
        p = built.cli("run", "--until", "manifest", "--set", f"name={name}")
        assert_user_error(p, "config field name:", "not a valid experiment name", "--set name=")
    assert_kept(before, built.store)
    assert not (built.cwd / "escape.json").exists() and not (built.store / "escape.json").exists()
    assert sorted(p.name for p in (built.store / "experiments").iterdir()) == ["tiny.json"]

    from pipeline.store.artifacts import Store
    from pipeline.errors import DkpError

    with pytest.raises(DkpError, match="would write outside"):  # the store's own guard, below the config check
        Store(built.store).experiment_file("../escape")


def test_default_name_from_a_file_name_with_spaces(built):
    y = built.cwd / "my exp (2).yaml"
    y.write_text(built.yaml.read_text().replace("name: tiny\n", ""))
    from click.testing import CliRunner

    from pipeline.cli import main

    r = CliRunner().invoke(main, ["run", str(y), "--store", str(built.store), "--until", "depth"])
    assert r.exit_code == 0, r.stderr
    assert (built.store / "experiments" / "my_exp__2_.json").is_file()


# --------------------------------------------------------------------------------------------------
# item 6: a file name that is not valid UTF-8


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse non-UTF-8 names")
def test_non_utf8_file_name(exp):
    """Frame and depth PNG named with a 0xFF byte: read like every other file (no cv2.imread(str(path)) in a
    DataLoader worker, which crashed the worker and left the stage in progress)."""
    to_png_depth(exp)
    drop_csv_rows(exp, "f000003")  # keypoints.csv is UTF-8 text: such a frame can only be unlabelled
    img, dep = os.fsencode(exp.frame(3)), os.fsencode(exp.root / "depth" / "f000003.png")
    os.rename(img, img.replace(b"f000003", b"f\xff0003"))
    os.rename(dep, dep.replace(b"f000003", b"f\xff0003"))
    p = exp.cli_subprocess("depth", "--set", "depth.num_workers=2")
    assert p.returncode == 0, p.stdout + p.stderr
    st = exp.status()
    assert st["depth"]["state"] == "fresh"
    from pipeline.depth_cache import DepthCacheReader

    with DepthCacheReader(st["depth"]["path"]) as r:
        ids = [r.frame_id(i) for i in range(len(r))]
        assert "f\\xff0003" in ids and all(r.is_valid(i) for i in range(len(r)))


# --------------------------------------------------------------------------------------------------
# item 7: a store that cannot be written; --store naming a file

# Runs dkp-pipeline with every write under the store failing as on a read-only mount (EROFS): a test as root
# cannot use file permissions. Reads are untouched.
READ_ONLY = """\
import builtins, errno, io, os, sys
STORE = os.path.abspath(sys.argv[sys.argv.index("--store") + 1])
def guard(path, writing):
    if writing and isinstance(path, (str, bytes, os.PathLike)):
        p = os.path.abspath(os.fsdecode(path))
        if p == STORE or p.startswith(STORE + os.sep):
            raise OSError(errno.EROFS, "Read-only file system", p)
def wrap_open(f):
    def opener(file, mode="r", *a, **k):
        guard(file, any(c in mode for c in "wax+"))
        return f(file, mode, *a, **k)
    return opener
builtins.open = io.open = wrap_open(io.open)
_os_open = os.open
def os_open(path, flags, *a, **k):
    guard(path, flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    return _os_open(path, flags, *a, **k)
os.open = os_open
for name in ("mkdir", "replace", "rename", "unlink", "rmdir"):
    def w(*a, _f=getattr(os, name), **k):
        guard(a[0], True)
        return _f(*a, **k)
    setattr(os, name, w)
from pipeline.cli import main
sys.argv = ["dkp-pipeline"] + sys.argv[1:]
main()
"""


def test_read_only_store(built, tmp_path):
    wrapper = tmp_path / "read_only.py"
    wrapper.write_text(READ_ONLY)
    before = snapshot(built.store)
    p = built.cli_subprocess("run", "--until", "depth", wrapper=wrapper)  # everything fresh: runs read-only
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert "nothing to do" in p.stdout
    (built.store / "experiments" / "tiny.json").unlink()  # now the run would record what it used: it cannot
    p = built.cli_subprocess("run", "--until", "depth", wrapper=wrapper)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert "is not writable" in p.stderr and "not recording" in p.stderr
    p = built.cli_subprocess("run", "--until", "teach", wrapper=wrapper)  # something to build: refused up front
    assert_user_error(p, f"store {built.store} is not writable", "Read-only file system", "teach needs building",
                      "--store DIR")
    assert_kept(before, built.store)


def test_store_option_naming_a_file(exp):
    exp.store.write_text("not a directory\n")
    for cmd in ("status", "run"):
        p = exp.cli(cmd)
        assert_user_error(p, f"--store {exp.store}: this is a file, not a directory")


# --------------------------------------------------------------------------------------------------
# items 8, 10: a BOM before keypoints.csv, macOS companions beside the frames


def test_bom_and_appledouble_files_accepted(built):
    """Excel's "CSV UTF-8" BOM is read as the encoding mark it is; hidden files, AppleDouble "._*" and
    __MACOSX/ folders are not frames. Neither changes the manifest: everything stays fresh."""
    keys = {k: v["key"] for k, v in built.status().items()}
    csv_path = built.root / "keypoints.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    junk = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # an AppleDouble header
    (built.root / "images" / "._f000001.png").write_bytes(junk)
    (built.root / "depth" / "._f000001.npy").write_bytes(junk)
    (built.root / "images" / ".DS_Store").write_bytes(junk)
    (built.root / "images" / "__MACOSX").mkdir()
    (built.root / "images" / "__MACOSX" / "._f000002.png").write_bytes(junk)
    st = built.status()
    assert {k: v["key"] for k, v in st.items()} == keys and st["depth"]["state"] == "fresh"
    p = built.cli("run", "--until", "depth")
    assert p.returncode == 0 and "nothing to do" in p.stdout, p.stdout + p.stderr


# --------------------------------------------------------------------------------------------------
# item 9: no keypoints.csv is found before training, not after


def test_no_keypoints_csv_refused_before_training(exp):
    (exp.root / "keypoints.csv").unlink()
    p = exp.cli("run")
    assert_user_error(p, f"there is no {exp.root / 'keypoints.csv'}", "add keypoints.csv (header frame,split,",
                      "--until distill")
    assert not (exp.store / "teach").exists() and not (exp.store / "depth").exists()  # refused in a second
    p = exp.cli("run", "--until", "manifest")  # stages before eval do not need ground truth
    assert p.returncode == 0, p.stderr


# --------------------------------------------------------------------------------------------------
# item 11: EXIF orientation


def _jpeg_with_orientation(path: Path, displayed: np.ndarray, orientation: int) -> None:
    """Save the pixels that, shown under EXIF ``orientation``, look like ``displayed`` (H, W, 3)."""
    from PIL import Image

    undo = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.rot90(a, 1), 7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),
            8: lambda a: np.rot90(a, -1)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(undo(displayed))).save(path, quality=98, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_viewers(tmp_path, orientation):
    """read_rgb and the manifest's size probe show a JPEG as PIL's exif_transpose (what viewers do) does."""
    from PIL import Image, ImageOps

    from pipeline.data.images import probe_image
    from pipeline.data.images import read_rgb

    rng = np.random.default_rng(orientation)
    shown = np.kron(rng.integers(0, 255, (5, 4, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))  # 40x32
    f = tmp_path / "x.jpg"
    _jpeg_with_orientation(f, shown, orientation)
    ref = np.asarray(ImageOps.exif_transpose(Image.open(f)).convert("RGB"))
    got = read_rgb(f)
    assert got.shape == ref.shape == shown.shape
    assert np.abs(got.astype(int) - ref).max() <= 2
    assert probe_image(f.read_bytes(), str(f)) == {"wh": [32, 40], "orientation": orientation}


def test_exif_rotated_frame_through_the_pipeline(exp):
    """A frame stored 40x32 with orientation 6 is the 32x40 picture viewers show: its annotations and its
    depth file (32 wide, 40 high) fit it, and the depth stage accepts it."""
    from pipeline.data.images import read_rgb

    shown = np.zeros((40, 32, 3), np.uint8)
    shown[:20] = (200, 30, 30)  # red top half: upside down or sideways if the tag were ignored
    exp.frame(2).unlink()
    _jpeg_with_orientation(exp.root / "images" / "f000002.jpg", shown, 6)
    np.save(exp.depth_file(2), np.full((40, 32), 4.0, np.float32))
    p = exp.cli("depth")
    assert p.returncode == 0, p.stdout + p.stderr
    m = json.loads((Path(exp.status()["manifest"]["path"]) / "manifest.json").read_text())
    i = m["frames"]["id"].index("f000002")
    assert m["frames"]["wh"][i] == [32, 40] and m["frames"]["orientation"][i] == 6
    got = read_rgb(exp.root / "images" / "f000002.jpg")
    assert got[:18, :, 0].min() > 150 and got[22:, :, 0].max() < 60


# --------------------------------------------------------------------------------------------------
# item 12: tiny and extreme-aspect frames


def test_tiny_and_extreme_aspect_frames_warned(exp):
    drop_csv_rows(exp, "f000005", "f000006")  # their annotations would not fit the new sizes
    imwrite(exp.frame(5), np.full((1, 1, 3), 128, np.uint8))
    np.save(exp.depth_file(5), np.full((1, 1), 4.0, np.float32))
    imwrite(exp.frame(6), np.full((10, 400, 3), 128, np.uint8))
    np.save(exp.depth_file(6), np.full((10, 400), 4.0, np.float32))
    p = exp.cli("status")
    out = " ".join(p.stdout.split())
    assert p.returncode == 0, p.stderr
    assert ("warning: 2 frame(s) have a shorter side under 16 px and are upscaled more than 2x to the model "
            "size 32, e.g. 'f000005' (1x1)") in out, out
    assert ("warning: 1 frame(s) have an aspect ratio above 2:1, so the square centre crop keeps as little as "
            "2.5 % of the longer side") in out and "'f000006' (400x10)" in out, out
    p = exp.cli("run", "--until", "depth")
    assert p.returncode == 0 and "upscaled more than 2x" in " ".join(p.stdout.split()), p.stdout + p.stderr
