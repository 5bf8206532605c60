"""Video datasets for tests: the tiny synthetic dataset re-encoded as videos (a lossless FFV1 .mkv per clip), with
its keypoints.csv and depth files renamed to the video frame ids (``<video>/<k>``)."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import yaml


def synthetic_as_videos(root: Path, *, n: int = 48, size: int = 32, clips=(("a.mkv", 24), ("sub/b.mkv", 24)),
                        encoding: str = "ffv1") -> dict:
    """Write the `dkp-pipeline synth` dataset (``n`` frames, ``size`` px) into ``root`` as videos: clip c holds the
    next ``len`` frames in order. Returns {frame id: original image (H, W, 3) uint8}. The synthetic block of
    dataset.yaml is dropped (its masks are rendered by frame number, which a video frame id does not carry)."""
    from pipeline.data.images import read_rgb
    from pipeline.data.synth import write_synthetic
    from pipeline.data.video import write_video

    src = root.parent / (root.name + "-images")
    write_synthetic(src, n=n, seed=0, image_size=size, progress=False)
    names = sorted(p.stem for p in (src / "images").glob("*.png"))
    assert sum(c for _, c in clips) == len(names) == n
    ids, frames, start = {}, {}, 0
    for rel, count in clips:
        imgs = [read_rgb(src / "images" / f"{names[start + k]}.png") for k in range(count)]
        (root / "videos" / rel).parent.mkdir(parents=True, exist_ok=True)
        write_video(root / "videos" / rel, imgs, encoding=encoding)
        for k in range(count):
            fid = f"{rel}/{k}"
            ids[names[start + k]], frames[fid] = fid, imgs[k]
            d = root / "depth" / f"{fid}.npy"
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / "depth" / f"{names[start + k]}.npy", d)
        start += count
    with open(src / "keypoints.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    with open(root / "keypoints.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(rows[0])
        for r in rows[1:]:
            w.writerow([ids[r[0]], *r[1:]])
    opts = yaml.safe_load((src / "dataset.yaml").read_text())
    opts["left_right_pairs"] = opts.pop("synthetic")["left_right_pairs"]  # what eval.flip_pairs: dataset reads
    (root / "dataset.yaml").write_text(yaml.safe_dump(opts))
    shutil.rmtree(src)
    return frames


def assert_frames_equal(manifest, frames: dict) -> None:
    """Every frame of ``manifest`` decodes (pipeline.data.video.read_frame) to the image it was written from."""
    from pipeline.data.video import read_frame

    for i, fid in enumerate(manifest.frame_ids):
        np.testing.assert_array_equal(read_frame(manifest, i), frames[fid], err_msg=fid)
