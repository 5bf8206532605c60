"""Worse depth for the teacher: ``depth.degrade`` (the depth-quality study, docs/studies.md).

The paper's open question is how much the depth's quality matters. Instead of running weaker depth models, the
cached depth is degraded as the teacher reads it, in the ways real depth goes wrong: lower resolution, blur,
noise, coarse quantisation and holes (pixels with no reading). Applied by :class:`DegradedReader` around the
depth-cache reader wherever the teacher reads depth (teach's training frames and pictures, distill's teacher
targets and their embedding cache, eval's teacher), never to the cache itself: one cache serves every level,
and the degradation is in teach's key (``pipeline.stages.registry``), not depth's.

Each map's degradation is a pure function of (map, frame index, settings): a frame gets the same noise and holes
every epoch, in every process, as a poor depth estimator makes the same errors on the same frame. That also keeps
the teacher's input deterministic per frame, which distill's embedding cache relies on.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

_STREAM = 0xDE9  # the degradation's own random stream, per frame index
_HOLE_CELLS = 8  # holes are square cells of 1/8 of the shorter side: blobs, as missing readings come, not pixels


def is_identity(d) -> bool:
    """True when ``d`` (a :class:`pipeline.config.DegradeConfig`) leaves depth as it is."""
    return d is None or (d.downscale <= 1.0 and d.blur <= 0 and d.noise <= 0 and d.quantise == 0 and d.holes <= 0)


def degrade_depth(inv: np.ndarray, frame_index: int, d) -> np.ndarray:
    """Degrade one relative inverse-depth map ``inv`` (H, W) float32 (NaN = no reading) of frame ``frame_index``
    with the settings ``d``: downscale, blur, noise, quantise, holes, in that order. Returns a new (H, W) float32
    map (NaN where there is no reading: the teacher's normalisation treats those as the farthest value)."""
    import cv2

    x = np.array(inv, dtype=np.float32, copy=True)  # (H, W)
    if is_identity(d):
        return x
    h, w = x.shape
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_STREAM, int(frame_index)])))
    holes_before = ~np.isfinite(x)
    if holes_before.any():  # resampling would smear NaN: fill with the farthest reading, put the holes back later
        finite = x[~holes_before]
        x[holes_before] = finite.min() if finite.size else 0.0
    if d.downscale > 1.0:
        sh, sw = max(1, round(h / d.downscale)), max(1, round(w / d.downscale))
        small = cv2.resize(x, (sw, sh), interpolation=cv2.INTER_AREA)
        x = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if d.blur > 0:
        sigma = float(d.blur) * min(h, w)
        x = cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo
    if d.noise > 0 and span > 0:
        x = x + rng.standard_normal(size=x.shape, dtype=np.float32) * np.float32(d.noise * span)
    if d.quantise >= 2 and span > 0:
        # d.quantise levels over the frame's range (as a sensor or a codec of that many levels would store it)
        x = lo + np.clip(np.round((x - lo) / span * (d.quantise - 1)), 0, d.quantise - 1) * (span / (d.quantise - 1))
    x = x.astype(np.float32)
    if d.holes > 0:
        cell = max(1, min(h, w) // _HOLE_CELLS)
        gh, gw = -(-h // cell), -(-w // cell)
        drop = rng.random((gh, gw)) < d.holes  # (gh, gw) cells without a reading
        x[np.kron(drop, np.ones((cell, cell), dtype=bool))[:h, :w]] = np.nan
    x[holes_before] = np.nan
    return x


class DegradedReader:
    """A depth-cache reader whose :meth:`read` returns degraded maps; everything else is the wrapped reader's."""

    def __init__(self, reader, degrade) -> None:
        self._reader = reader
        self.degrade = degrade

    def read(self, frame_index: int) -> np.ndarray:
        return degrade_depth(self._reader.read(frame_index), frame_index, self.degrade)

    def __getattr__(self, name):
        if name == "_reader" or name.startswith("__"):  # unpickling (DataLoader workers) asks before _reader is set
            raise AttributeError(name)
        return getattr(self._reader, name)

    def __enter__(self):
        self._reader.__enter__()
        return self

    def __exit__(self, *exc):
        return self._reader.__exit__(*exc)


def teacher_reader(reader, degrade: Optional[object]):
    """``reader`` as the teacher reads it: wrapped in :class:`DegradedReader` when ``degrade`` changes depth."""
    return reader if is_identity(degrade) else DegradedReader(reader, degrade)
