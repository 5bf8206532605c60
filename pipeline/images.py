"""Reading frames and depth files into the conventions of docs/conventions.md, with named errors.

Decisions for unusual inputs (documented and tested in docs/reliability.md, tests/test_bad_inputs.py):
- grayscale (8/16-bit): converted to RGB by replication;
- 16-bit RGB: scaled to 8-bit (value / 257, rounded), as every 8-bit pipeline would see it;
- RGBA (8/16-bit): alpha dropped (frames are opaque video frames; compositing on a colour would invent content);
- CMYK JPEG: OpenCV's decoder converts it to RGB (within 1 grey level of Pillow's conversion);
- zero-byte, truncated (PNG without IEND, JPEG without EOI) or undecodable files: refused, file named;
- anything else OpenCV decodes under a frame name (float or 32-bit samples, e.g. a TIFF renamed .png,
  or a channel count other than 1, 3, 4): refused, file named, "convert it to 8-bit RGB".
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.errors import ManifestError


def read_rgb(path: Path | str) -> np.ndarray:
    """Decode one frame. Returns (H, W, 3) uint8 RGB."""
    path = Path(path)
    return decode_rgb(path, read_frame_bytes(path))


def read_frame_bytes(path: Path | str) -> np.ndarray:
    """The bytes of one frame file, (n,) uint8; missing, unreadable and empty files are named errors."""
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise ManifestError(f"frame {path}: file not found (was it moved? rebuild the manifest)") from None
    except OSError as e:  # a directory, no permission, I/O error
        raise ManifestError(f"frame {path}: cannot be read ({e.strerror or e}); fix the file or its permissions, "
                            "or pass --skip-bad-frames") from None
    if raw.size == 0:
        raise ManifestError(f"frame {path}: file is empty (0 bytes); re-extract it or remove it from the dataset "
                            "(or pass --skip-bad-frames)")
    return raw


def check_not_truncated(path: Path, raw: np.ndarray) -> None:
    if _looks_truncated(path, raw):
        raise ManifestError(f"frame {path}: image data is truncated (no end marker); re-extract it or pass "
                            "--skip-bad-frames")


def decode_rgb(path: Path, raw: np.ndarray) -> np.ndarray:
    """Decode the bytes ``raw`` of frame ``path`` (named in errors). Returns (H, W, 3) uint8 RGB."""
    import cv2

    img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ManifestError(f"frame {path}: not a decodable image (truncated or not JPEG/PNG); re-extract it or "
                            "pass --skip-bad-frames")
    check_not_truncated(path, raw)
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ManifestError(f"frame {path}: unsupported sample type {img.dtype}; convert it to 8-bit RGB "
                            "(PNG or JPEG)")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] not in (3, 4):
        raise ManifestError(f"frame {path}: {img.shape[2]} channels; expected gray, RGB or RGBA: convert it to "
                            "8-bit RGB")
    # A channel swap (alpha dropped): the same bytes as img[:, :, 2::-1], ~30x faster than numpy's strided copy.
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB if img.shape[2] == 3 else cv2.COLOR_BGRA2RGB)


def jpeg_header(raw: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    """(height, width, components, bits per sample) from a JPEG's frame header (SOFn), or None when
    ``raw`` is not a JPEG or the header is not found. Reads markers only, decodes nothing."""
    b = raw.tobytes() if isinstance(raw, np.ndarray) else bytes(raw)
    if not b.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers
            i += 2
            continue
        length = int.from_bytes(b[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..15 (not DHT, JPG, DAC)
            if i + 10 > len(b):
                return None
            bits, h, w, comps = b[i + 4], int.from_bytes(b[i + 5:i + 7], "big"), int.from_bytes(b[i + 7:i + 9],
                                                                                                "big"), b[i + 9]
            return h, w, comps, bits
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        i += 2 + length
    return None


def read_mask(path: Path | str) -> np.ndarray:
    """Decode a foreground mask as the factor each pixel is multiplied by. Returns (H, W, 1) or (H, W, 3) float32.

    The factor is the 8-bit value / 255, per channel, unthresholded: what torchvision's ``ToTensor`` makes of
    the PIL image AutoLink's h36m_wobg multiplies with (gray or 1-bit PNG -> one channel shared by R, G, B;
    an RGB PNG -> one factor per channel). Other sample types or channel counts are a named error.
    """
    import cv2

    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8) if path.is_file() else None
    m = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw is not None and raw.size else None
    if m is None:
        raise ManifestError(f"mask {path}: missing, empty or not a decodable image; re-extract it (the release "
                            "ships 8-bit PNGs) and rebuild the manifest")
    if m.dtype != np.uint8 or not (m.ndim == 2 or m.shape[2] in (1, 3)):
        raise ManifestError(f"mask {path}: {m.dtype} with {1 if m.ndim == 2 else m.shape[2]} channel(s); expected an "
                            "8-bit gray or RGB PNG (value / 255 = how much of the pixel is kept)")
    m = m.reshape(*m.shape[:2], -1)[:, :, ::-1]  # BGR -> RGB (a no-op for one channel)
    return (m.astype(np.float32) / 255.0).copy()


def _looks_truncated(path: Path, raw: np.ndarray) -> bool:
    # OpenCV decodes truncated JPEGs (grey bottom rows) and some truncated PNGs without failing. The
    # format comes from the file's magic bytes, not its name: a TIFF saved as .png is not "truncated".
    head = raw[:8].tobytes()
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" not in raw[-16:].tobytes()
    if head.startswith(b"\xff\xd8"):
        return b"\xff\xd9" not in raw[-64:].tobytes()
    return False


def read_depth_file(path: Path | str, *, kind: str, scale: float = 1.0) -> np.ndarray:
    """Read an external depth map and convert it to relative inverse depth (larger = nearer).

    ``kind`` is ``"depth"`` (near = small: converted as 1 / d) or ``"inverse"`` (near = large).
    PNGs (8/16-bit, one channel) are multiplied by ``scale``; ``.npy`` files must hold a 2-D float array.
    Returns (H, W) float32. Non-finite values, negative depth or a wrong shape are named errors.
    """
    import cv2

    path = Path(path)
    if not path.exists():
        raise ManifestError(f"depth file {path}: not found")
    if path.suffix.lower() == ".npy":
        try:
            d = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ManifestError(f"depth file {path}: not a plain numpy array ({e}); pickled arrays are refused") from None
        except Exception as e:  # truncated, not an npy
            raise ManifestError(f"depth file {path}: unreadable .npy ({e})") from None
    else:
        d = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if d is None:
            raise ManifestError(f"depth file {path}: not a readable PNG")
    if d.ndim == 3 and d.shape[2] == 1:
        d = d[:, :, 0]
    if d.ndim != 2:
        raise ManifestError(f"depth file {path}: shape {d.shape}; expected a single-channel (H, W) map")
    d = d.astype(np.float32) * np.float32(scale)
    if not np.isfinite(d).all():
        raise ManifestError(f"depth file {path}: contains NaN or Inf; fix or remove the file")
    if kind == "depth":
        if (d < 0).any():
            raise ManifestError(f"depth file {path}: negative depth values; is depth_kind right (depth vs inverse)?")
        return (1.0 / np.maximum(d, 1e-6)).astype(np.float32)
    if kind == "inverse":
        return d
    raise ManifestError(f"depth_kind {kind!r} for {path}: expected 'depth' or 'inverse'")


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size`` then a centre crop to size x size (docs/conventions.md)."""
    import cv2

    h, w = img.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    out = cv2.resize(img, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else img
    y0, x0 = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(out[y0:y0 + size, x0:x0 + size])


def square_transform(h: int, w: int, size: int) -> tuple[float, float, float, float]:
    """The keypoint map of :func:`resize_square`: (sx, sy, off_x, off_y) with x' = sx*x + off_x, y' = sy*y + off_y.

    cv2.resize maps pixel centres, x' + 0.5 = (x + 0.5) * sx, then the crop subtracts its offset.
    """
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    sx, sy = nw / w, nh / h
    y0, x0 = (nh - size) // 2, (nw - size) // 2
    # cv2.resize maps pixel centres: x' + 0.5 = (x + 0.5) * sx
    return sx, sy, 0.5 * sx - 0.5 - x0, 0.5 * sy - 0.5 - y0
