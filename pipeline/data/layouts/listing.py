"""What every layout walker returns: :class:`Listing`, the frames before fingerprinting."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Listing:
    """What a layout walker finds, before fingerprinting; keypoints still in the dataset's units."""

    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    kp: Optional[np.ndarray] = None  # (N, J, 2) float64 in `kp_units`, NaN = missing / no annotation
    kp_units: str = "pixels_xy"  # pixels_xy | unit_rowcol (Human3.6M: (row, col) in [0, 1])
    kp_sources: list[str] = field(default_factory=list)  # per frame: annotation file (for messages)
    masks: Optional[list[Optional[str]]] = None
    depths: Optional[list[str]] = None
    # Frames of videos (folder layout): per frame [k, pts] or None for an image file (Manifest.video_frames), and
    # per video path what its scan found (fingerprint, probe: "wh", "pts", "rotation"); build.py fingerprints only
    # the image files and takes these for the rest.
    video_frames: Optional[list] = None
    videos: Optional[dict] = None
