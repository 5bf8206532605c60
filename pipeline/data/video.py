"""Videos as frames: decoded with PyAV (FFmpeg), never extracted to image files.

Why PyAV and not torchcodec (measured and reasoned in docs/benchmarks.md "Video decoding"): PyAV's wheel ships
FFmpeg (with x264, x265, vpx, dav1d) and needs no torch, so ``pip install`` alone gives a working decoder on
every machine, CI included; torchcodec's PyPI wheel is a CUDA build that needs FFmpeg's shared libraries from
the system and a matching torch. Decoding speed, the other half of the choice, is in the benchmark table.

The rules (docs/conventions.md "Videos"):

- **Frame index.** Frame ``k`` of a video is the frame with the k-th smallest presentation timestamp (pts)
  of its first video stream, found once by demuxing every packet without decoding (:func:`index_video`).
  Never the header's frame count, the average rate or time x fps: those are estimates (wrong for variable
  frame rate files) and B-frames put packets out of presentation order.
- **Frame id.** ``<video path under videos/>/<k>``, e.g. ``clip.mp4/12``; ``data.frame_stride`` keeps k = 0,
  s, 2s, ... of every video.
- **Pixels.** ``rgb24`` from FFmpeg's swscale in the frame's own colour space, then the stream's display
  rotation applied as players apply it (a phone's portrait video is upright, like an EXIF-rotated JPEG). Sizes,
  keypoints and depth all live in that displayed frame.
- **Identity.** A video frame's fingerprint is ``<xxh3 of the video file>@f<k>@<DECODE_TAG>``: the file's bytes,
  the frame and the decode settings, so every stage that reads the frame is keyed by all three.

Random access (:class:`VideoReader`) decodes forward from where the last read stopped when the wanted frame is
at most :data:`FORWARD_LIMIT` frames ahead (a depth shard or a sequential predict reads each frame once, in
order), and otherwise seeks to the key frame at or before it and decodes forward from there.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from pipeline.errors import ConfigError, ManifestError

VIDEO_EXTS = (".mp4", ".mkv", ".mov", ".avi")
VIDEOS_DIR = "videos"  # the folder layout's video folder (files.videos_dir overrides it)
# Appended to every video frame's fingerprint: bump when what a frame decodes to changes (index rule, pixel
# format, rotation handling), so caches and models built from the old pixels are rebuilt, not reused.
DECODE_TAG = "pyav-rgb24-rot/1"
DECODE_RULE = ("video/1: PyAV (FFmpeg); frame k = k-th smallest packet pts of the first video stream; rgb24 via "
               "swscale in the frame's colour space; display rotation applied")
FORWARD_LIMIT = 64  # decode forward (instead of seeking) to a frame at most this many frames ahead
OPEN_READERS = 8  # open videos kept per process (LRU)


def require_av():
    """The ``av`` module, or a ConfigError that says how to install it."""
    try:
        import av
    except ImportError:
        raise ConfigError("reading videos needs PyAV: pip install -e '.[video]' (or pip install av)") from None
    return av


def is_video(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(VIDEO_EXTS)


def frame_fingerprint(video_fingerprint: str, k: int) -> str:
    """The fingerprint of frame ``k`` of a video whose file fingerprint is ``video_fingerprint``."""
    return f"{video_fingerprint}@f{k}@{DECODE_TAG}"


def _open(path: str | os.PathLike):
    av = require_av()
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise ManifestError(f"video {path}: cannot be opened ({e}); is it a complete video file "
                            f"({', '.join(VIDEO_EXTS)})?") from None


def _stream(container, path):
    if not container.streams.video:
        raise ManifestError(f"video {path}: has no video stream; remove it from {VIDEOS_DIR}/")
    return container.streams.video[0]


def _pts(obj) -> Optional[int]:
    """A packet's or frame's presentation time; containers without pts (some AVI files) give only dts."""
    return obj.pts if obj.pts is not None else obj.dts


def _rotation(frame) -> int:
    r = int(round(getattr(frame, "rotation", 0) or 0))
    return r % 360


def to_rgb(frame, rotation: int) -> np.ndarray:
    """A decoded frame as displayed: (H, W, 3) uint8 RGB, ``rotation`` degrees counter-clockwise applied."""
    img = frame.to_ndarray(format="rgb24")  # (h, w, 3) as stored
    if rotation:
        img = np.rot90(img, k=rotation // 90)  # numpy's k > 0 turns counter-clockwise, as the display matrix
    return np.ascontiguousarray(img)


def probe_video(head: bytes, path: str | os.PathLike) -> dict:
    """The fingerprint probe of a video (see :func:`pipeline.store.fingerprint.scan_files`):
    ``{"wh": [W, H] as displayed, "pts": [sorted presentation times], "rotation": degrees}``.

    Demuxes every packet once (no decoding) for the exact frame list, and decodes the first frame for its
    size and rotation. Raises ValueError (named by the scan) for a file FFmpeg cannot read.
    """
    try:
        with _open(path) as c:  # the first frame, for the displayed size
            s = _stream(c, path)
            first = next(iter(c.decode(s)), None)
            rot = _rotation(first) if first is not None else 0
            wh = (first.width, first.height) if first is not None else (0, 0)
        pts = []
        with _open(path) as c:  # every packet, for the exact frame list
            s = _stream(c, path)
            for packet in c.demux(s):
                t = _pts(packet)
                if packet.size and t is not None:  # size 0: a flush packet or an AVI "drop" marker, no frame
                    pts.append(int(t))
    except ManifestError as e:
        raise ValueError(str(e).split(": ", 1)[-1]) from None
    except Exception as e:  # FFmpeg's errors are many (InvalidDataError, ...): name the file, not a traceback
        raise ValueError(f"not a readable video ({type(e).__name__}: {e})") from None
    if not pts or first is None:
        raise ValueError("no decodable video frame in it")
    if len(set(pts)) != len(pts):
        raise ValueError("two frames share a presentation time; remux it (ffmpeg -i IN -c copy OUT.mkv)")
    w, h = wh if rot % 180 == 0 else wh[::-1]
    return {"wh": [int(w), int(h)], "pts": sorted(pts), "rotation": rot}


class VideoReader:
    """Random access to frames of one video by (index, pts), reading forward where it can (module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._c = None
        self._frames: Optional[Iterator] = None
        self._last_k: Optional[int] = None
        self.seeks = 0  # how often a read had to seek (tests and benchmarks look)

    def close(self) -> None:
        if self._c is not None:
            self._c.close()
        self._c, self._frames, self._last_k = None, None, None

    def _restart(self, pts: Optional[int]) -> None:
        """Decode from the key frame at or before ``pts`` (None: from the start of the file)."""
        if self._c is None or pts is None:
            self.close()
            self._c = _open(self.path)
        s = _stream(self._c, self.path)
        if pts is not None:
            self._c.seek(int(pts), stream=s, backward=True, any_frame=False)
            self.seeks += 1
        self._frames = iter(self._c.decode(s))
        self._last_k = None

    def read(self, k: int, pts: int) -> np.ndarray:
        """Frame ``k`` (presentation time ``pts`` in the stream's time base): (H, W, 3) uint8 RGB as displayed."""
        av = require_av()
        ahead = self._last_k is not None and self._last_k < k <= self._last_k + FORWARD_LIMIT
        # Where to decode from, in turn: here (the frame is a little ahead), the key frame at or before it, the
        # start of the file (a seek that lands past the frame: a file without a usable index).
        for where in (["here"] if ahead else []) + [pts, None]:
            if where != "here":
                self._restart(where)
            try:
                for frame in self._frames:
                    t = _pts(frame)
                    if t == pts:
                        self._last_k = k
                        return to_rgb(frame, _rotation(frame))
                    if t is not None and t > pts:
                        break
            except av.FFmpegError as e:
                raise ManifestError(f"video {self.path}: frame {k} cannot be decoded ({e}); re-encode the file or "
                                    "pass --skip-bad-frames") from None
            self._last_k = None
        raise ManifestError(f"video {self.path}: frame {k} (pts {pts}) is not in the file; was it changed since the "
                            "manifest was built? Re-run to rebuild the manifest")


_READERS: "OrderedDict[str, VideoReader]" = OrderedDict()
_READERS_PID = [os.getpid()]
_INHERITED: list = []


def reader(path: str | os.PathLike) -> VideoReader:
    """This process's reader of ``path`` (kept open, at most :data:`OPEN_READERS`, least recently used closed).

    A forked DataLoader worker starts with its own readers: a container's decoder state cannot be shared."""
    if _READERS_PID[0] != os.getpid():
        # A forked worker: the parent's containers are kept referenced and never touched. Closing (or freeing) a
        # copy of FFmpeg state made mid-flight by fork can block on a lock some parent thread held at that moment.
        _INHERITED.extend(_READERS.values())
        _READERS.clear()
        _READERS_PID[0] = os.getpid()
    key = str(path)
    r = _READERS.pop(key, None) or VideoReader(path)
    _READERS[key] = r
    while len(_READERS) > OPEN_READERS:
        _READERS.popitem(last=False)[1].close()
    return r


def read_video_frame(path: str | os.PathLike, k: int, pts: int) -> np.ndarray:
    """Frame ``k`` (presentation time ``pts``) of the video at ``path``: (H, W, 3) uint8 RGB as displayed."""
    return reader(path).read(k, pts)


def read_frame(manifest, i: int) -> np.ndarray:
    """Frame ``i`` of a manifest, an image file or a frame of a video: (H, W, 3) uint8 RGB (docs/conventions.md).

    What every stage reads frames through, so that a video dataset needs nothing extracted by hand."""
    vf = getattr(manifest, "video_frames", None)
    entry = vf[i] if vf is not None else None
    if entry is None:
        from pipeline.data.images import read_rgb

        return read_rgb(manifest.path_of(i))
    return read_video_frame(manifest.path_of(i), int(entry[0]), int(entry[1]))


def is_video_frame(manifest, i: int) -> bool:
    vf = getattr(manifest, "video_frames", None)
    return vf is not None and vf[i] is not None


def iter_video(path: str | os.PathLike) -> Iterator[tuple[int, float, np.ndarray]]:
    """Every frame of a video in presentation order: ``(k, seconds, (H, W, 3) uint8 RGB as displayed)``.

    One sequential decode (what ``predict`` reads a video with); k counts frames as :func:`probe_video` does."""
    av = require_av()
    with _open(path) as c:
        s = _stream(c, path)
        last = None
        try:
            for k, frame in enumerate(c.decode(s)):
                t = _pts(frame)
                if t is not None and last is not None and t <= last:
                    raise ManifestError(f"video {path}: frame {k} is not after frame {k - 1} in time (pts {t} <= "
                                        f"{last}); remux it (ffmpeg -i IN -c copy OUT.mkv)")
                last = t
                seconds = float(t * s.time_base) if t is not None and s.time_base else float("nan")
                yield k, seconds, to_rgb(frame, _rotation(frame))
        except av.FFmpegError as e:
            raise ManifestError(f"video {path}: cannot be decoded ({e}); re-encode it") from None


# Lossless and ordinary encodings :class:`VideoWriter` knows: (codec, pixel format, options). ``ffv1`` in .mkv/.avi
# and ``libx264rgb`` at qp 0 in .mp4 keep RGB bytes exactly (tests check pixels against a second decoder);
# ``libx264`` yuv420p is what cameras and ``predict --overlay`` write (lossy, plays everywhere).
ENCODINGS = {
    "ffv1": ("ffv1", "bgr0", {}),
    "x264rgb-lossless": ("libx264rgb", "rgb24", {"qp": "0"}),
    "x264": ("libx264", "yuv420p", {"crf": "18"}),
    "x264-bframes": ("libx264", "yuv420p", {"crf": "18", "x264-params": "bframes=2:b-adapt=0:keyint=10:scenecut=0"}),
    "mpeg4": ("mpeg4", "yuv420p", {"qmax": "3"}),
}


class VideoWriter:
    """Encode (H, W, 3) uint8 RGB frames into a video file with PyAV (``with VideoWriter(...) as w: w.write(rgb)``).

    ``encoding`` is a key of :data:`ENCODINGS`. yuv420p needs even sides: an odd frame is padded by one black
    row/column (bottom/right), so pixel coordinates are unchanged. Frames get ``pts`` = their number in
    ``time_base`` (default 1/fps) unless given (``predict --overlay`` copies the source's timing, VFR included).
    """

    def __init__(self, path: str | os.PathLike, *, fps: float = 25, encoding: str = "x264", time_base=None,
                 rotation: int = 0) -> None:
        from fractions import Fraction

        av = require_av()
        if encoding not in ENCODINGS:
            raise ConfigError(f"video encoding {encoding!r} unknown; valid: {', '.join(ENCODINGS)}")
        self.codec, self.pix_fmt, self.options = ENCODINGS[encoding]
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._av, self._c, self._s = av, av.open(str(path), "w"), None
        self.fps = Fraction(fps).limit_denominator(1001)
        self.time_base = Fraction(time_base).limit_denominator(1_000_000) if time_base is not None else 1 / self.fps
        self.rotation, self.n = rotation, 0

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close(abort=exc[0] is not None)

    def write(self, rgb: np.ndarray, pts: Optional[int] = None) -> None:
        img = np.ascontiguousarray(rgb, dtype=np.uint8)
        if self.pix_fmt == "yuv420p" and (img.shape[0] % 2 or img.shape[1] % 2):
            img = np.pad(img, ((0, img.shape[0] % 2), (0, img.shape[1] % 2), (0, 0)))
        if self._s is None:
            s = self._c.add_stream(self.codec, rate=self.fps)
            s.width, s.height, s.pix_fmt = img.shape[1], img.shape[0], self.pix_fmt
            s.time_base = self.time_base
            s.codec_context.time_base = self.time_base
            if self.options:
                s.options = dict(self.options)
            if self.rotation:
                s.set_display_rotation(self.rotation)
            self._s = s
        frame = self._av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = self.n if pts is None else int(pts)
        frame.time_base = self.time_base
        for packet in self._s.encode(frame):
            self._c.mux(packet)
        self.n += 1

    def close(self, abort: bool = False) -> None:
        if self._c is None:
            return
        try:
            if self._s is not None and not abort:
                for packet in self._s.encode():  # flush the encoder's delayed frames
                    self._c.mux(packet)
        finally:
            self._c.close()
            self._c = None


def write_video(path: str | os.PathLike, frames, *, fps: float = 25, encoding: str = "ffv1", pts=None,
                time_base=None, rotation: int = 0) -> Path:
    """Write ``frames`` (each (H, W, 3) uint8 RGB) to ``path``; ``pts`` optional per frame (VFR). Returns the path."""
    with VideoWriter(path, fps=fps, encoding=encoding, time_base=time_base, rotation=rotation) as w:
        for i, f in enumerate(frames):
            w.write(f, None if pts is None else pts[i])
    return Path(path)


def moving_figure(n: int, height: int = 48, width: int = 64, seed: int = 0) -> list[np.ndarray]:
    """``n`` frames (H, W, 3) uint8 of a figure walking across a textured background: test and benchmark videos.

    The top-left 8x8 block holds ``16 * k mod 256`` in frame k, so a frame's identity survives a lossy codec."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 4) % 256, (yy * 5) % 256, rng.integers(0, 64, (height, width))], -1).astype(np.uint8)
    out = []
    for k in range(n):
        img = base.copy()
        cx = width * 0.15 + k * width * 0.7 / max(n - 1, 1)
        cy = height / 2 + height / 8 * np.sin(k / 3)
        body = (xx - cx) ** 2 / (width / 12) ** 2 + (yy - cy) ** 2 / (height / 4) ** 2 < 1
        head = (xx - cx) ** 2 + (yy - (cy - height / 3.2)) ** 2 < (height / 12) ** 2
        img[body] = (230, 180, 40)
        img[head] = (250, 220, 190)
        img[:8, :8] = (16 * k) % 256
        out.append(img)
    return out
