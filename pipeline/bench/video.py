"""`dkp-pipeline bench video`: decoding a video with PyAV (what pipeline.data.video uses) against torchcodec, and
against the same frames as JPEG files (what the tool read before videos came in), in one run.

Cases, on one generated H.264 video (``--frames`` frames of ``--size`` x ``--size * 16/9`` px, key frame every 60,
B-frames as cameras write them): sequential decode of every frame to (H, W, 3) uint8 RGB; random access to
``--steps`` frames in a seeded random order (PyAV: :class:`pipeline.data.video.VideoReader`; torchcodec:
``VideoDecoder(seek_mode="exact").get_frame_at``); JPEG files (quality 95) read with ``read_rgb``. torchcodec is a
case only where it imports (its PyPI wheel needs FFmpeg's shared libraries and a CUDA torch build); its absence is
recorded with the reason.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np


def _rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def bench_video(*, batch: int, size: int, steps: int, device=None, isolate: bool = True, frames: int = 240) -> dict:
    import cv2

    from pipeline.data.images import read_rgb
    from pipeline.data.video import VideoReader, iter_video, moving_figure, probe_video, write_video

    h, w = size, (size * 16 // 9) // 2 * 2
    imgs = moving_figure(frames, h, w)
    cases: dict = {}
    with tempfile.TemporaryDirectory(prefix="dkp-bench-video-") as tmp:
        root = Path(tmp)
        from pipeline.data import video as V

        V.ENCODINGS["bench"] = ("libx264", "yuv420p", {"crf": "20", "x264-params": "keyint=60:bframes=2"})
        path = write_video(root / "clip.mp4", imgs, encoding="bench")
        for k, im in enumerate(imgs):
            cv2.imwrite(str(root / f"{k:05d}.jpg"), im[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        pts = probe_video(b"", path)["pts"]
        order = np.random.default_rng(0).permutation(frames)[:steps]
        for _ in range(2):  # the second pass is kept: files in the page cache, libraries loaded
            cases["pyav_sequential"] = {"frames_per_s": _rate(lambda: [None for _ in iter_video(path)], frames)}
            r = VideoReader(path)
            cases["pyav_random"] = {"frames_per_s": _rate(lambda: [r.read(int(k), pts[k]) for k in order], steps)}
            cases["jpeg_files"] = {"frames_per_s": _rate(lambda: [read_rgb(root / f"{k:05d}.jpg")
                                                                 for k in range(frames)], frames)}
            try:
                from torchcodec.decoders import VideoDecoder

                def tc_seq():
                    d = VideoDecoder(str(path), seek_mode="exact", dimension_order="NHWC")
                    for k in range(len(d)):
                        d[k].numpy()

                cases["torchcodec_sequential"] = {"frames_per_s": _rate(tc_seq, frames)}
                d = VideoDecoder(str(path), seek_mode="exact", dimension_order="NHWC")
                cases["torchcodec_random"] = {"frames_per_s": _rate(lambda: [d.get_frame_at(int(k)).data.numpy()
                                                                             for k in order], steps)}
                same = all(np.array_equal(d.get_frame_at(int(k)).data.numpy(), r.read(int(k), pts[k]))
                           for k in order[:8])
                cases["torchcodec_random"]["pixels_equal_pyav"] = bool(same)
            except Exception as e:  # not installed, or its libraries do not load here
                cases["torchcodec"] = {"unavailable": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    ratios = {"sequential pyav/jpeg": cases["pyav_sequential"]["frames_per_s"] / cases["jpeg_files"]["frames_per_s"],
              "random pyav/sequential pyav": cases["pyav_random"]["frames_per_s"]
              / cases["pyav_sequential"]["frames_per_s"]}
    if "torchcodec_sequential" in cases:
        ratios["sequential torchcodec/pyav"] = (cases["torchcodec_sequential"]["frames_per_s"]
                                                / cases["pyav_sequential"]["frames_per_s"])
        ratios["random torchcodec/pyav"] = (cases["torchcodec_random"]["frames_per_s"]
                                            / cases["pyav_random"]["frames_per_s"])
    return {"baseline": "PyAV sequential decode (and the same frames as JPEG files)", "cases": cases,
            "ratios": ratios, "setup": {"frames": frames, "frame": f"{w}x{h}", "codec": "H.264 yuv420p crf 20, "
                                        "keyint 60, 2 B-frames", "random_reads": steps}}
