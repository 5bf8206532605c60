"""Reading frames and depth files into the conventions of docs/conventions.md, with named errors.

Decisions for unusual inputs (documented and tested in docs/reliability.md, tests/test_bad_inputs.py):
- grayscale (8/16-bit): converted to RGB by replication;
- 16-bit RGB: scaled to 8-bit (value / 257, rounded), as every 8-bit pipeline would see it;
- RGBA (8/16-bit): alpha dropped (frames are opaque video frames; compositing on a colour would invent content);
- CMYK JPEG: OpenCV's decoder converts it to RGB (within 1 grey level of Pillow's conversion);
- zero-byte, truncated (PNG without IEND, JPEG without EOI) or undecodable files: refused, file named;
- anything else OpenCV decodes under a frame name (float or 32-bit samples, e.g. a TIFF renamed .png,
  or a channel count other than 1, 3, 4): refused, file named, "convert it to 8-bit RGB";
- a JPEG with an EXIF orientation tag: rotated/mirrored as the tag says, as image viewers (and so
  annotation tools) show it; sizes, keypoints and depth all live in that displayed frame;
- depth files: 0, NaN and Inf are "no reading" (Kinect/RealSense write 0 there), kept as NaN holes
  that the teacher's normalisation ignores; a file with no valid pixel is refused.

Every file is read as bytes (``np.fromfile``) and decoded from memory, never by passing its name to
OpenCV, whose C++ path handling crashes on names that are not valid UTF-8.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.errors import ManifestError

# How depth files are decoded; part of the depth key of the files provider (pipeline/graph.py), so caches
# built under another rule (before issue 13: 0 read as 1e-6, infinitely near) are rebuilt, not reused.
DEPTH_FILE_RULE = "depth-files/2: 0, NaN, Inf = no reading (NaN hole); depth -> 1/depth"


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
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] in (3, 4):
        # A channel swap (alpha dropped): the same bytes as img[:, :, 2::-1], ~30x faster than numpy's strided copy.
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB if img.shape[2] == 3 else cv2.COLOR_BGRA2RGB)
    else:
        raise ManifestError(f"frame {path}: {img.shape[2]} channels; expected gray, RGB or RGBA: convert it to "
                            "8-bit RGB")
    from pipeline.store.fingerprint import CHUNK  # the bytes the manifest's probe saw, so both agree on the tag

    return np.ascontiguousarray(apply_orientation(img, exif_orientation(raw[:CHUNK].tobytes())))


def read_gray(path: Path | str) -> np.ndarray:
    """A mask or any picture as (H, W) uint8 luminance (decoded like :func:`read_rgb`, errors named the same)."""
    import cv2

    return cv2.cvtColor(read_rgb(path), cv2.COLOR_RGB2GRAY)


def exif_orientation(head: bytes) -> int:
    """The EXIF orientation (1..8; 1 = as stored) of a JPEG from its first bytes; 1 for anything else.

    Reads the APP1 "Exif" segment's IFD0 tag 0x0112 (TIFF byte order either way); a missing, damaged or
    out-of-range tag counts as 1, as viewers treat it.
    """
    import struct

    if head[:2] != b"\xff\xd8":
        return 1
    i, n = 2, len(head)
    while i + 4 <= n and head[i] == 0xFF:
        marker = head[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0xDA or 0xD0 <= marker <= 0xD9:  # image data: no EXIF after this
            return 1
        seg_len = struct.unpack(">H", head[i + 2:i + 4])[0]
        seg = head[i + 4:i + 2 + seg_len]
        if marker == 0xE1 and seg[:6] == b"Exif\x00\x00":
            tiff = seg[6:]
            order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
            if order is None or len(tiff) < 8:
                return 1
            ifd = struct.unpack(order + "I", tiff[4:8])[0]
            if ifd + 2 > len(tiff):
                return 1
            count = struct.unpack(order + "H", tiff[ifd:ifd + 2])[0]
            for k in range(count):
                e = ifd + 2 + 12 * k
                if e + 12 > len(tiff):
                    return 1
                tag, typ = struct.unpack(order + "HH", tiff[e:e + 4])
                if tag == 0x0112 and typ == 3:  # SHORT
                    value = struct.unpack(order + "H", tiff[e + 8:e + 10])[0]
                    return value if 1 <= value <= 8 else 1
            return 1
        i += 2 + seg_len
    return 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """``img`` (H, W, ...) as a viewer shows it under EXIF ``orientation`` (5..8 swap width and height)."""
    if orientation == 2:
        return img[:, ::-1]
    if orientation == 3:
        return img[::-1, ::-1]
    if orientation == 4:
        return img[::-1]
    if orientation == 5:
        return np.swapaxes(img, 0, 1)
    if orientation == 6:
        return np.rot90(img, k=-1)
    if orientation == 7:  # transverse: mirror across the anti-diagonal
        return np.swapaxes(img[::-1, ::-1], 0, 1)
    if orientation == 8:
        return np.rot90(img, k=1)
    return img


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
    Pixels holding 0, NaN or Inf have no reading (what depth cameras write there) and come back as NaN.
    Returns (H, W) float32. Negative depth, a wrong shape or a map with no valid pixel are named errors.
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
        raw = np.fromfile(path, dtype=np.uint8)
        d = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
        if d is None:
            raise ManifestError(f"depth file {path}: not a readable PNG")
    if d.ndim == 3 and d.shape[2] == 1:
        d = d[:, :, 0]
    if d.ndim != 2:
        raise ManifestError(f"depth file {path}: shape {d.shape}; expected a single-channel (H, W) map")
    d = d.astype(np.float32) * np.float32(scale)
    hole = ~np.isfinite(d) | (d == 0)
    if hole.all():
        raise ManifestError(f"depth file {path}: no valid pixel (every value is 0, NaN or Inf, i.e. no reading); "
                            "remove the frame or its depth file, or pass --skip-bad-frames to mark it invalid")
    if kind not in ("depth", "inverse"):
        raise ManifestError(f"depth_kind {kind!r} for {path}: expected 'depth' or 'inverse'")
    if kind == "depth" and (d[~hole] < 0).any():
        raise ManifestError(f"depth file {path}: negative depth values; is depth_kind right (depth vs inverse)?")
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1.0 / d if kind == "depth" else d
    return np.where(hole, np.float32(np.nan), out).astype(np.float32)


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


# Frames the square resize/crop (docs/conventions.md) treats badly enough to warn about: upscaled more
# than MAX_UPSCALE times (the shorter side below model size / MAX_UPSCALE), or an aspect ratio above
# MAX_ASPECT:1 (the centre crop keeps under 1 / MAX_ASPECT of the longer side). Warnings, not errors:
# such frames train and evaluate; they just carry little information.
MAX_UPSCALE = 2.0
MAX_ASPECT = 2.0


def size_warnings(sizes: np.ndarray, ids, model_size: int) -> list[str]:
    """Warnings for frames of ``sizes`` ((N, 2) (W, H)) that the square transform to ``model_size`` upscales
    more than MAX_UPSCALE times or crops to less than 1 / MAX_ASPECT of their longer side."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    if len(sizes) == 0:
        return []
    short, long_ = sizes.min(axis=1), sizes.max(axis=1)
    out = []

    def example(mask) -> str:
        i = int(np.flatnonzero(mask)[0])
        return f"e.g. {ids[i]!r} ({sizes[i, 0]}x{sizes[i, 1]})"

    small = short * MAX_UPSCALE < model_size
    if small.any():
        out.append(f"{int(small.sum())} frame(s) have a shorter side under {model_size / MAX_UPSCALE:g} px and are "
                   f"upscaled more than {MAX_UPSCALE:g}x to the model size {model_size}, {example(small)}; check "
                   f"them, or lower model.image_size")
    wide = long_ > MAX_ASPECT * short
    if wide.any():
        kept = float((short[wide] / long_[wide]).min()) * 100
        out.append(f"{int(wide.sum())} frame(s) have an aspect ratio above {MAX_ASPECT:g}:1, so the square centre "
                   f"crop keeps as little as {kept:.1f} % of the longer side (the detector never sees the rest), "
                   f"{example(wide)}; crop or pad them to near-square")
    return out


# --------------------------------------------------------------------------------------------------
# probes: image and depth headers, so a frame's size costs nothing beyond the read for its hash (the manifest
# build hands them to pipeline.store.fingerprint.scan_files, which reads each file once)


def _png_header(head: bytes) -> Optional[tuple[int, int, int]]:
    """(W, H, bit depth) from a PNG's IHDR, or None if ``head`` is not a PNG."""
    if len(head) >= 25 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return w, h, head[24]
    return None


def probe_image(head: bytes, path: str | os.PathLike) -> dict:
    """``{"wh": [W, H], "orientation": 1..8}`` of an image from its header, as viewers show it: a JPEG's EXIF
    orientation 5..8 swaps W and H (pipeline.data.images.read_rgb applies the tag). Decodes with OpenCV, from
    the bytes, only for other formats."""
    png = _png_header(head)
    if png is not None:
        return {"wh": [png[0], png[1]], "orientation": 1}
    jpg = jpeg_header(head)  # (H, W, components, bits): the marker walk the depth stage's reader uses too
    if jpg is not None and jpg[0] > 0 and jpg[1] > 0:
        o = exif_orientation(head)
        h, w = jpg[0], jpg[1]
        return {"wh": [h, w] if o >= 5 else [w, h], "orientation": o}
    import cv2
    import numpy as np

    raw = np.fromfile(path, dtype=np.uint8)  # not cv2.imread: its path handling crashes on non-UTF-8 names
    img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if img is None:
        raise ValueError("not a readable image (OpenCV could not decode it)")
    return {"wh": [int(img.shape[1]), int(img.shape[0])], "orientation": 1}


def probe_depth(head: bytes, path: str | os.PathLike) -> dict:
    """``{"wh": [W, H], "depth_format": "png16" | "npy:<dtype>"}`` from a depth file's header."""
    png = _png_header(head)
    if png is not None:
        if png[2] != 16:
            raise ValueError(f"PNG depth must be 16-bit, this one is {png[2]}-bit (save it as 16-bit PNG or float .npy)")
        return {"wh": [png[0], png[1]], "depth_format": "png16"}
    if head[:6] == b"\x93NUMPY":
        import io

        import numpy as np

        f = io.BytesIO(head)
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = reader(f)
        if len(shape) != 2 or dtype.kind != "f":
            raise ValueError(f".npy depth must be a 2-D float array (H, W), this one is {dtype} {shape}")
        return {"wh": [int(shape[1]), int(shape[0])], "depth_format": f"npy:{dtype.str}"}
    raise ValueError("neither a 16-bit PNG nor a .npy file")
