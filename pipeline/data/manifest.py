"""The :class:`Manifest`: every frame of a dataset under one root, in a fixed order, and its file format.

A manifest lists frame id, path relative to the root, partition (``train`` / ``regress`` / ``test``, see
:meth:`Manifest.split`), content fingerprint, size ``(W, H)``, and the ground-truth keypoints converted once
to docs/conventions.md: ``(N, J, 2)`` float32 pixels ``(x, y)`` in the original frame, NaN = missing (per
coordinate). Optional per-frame foreground masks (Human3.6M without background, Taichi test masks) and depth
files (folder layout) ride along; a description with ``apply_masks: true`` has the data loader multiply every
model input by its frame's mask. :func:`pipeline.data.build.build_manifest` makes one from a dataset root.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.data.spec import DatasetSpec
from pipeline.errors import ManifestError
from pipeline.store.fingerprint import combine
from pipeline.store.io import write_atomic

SCHEMA = "dkp.manifest/1"
INDENT_UP_TO = 10_000  # frames: a larger manifest.json is written on one line (Manifest.save)


@dataclass
class Manifest:
    """The frames of one dataset under one root, in a fixed order (index ``i`` = frame ``i``).

    Keypoints: ``keypoints[i]`` is ``(J, 2)`` float32 pixels ``(x, y)`` in frame ``i``'s original
    size (``sizes[i] = (W, H)``), NaN where a joint is missing or the frame has no annotation.
    """

    spec: DatasetSpec
    root: Path
    frame_ids: list[str]
    paths: list[str]  # POSIX paths relative to root
    splits: list[str]  # partition label per frame (see spec.roles)
    fingerprints: list[str]  # "xxh3:<hex>" of each frame file
    sizes: np.ndarray  # (N, 2) int64, (W, H) pixels
    keypoints: Optional[np.ndarray] = None  # (N, J, 2) float32, pixels (x, y), NaN = missing
    mask_paths: Optional[list[Optional[str]]] = None  # per-frame foreground mask, None where absent
    mask_fingerprints: Optional[list[Optional[str]]] = None
    depth_paths: Optional[list[str]] = None  # folder layout: external depth per frame
    depth_fingerprints: Optional[list[str]] = None
    orientations: Optional[list[int]] = None  # EXIF orientation per frame (applied on read); None: all 1
    # Frames of videos (folder layout's videos/): per frame [k, pts] (frame index in the video, presentation time
    # in its stream's time base; pipeline.data.video), None for an image file; None: no video frame at all.
    # paths[i] is then the video file, and pipeline.data.video.read_frame reads the frame.
    video_frames: Optional[list] = None

    def __post_init__(self) -> None:
        n = len(self.frame_ids)
        self.root = Path(self.root)
        self.sizes = np.asarray(self.sizes, dtype=np.int64).reshape(n, 2)  # (N, 2) (W, H)
        for name in ("paths", "splits", "fingerprints", "mask_paths", "mask_fingerprints", "depth_paths",
                     "depth_fingerprints", "orientations", "video_frames"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"Manifest.{name} has {len(v)} entries for {n} frames")
        if self.keypoints is not None:
            self.keypoints = np.asarray(self.keypoints, dtype=np.float32)
            if self.keypoints.ndim != 3 or self.keypoints.shape[0] != n or self.keypoints.shape[2] != 2:
                raise ValueError(f"Manifest.keypoints must be (N={n}, J, 2), got {self.keypoints.shape}")

    # ---- metadata shortcuts (what the stages read)
    def __len__(self) -> int:
        return len(self.frame_ids)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def protocol(self) -> str:
        return self.spec.protocol

    @property
    def n_keypoints(self) -> int:
        return self.spec.n_keypoints

    @property
    def n_joints(self) -> Optional[int]:
        return None if self.keypoints is None else int(self.keypoints.shape[1])

    @property
    def hflip(self) -> bool:
        return self.spec.hflip

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def depth_options(self) -> Optional[dict]:
        """``{"kind": "depth"|"inverse_depth", "scale": float}`` for external depth files, else None."""
        return self.spec.depth.to_dict() if (self.spec.depth and self.depth_paths is not None) else None

    @property
    def apply_masks(self) -> bool:
        """Whether the data loader multiplies model inputs by :attr:`mask_paths` (``apply_masks`` in the YAML)."""
        return self.spec.apply_masks

    @property
    def left_right_pairs(self) -> Any:
        """The left/right joint pairs ``ROOT/dataset.yaml`` gives (folder layout), as written there, or None.

        Read from the top-level ``left_right_pairs``, else from ``synthetic.left_right_pairs`` (where
        ``dkp-pipeline synth`` has always written them). Unvalidated: eval checks them against the joints.
        """
        extra = self.spec.extra
        if extra.get("left_right_pairs") is not None:
            return extra["left_right_pairs"]
        syn = extra.get("synthetic")
        return syn.get("left_right_pairs") if isinstance(syn, dict) else None

    @property
    def description_sha256(self) -> str:
        return self.spec.description_sha256

    # ---- fingerprints
    @property
    def fingerprint(self) -> str:
        """``combine`` of the ordered frame fingerprints: changes iff a frame's bytes or the order change.
        Computed once (a million fingerprints take a few tenths of a second), again if the list is replaced."""
        cached = getattr(self, "_fp_cache", None)
        if cached is None or cached[0] is not self.fingerprints or cached[1] != len(self.fingerprints):
            cached = self._fp_cache = (self.fingerprints, len(self.fingerprints), combine(self.fingerprints))
        return cached[2]

    @property
    def depth_fingerprint(self) -> str:
        """``combine`` of the ordered depth-file fingerprints; ManifestError if there are no depth files."""
        if self.depth_fingerprints is None:
            raise ManifestError(f"dataset {self.name} under {self.root} has no depth files "
                                f"(put them in {self.spec.files.get('depth_dir', 'depth')}/ or set "
                                f"depth.provider: midas)")
        return combine(self.depth_fingerprints)

    @property
    def mask_fingerprint(self) -> Optional[str]:
        """``combine`` of the ordered mask fingerprints (``-`` for a frame without one), None without masks."""
        if self.mask_fingerprints is None:
            return None
        return combine([fp or "-" for fp in self.mask_fingerprints])

    @property
    def annotation_fingerprint(self) -> str:
        """xxh3 of the GT keypoints (float32 bytes, NaN included) and the partitions: what eval reads."""
        import xxhash

        h = xxhash.xxh3_128()
        h.update("\n".join(self.splits).encode())
        if self.keypoints is not None:
            h.update(repr(self.keypoints.shape).encode())
            h.update(np.ascontiguousarray(self.keypoints).tobytes())
        return "xxh3:" + h.hexdigest()

    # ---- splits
    @property
    def has_gt(self) -> np.ndarray:
        """(N,) bool: frame has at least one annotated joint."""
        if self.keypoints is None:
            return np.zeros(len(self), dtype=bool)
        return ~np.isnan(self.keypoints).all(axis=(1, 2))

    def split(self, name: str) -> np.ndarray:
        """(M,) int64 frame indices, ascending, of role ``name``: train | regress | test | all.

        ``train`` = every frame of the role's partitions (annotated or not: self-supervised);
        ``regress``/``test`` = the annotated frames of theirs (AutoLink's TrainRegSet / TestSet).
        """
        if name == "all":
            return np.arange(len(self), dtype=np.int64)
        if name not in self.spec.roles:
            raise ManifestError(f"unknown split {name!r} for dataset {self.name}; valid: "
                                f"{', '.join(list(self.spec.roles) + ['all'])}")
        labels, codes = self._split_codes()
        mask = np.isin(codes, [k for k, label in enumerate(labels) if label in self.spec.roles[name]])
        if name != "train":
            mask &= self.has_gt
        return np.flatnonzero(mask).astype(np.int64)

    def _split_codes(self) -> tuple[list[str], np.ndarray]:
        """(distinct partition labels, (N,) int index of each frame's label): split() is then integer
        comparisons, not a million string hashes per call. Recomputed if ``splits`` is replaced."""
        cached = getattr(self, "_codes_cache", None)
        if cached is None or cached[0] is not self.splits or len(cached[2]) != len(self.splits):
            table: dict[str, int] = {}
            codes = np.fromiter((table.setdefault(s, len(table)) for s in self.splits), dtype=np.int64,
                                count=len(self.splits))
            cached = (self.splits, list(table), codes)
            self._codes_cache = cached
        return cached[1], cached[2]

    def path_of(self, i: int) -> Path:
        return self.root / self.paths[i]

    # ---- files
    def to_json_dict(self, keypoints_file: Optional[dict] = None) -> dict:
        return {
            "schema": SCHEMA,
            "dataset": self.spec.to_dict(),
            "source": self.spec.source,
            "root": str(self.root),
            "n_frames": len(self),
            "fingerprint": self.fingerprint,
            "frames": {
                "id": self.frame_ids, "path": self.paths, "split": self.splits, "fingerprint": self.fingerprints,
                "wh": self.sizes.tolist(), "mask": self.mask_paths, "mask_fingerprint": self.mask_fingerprints,
                "depth": self.depth_paths, "depth_fingerprint": self.depth_fingerprints,
                "orientation": self.orientations,
                # only when there are video frames: manifests of image datasets stay byte for byte as they were
                **({"video_frame": self.video_frames} if self.video_frames is not None else {}),
            },
            "keypoints": keypoints_file,
        }

    @staticmethod
    def _side_file(path: Path) -> Path:
        stem = path.name[:-5] if path.name.endswith(".json") else path.name
        return path.with_name(stem + ".keypoints.npy")

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON (+ ``<stem>.keypoints.npy`` beside it when there are keypoints), each atomically (indented up to
        :data:`INDENT_UP_TO` frames, one line beyond).

        The side file is written first and its xxh3 recorded in the JSON, so a JSON never names a
        half-written or foreign side file. No pickles. Returns the JSON path.
        """
        import xxhash


        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        kp_entry = None
        if self.keypoints is not None:
            side = self._side_file(path)
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(self.keypoints, dtype=np.float32), allow_pickle=False)
            raw = buf.getvalue()
            write_atomic(side, raw)
            kp_entry = {"file": side.name, "shape": list(self.keypoints.shape), "dtype": "float32",
                        "xxh3": "xxh3:" + xxhash.xxh3_128(raw).hexdigest(),
                        "units": "pixels (x, y) in the original frame; NaN = missing"}
        # Indented for a reader up to INDENT_UP_TO frames; beyond, on one line: json's C encoder only runs without
        # indentation, ~20x faster than its Python one for the millions of values of a large dataset.
        indent = 1 if len(self) <= INDENT_UP_TO else None
        write_atomic(path, json.dumps(self.to_json_dict(kp_entry), indent=indent) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, root: Optional[str | os.PathLike] = None) -> "Manifest":
        """Read a manifest written by :meth:`save`; ``root`` overrides the recorded root (moved data)."""
        import xxhash

        path = Path(path)
        fix = "rebuild it with `dkp-pipeline manifest build`"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"manifest {path} not found ({fix})") from None
        except (OSError, ValueError) as e:
            raise ManifestError(f"manifest {path} is unreadable ({e}); {fix}") from None
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ManifestError(f"manifest {path}: schema {d.get('schema') if isinstance(d, dict) else None!r} "
                                f"is not {SCHEMA!r}; {fix}")
        try:
            f = d["frames"]
            kp = None
            if d.get("keypoints"):
                e = d["keypoints"]
                side = path.with_name(e["file"])
                try:
                    raw = side.read_bytes()
                except OSError as err:
                    raise ManifestError(f"manifest {path}: keypoint file {side} unreadable ({err}); {fix}") from None
                if "xxh3:" + xxhash.xxh3_128(raw).hexdigest() != e["xxh3"]:
                    raise ManifestError(f"manifest {path}: keypoint file {side} does not match the manifest "
                                        f"(changed or from another build); {fix}")
                kp = np.load(io.BytesIO(raw), allow_pickle=False)
            m = cls(spec=DatasetSpec.from_dict(d["dataset"], source=d.get("source", "")),
                    root=Path(root) if root is not None else Path(d["root"]),
                    frame_ids=list(f["id"]), paths=list(f["path"]), splits=list(f["split"]),
                    fingerprints=list(f["fingerprint"]), sizes=np.asarray(f["wh"], dtype=np.int64),
                    keypoints=kp, mask_paths=f.get("mask"), mask_fingerprints=f.get("mask_fingerprint"),
                    depth_paths=f.get("depth"), depth_fingerprints=f.get("depth_fingerprint"),
                    orientations=f.get("orientation"), video_frames=f.get("video_frame"))
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"manifest {path} is malformed ({type(e).__name__}: {e}); {fix}") from None
        if m.fingerprint != d.get("fingerprint"):
            raise ManifestError(f"manifest {path}: frame fingerprints do not add up to the recorded "
                                f"fingerprint (file edited by hand?); {fix}")
        return m
