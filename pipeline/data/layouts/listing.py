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
    kp: Optional[np.ndarray] = None  # (N, J, 2) float in `kp_units`, NaN = missing / no annotation
    kp_units: str = "pixels_xy"  # pixels_xy | unit_rowcol (Human3.6M: (row, col) in [0, 1])
    kp_sources: list[str] = field(default_factory=list)  # per frame: annotation file (for messages)
    # or, for one annotation file of many rows (folder's keypoints.csv): its name and each frame's line (0: none)
    kp_file: str = ""
    kp_lines: Optional[np.ndarray] = None
    masks: Optional[list[Optional[str]]] = None
    depths: Optional[list[str]] = None
    # the stat of each file of `paths` / `depths`, when the walker has it from walking the folders (the build
    # then stats nothing again): attribute name -> pipeline.store.fingerprint.Stats aligned with that list; for
    # `paths` with video frames, aligned with its image files only (those whose video_frames entry is None)
    stats: dict = field(default_factory=dict)
    ids_unique: bool = False  # the walker has already refused duplicate ids (with its own message)
    # Frames of videos (folder layout): per frame [k, pts] or None for an image file (Manifest.video_frames), and
    # per video path what its scan found (fingerprint, probe: "wh", "pts", "rotation"); build.py fingerprints only
    # the image files and takes these for the rest.
    video_frames: Optional[list] = None
    videos: Optional[dict] = None

    def source(self, i: int) -> str:
        """Where frame ``i``'s keypoints come from, for messages ("keypoints.csv line 12", a file name)."""
        if self.kp_lines is not None:
            return f"{self.kp_file} line {int(self.kp_lines[i])}" if self.kp_lines[i] else ""
        return self.kp_sources[i] if i < len(self.kp_sources) else ""
