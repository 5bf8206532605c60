"""Videos in (issue 26): decoding checked against a second decoder (OpenCV's own FFmpeg), random access equal
to a sequential decode (B-frames, VFR), display rotation, the manifest of a video folder (ids, stride,
annotations, fingerprints over bytes + frame + decode settings, errors), and a video dataset that trains exactly
like the same frames as image files."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")

from pipeline.data.video import (DECODE_TAG, VideoReader, iter_video, moving_figure, probe_video,  # noqa: E402
                                 read_frame, write_video)
from pipeline.errors import ManifestError  # noqa: E402
from tests.conftest import TINY_YAML, quiet_console, torch_threads  # noqa: E402
from tests.videodata import assert_frames_equal, synthetic_as_videos  # noqa: E402

N = 36  # frames per test video: a few key frames apart with keyint 10


def _cv2_frames(path) -> list[np.ndarray]:
    """Every frame as OpenCV's VideoCapture decodes it (its bundled FFmpeg, not PyAV's), RGB."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(f[:, :, ::-1])
    cap.release()
    return out


@pytest.mark.parametrize("name,encoding,lossless", [
    ("ffv1.mkv", "ffv1", True), ("rgb.mp4", "x264rgb-lossless", True), ("ffv1.avi", "ffv1", True),
    ("bframes.mp4", "x264-bframes", False), ("mpeg4.avi", "mpeg4", False), ("x264.mov", "x264", False)])
def test_decode_matches_a_second_decoder(tmp_path, name, encoding, lossless):
    src = moving_figure(N, 48, 64)
    path = write_video(tmp_path / name, src, encoding=encoding)
    ours = [f for _, _, f in iter_video(path)]
    theirs = _cv2_frames(path)
    info = probe_video(b"", path)
    assert len(ours) == len(theirs) == len(info["pts"]) == N
    assert info["wh"] == [64, 48] and info["rotation"] == 0
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape == (48, 64, 3)
        if lossless:  # pixel equality with the second decoder and with what was written
            np.testing.assert_array_equal(a, b, err_msg=f"frame {k}")
            np.testing.assert_array_equal(a, src[k], err_msg=f"frame {k}")
        else:  # the frame-identity patch survives the codec: same frame, same order
            for f in (a, b):
                assert round(float(f[2:6, 2:6].mean()) / 16) % 16 == k % 16, k


@pytest.mark.parametrize("encoding,suffix", [("x264-bframes", ".mp4"), ("ffv1", ".mkv")])
def test_random_access_equals_sequential_decode(tmp_path, encoding, suffix):
    path = write_video(tmp_path / f"v{suffix}", moving_figure(N, 32, 48), encoding=encoding)
    pts = probe_video(b"", path)["pts"]
    seq = [f for _, _, f in iter_video(path)]
    r = VideoReader(path)
    for k in np.random.default_rng(0).permutation(N):
        np.testing.assert_array_equal(r.read(int(k), pts[k]), seq[k], err_msg=f"frame {k}")
    fwd = VideoReader(path)  # in order, as a depth shard reads: one seek (the first read), then forward
    for k in range(N):
        np.testing.assert_array_equal(fwd.read(k, pts[k]), seq[k])
    assert fwd.seeks == 1


def test_variable_frame_rate_index_is_by_presentation_time(tmp_path):
    gaps = [40, 100, 40, 40, 250]
    pts = [int(x) for x in np.cumsum([0] + [gaps[k % 5] for k in range(N - 1)])]
    path = write_video(tmp_path / "vfr.mkv", moving_figure(N), pts=pts, time_base=1 / 1000)
    info = probe_video(b"", path)
    assert info["pts"] == pts
    times = [t for _, t, _ in iter_video(path)]
    np.testing.assert_allclose(times, np.asarray(pts) / 1000)
    seq = [f for _, _, f in iter_video(path)]
    r = VideoReader(path)
    for k in (30, 3, 17, 18, 0, 35):
        np.testing.assert_array_equal(r.read(k, pts[k]), seq[k])


def test_display_rotation_is_applied_like_players(tmp_path):
    src = moving_figure(6, 24, 40)
    path = write_video(tmp_path / "phone.mp4", src, encoding="x264rgb-lossless", rotation=90)
    info = probe_video(b"", path)
    assert info["rotation"] == 90 and info["wh"] == [24, 40]  # displayed upright: W and H swapped
    for k, (_, _, f) in enumerate(iter_video(path)):
        np.testing.assert_array_equal(f, np.rot90(src[k], 1))  # 90 degrees counter-clockwise, as ffmpeg shows it
    if shutil.which("ffmpeg"):  # the ffmpeg command line (autorotate on) agrees
        import subprocess

        import cv2

        out = tmp_path / "first.png"
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", str(out)], check=True)
        np.testing.assert_array_equal(cv2.imread(str(out))[:, :, ::-1], np.rot90(src[0], 1))


def test_not_a_video_is_a_named_error(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not really a video")
    with pytest.raises(ValueError, match="cannot be opened.*Invalid data.*is it a complete video file"):
        probe_video(b"", bad)
    root = tmp_path / "data"
    (root / "videos").mkdir(parents=True)
    shutil.copy(bad, root / "videos" / "broken.mp4")
    from pipeline.data.build import build_manifest

    with pytest.raises(ManifestError, match=r"broken\.mp4.*replace or remove it"):
        build_manifest("folder", root, progress=False)


# ------------------------------------------------------------------------------------------------ manifests


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos") / "data"
    frames = synthetic_as_videos(root)
    return root, frames


def test_manifest_of_a_video_folder(video_root, tmp_path):
    from pipeline.data.build import build_manifest
    from pipeline.data.manifest import Manifest

    root, frames = video_root
    m = build_manifest("folder", root, progress=False)
    assert len(m) == 48 and m.frame_ids[:2] == ["a.mkv/0", "a.mkv/1"] and m.frame_ids[-1] == "sub/b.mkv/23"
    assert m.paths[0] == "videos/a.mkv" and m.paths[-1] == "videos/sub/b.mkv"
    assert m.video_frames[1][0] == 1 and (m.sizes == [32, 32]).all()
    assert all(fp.endswith(f"@f{m.video_frames[i][0]}@{DECODE_TAG}") for i, fp in enumerate(m.fingerprints))
    assert m.has_gt.all() and len(m.split("test")) > 0
    assert m.depth_paths[0] == "depth/a.mkv/0.npy"
    assert_frames_equal(m, frames)
    back = Manifest.load(m.save(tmp_path / "m.json"))  # the frame list survives the file
    assert back.video_frames == m.video_frames and back.fingerprint == m.fingerprint
    assert json.loads((tmp_path / "m.json").read_text())["frames"]["video_frame"][0] == [0, 0]

    s = build_manifest("folder", root, progress=False, frame_stride=5)
    assert s.frame_ids[:3] == ["a.mkv/0", "a.mkv/5", "a.mkv/10"] and len(s) == 10  # 5 of each 24-frame video
    assert s.has_gt.all()  # the rows of the frames the stride leaves out are skipped, the rest kept
    assert_frames_equal(s, frames)


def test_fingerprint_covers_the_video_bytes_and_the_decode_settings(video_root, tmp_path, monkeypatch):
    from pipeline.data import video as V
    from pipeline.data.build import build_manifest

    root, _ = video_root
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    before = build_manifest("folder", copy, progress=False)
    # re-encode one video with other pixels in one frame: only that video's frames change fingerprint
    imgs = [f for _, _, f in iter_video(copy / "videos" / "a.mkv")]
    imgs[3] = imgs[3].copy()
    imgs[3][0, 0] ^= 1
    write_video(copy / "videos" / "a.mkv", imgs)
    after = build_manifest("folder", copy, progress=False)
    changed = [i for i in range(48) if before.fingerprints[i] != after.fingerprints[i]]
    assert changed == list(range(24))  # the whole file is the identity: all of a.mkv's frames, none of b.mkv's
    assert before.fingerprint != after.fingerprint
    monkeypatch.setattr(V, "DECODE_TAG", "pyav-rgb24-rot/2")  # other decode settings: every video frame differs
    again = build_manifest("folder", copy, progress=False)
    assert all(a != b for a, b in zip(after.fingerprints, again.fingerprints))


def test_video_folder_errors_name_the_file_and_the_fix(video_root, tmp_path):
    from pipeline.data.build import build_manifest

    root, _ = video_root
    d = tmp_path / "data"
    shutil.copytree(root, d)
    csv = (d / "keypoints.csv").read_text().splitlines()
    (d / "keypoints.csv").write_text("\n".join(csv + ["a.mkv/24," + csv[1].split(",", 1)[1]]) + "\n")
    with pytest.raises(ManifestError, match=r"frame 'a\.mkv/24' is past the end of video 'videos/a\.mkv' "
                                            r"\(24 frames: 0 to 23\)"):
        build_manifest("folder", d, progress=False)
    (d / "keypoints.csv").write_text("\n".join(csv) + "\n")
    only_images = tmp_path / "images-only"
    (only_images / "images").mkdir(parents=True)
    write_video(tmp_path / "x.mkv", moving_figure(2))
    import cv2

    cv2.imwrite(str(only_images / "images" / "f.png"), moving_figure(1)[0])
    with pytest.raises(ManifestError, match="data.frame_stride 3 takes every k-th frame of each video, but there "
                                            "is no videos/"):
        build_manifest("folder", only_images, progress=False, frame_stride=3)
    with pytest.raises(ManifestError, match="only the folder layout reads"):
        build_manifest("taichi", only_images, progress=False, frame_stride=2)


def test_video_rows_and_depth_through_the_chunked_parser_and_its_cache(video_root, tmp_path, monkeypatch):
    """keypoints.csv read in chunks of 2 rows (issue 23's parser) with videos: the rows of frames the stride drops
    are skipped in every chunk, their depth files too; the parsed-CSV cache is keyed by the stride (stride 5, then
    1, then each again from the cache); a row past a video's end in a late chunk is refused with its line."""
    from pipeline.data.build import build_manifest
    from pipeline.data.layouts import folder as F

    root, _ = video_root
    d = tmp_path / "data"
    shutil.copytree(root, d)
    monkeypatch.setattr(F, "CHUNK_ROWS", 2)
    parses = []
    real = F._parse_csv
    monkeypatch.setattr(F, "_parse_csv", lambda *a: parses.append(1) or real(*a))
    full = build_manifest("folder", d, progress=False)
    s5 = build_manifest("folder", d, progress=False, frame_stride=5)
    again, s5_again = (build_manifest("folder", d, progress=False, frame_stride=k) for k in (1, 5))
    assert len(parses) == 2  # the last two from the cache
    at = [full.frame_ids.index(f) for f in s5.frame_ids]
    for m, rows in ((s5, at), (s5_again, at), (again, list(range(len(full))))):
        np.testing.assert_array_equal(m.keypoints, full.keypoints[rows])
        assert m.splits == [full.splits[i] for i in rows]
        assert m.fingerprints == [full.fingerprints[i] for i in rows]
    assert len(s5) == 10 and s5.has_gt.all()
    assert s5.depth_paths == [f"depth/{fid}.npy" for fid in s5.frame_ids]
    lines = (d / "keypoints.csv").read_text().splitlines()
    (d / "keypoints.csv").write_text("\n".join(lines + ["sub/b.mkv/30," + lines[1].split(",", 1)[1]]) + "\n")
    with pytest.raises(ManifestError, match=rf"keypoints\.csv line {len(lines) + 1}: frame 'sub/b\.mkv/30' is past the "
                                            r"end of video 'videos/sub/b\.mkv' \(24 frames: 0 to 23\)"):
        build_manifest("folder", d, progress=False, frame_stride=5)


def test_videos_of_different_lengths_rebuild_from_the_memo(tmp_path, monkeypatch):
    """The videos' frame lists (one list of presentation times per video, of different lengths) survive the
    columnar fingerprint memo: a rebuild reads no file and lists the same frames."""
    import os
    import time

    from pipeline.data.build import build_manifest
    from pipeline.store import fingerprint as FP

    root = tmp_path / "data"
    write_video(root / "videos" / "long.mkv", moving_figure(7))
    write_video(root / "videos" / "short.mkv", moving_figure(3))
    old = time.time() - 60  # older than the memo's racy window
    for p in (root / "videos").iterdir():
        os.utime(p, (old, old))
    first = build_manifest("folder", root, progress=False)
    reads: list = []
    monkeypatch.setattr(FP, "_read_and_digest", lambda path, **kw: reads.append(path))  # a read fails the test
    second = build_manifest("folder", root, progress=False, frame_stride=2)
    third = build_manifest("folder", root, progress=False)
    assert reads == []
    assert third.video_frames == first.video_frames and third.fingerprints == first.fingerprints
    assert second.frame_ids == ["long.mkv/0", "long.mkv/2", "long.mkv/4", "long.mkv/6", "short.mkv/0",
                                             "short.mkv/2"]
    assert second.video_frames == [first.video_frames[first.frame_ids.index(f)] for f in second.frame_ids]


def test_images_and_videos_in_one_folder(tmp_path):
    import cv2

    from pipeline.data.build import build_manifest

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    src = moving_figure(5, 40, 56)
    cv2.imwrite(str(root / "images" / "still.png"), src[0][:, :, ::-1])
    write_video(root / "videos" / "clip.mp4", src, encoding="x264rgb-lossless")
    m = build_manifest("folder", root, progress=False, frame_stride=2)
    assert m.frame_ids == ["still", "clip.mp4/0", "clip.mp4/2", "clip.mp4/4"]
    assert [v and v[0] for v in m.video_frames] == [None, 0, 2, 4]
    assert m.fingerprints[0].startswith("xxh3:") and "@" not in m.fingerprints[0]
    for i, k in enumerate([0, 0, 2, 4]):
        np.testing.assert_array_equal(read_frame(m, i), src[k])


# ------------------------------------------------------------------------------------------------ end to end


def _losses(run_dir: Path) -> list:
    return [json.loads(line).get("loss") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_video_dataset_trains_like_the_same_frames_as_images(tmp_path):
    """depth (files), teach, distill and eval read frames straight from the videos; with lossless videos every
    loss equals that of the same frames as PNG files."""
    from pipeline.config import load_config
    from pipeline.data.images import read_rgb
    from pipeline.runner import run_pipeline

    vroot = tmp_path / "video" / "data"
    frames = synthetic_as_videos(vroot)
    iroot = tmp_path / "image" / "data"  # the same frames, annotations and depth as image files, in the same
    shutil.copytree(vroot, iroot, ignore=shutil.ignore_patterns("videos", "depth"))  # order: a.mkv/005.png
    import cv2

    def padded(fid: str) -> str:
        v, _, k = fid.rpartition("/")
        return f"{v}/{int(k):03d}"

    for fid, img in frames.items():
        p = iroot / "images" / f"{padded(fid)}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), img[:, :, ::-1])
        np.testing.assert_array_equal(read_rgb(p), img)
        (iroot / "depth" / padded(fid)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(vroot / "depth" / f"{fid}.npy", iroot / "depth" / f"{padded(fid)}.npy")
    lines = (vroot / "keypoints.csv").read_text().splitlines()
    (iroot / "keypoints.csv").write_text("\n".join([lines[0]] + [padded(ln.split(",", 1)[0]) + "," + ln.split(",", 1)[1]
                                                                 for ln in lines[1:]]) + "\n")
    runs = {}
    with torch_threads(1):
        for name, root in (("video", vroot), ("image", iroot)):
            y = tmp_path / name / "tiny.yaml"
            y.write_text(TINY_YAML.format(root=root))
            runs[name] = run_pipeline(load_config(str(y), ["data.manifest=folder"]), str(tmp_path / name / "store"),
                                      console=quiet_console())
    v, i = runs["video"], runs["image"]
    assert [padded(f) for f in v.manifest.frame_ids] == i.manifest.frame_ids and v.manifest.video_frames is not None
    for stage in ("teach", "distill"):
        assert _losses(v.stages[stage].path) == _losses(i.stages[stage].path), stage
    mv = json.loads((v.stages["eval"].path / "metrics.json").read_text())
    mi = json.loads((i.stages["eval"].path / "metrics.json").read_text())
    assert mv["student"]["value"] == pytest.approx(mi["student"]["value"], rel=1e-6)
    assert (v.stages["depth"].path / "preview.png").is_file()
