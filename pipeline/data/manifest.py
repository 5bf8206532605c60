"""Dataset manifests: a dataset description (``data_manifests/<name>.yaml``) plus a root -> frame list.

A :class:`Manifest` lists, in a fixed order, every frame of a dataset: id, path relative to the root,
partition (``train`` / ``regress`` / ``test``, see :meth:`Manifest.split`), content fingerprint, size
``(W, H)``, and the ground-truth keypoints converted once, here, to docs/conventions.md: ``(N, J, 2)``
float32 pixels ``(x, y)`` in the original frame, NaN = missing (per coordinate). Optional per-frame foreground
masks (Human3.6M without background, Taichi test masks) and depth files (folder layout) ride along; a
description with ``apply_masks: true`` has the data loader multiply every model input by its frame's mask.

:func:`build_manifest` walks a layout exactly as AutoLink's loaders do (research/paper_autolink.md 3),
quirks included; every problem a user can fix is a :class:`~pipeline.errors.ManifestError` naming
the file and the fix. Frame fingerprints come from :mod:`pipeline.fingerprint` and are memoised, so a
rebuild over unchanged files only ``stat``s them.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import pickle
import stat as _stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Sequence

import numpy as np

from pipeline.errors import ManifestError
from pipeline.fingerprint import FingerprintMemo, combine, probe_depth, probe_image, scan_files

log = logging.getLogger(__name__)

SCHEMA = "dkp.manifest/1"
LAYOUTS = ("human36m", "taichi", "deepfashion", "folder")
PROTOCOLS = ("h36m", "taichi", "deepfashion", "l2")
DEPTH_KINDS = ("depth", "inverse_depth")
FOLDER_SPLITS = ("train", "test")  # values allowed in keypoints.csv's split column

# Keys of a dataset YAML; anything else is a typo and an error (a silently ignored key would change
# nothing and look as if it did).
_REQUIRED = ("name", "layout", "protocol", "image_size", "n_keypoints", "n_joints", "hflip", "roles", "files")
_OPTIONAL = ("description", "keypoint_margin", "depth", "apply_masks")
# Keys ROOT/dataset.yaml may override for the folder layout (synth writes some of them).
_OVERRIDABLE = ("n_joints", "n_keypoints", "image_size", "hflip", "keypoint_margin", "protocol",
                "depth_kind", "depth_scale")
# Keys of ROOT/dataset.yaml that are not description overrides but are known: synth's generator block, a
# free-text description, and the left/right joint pairs eval.flip_pairs: dataset reads (see left_right_pairs).
# Others are warned about.
_INFORMATIONAL = ("synthetic", "description", "left_right_pairs")


# --------------------------------------------------------------------------------------------------
# dataset descriptions


@dataclass(frozen=True)
class DepthOptions:
    """What the folder layout's ``depth/`` files hold. value = stored number * ``scale``."""

    kind: str  # "depth" (near = small) or "inverse_depth" (near = large)
    scale: float = 1.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scale": self.scale}


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset description, resolved (package YAML + ``ROOT/dataset.yaml`` overrides)."""

    name: str
    layout: str  # human36m | taichi | deepfashion | folder: which walker reads the root
    protocol: str  # h36m | taichi | deepfashion | l2: evaluation protocol
    image_size: int  # model input side (frames: shorter side resized to this, centre-cropped)
    n_keypoints: int  # K, the number of keypoints the detector learns
    n_joints: Optional[int]  # J, number of ground-truth joints (None: no annotations)
    hflip: bool  # whether training flips horizontally (what AutoLink does for this dataset)
    roles: dict  # role ("train", "regress", "test") -> tuple of partition labels
    files: dict  # layout-specific locations relative to the root
    keypoint_margin: float = 0.0  # GT may lie this fraction of the image side outside the frame
    depth: Optional[DepthOptions] = None
    # Multiply every model input (RGB and the teacher's depth, train/regress/test) by the frame's mask, after
    # normalisation to [-1, 1], as AutoLink's h36m_wobg does: the background becomes 0. Needs a mask per frame.
    apply_masks: bool = False
    description: str = ""
    source: str = ""  # the YAML it came from (not part of the identity)
    extra: dict = field(default_factory=dict)  # unknown keys of ROOT/dataset.yaml, kept for provenance

    def to_dict(self) -> dict:
        """JSON-able form; everything that changes the manifest's meaning (not ``source``)."""
        return {
            "name": self.name, "layout": self.layout, "protocol": self.protocol, "image_size": self.image_size,
            "n_keypoints": self.n_keypoints, "n_joints": self.n_joints, "hflip": self.hflip,
            "roles": {k: list(v) for k, v in self.roles.items()}, "files": self.files,
            "keypoint_margin": self.keypoint_margin, "depth": self.depth.to_dict() if self.depth else None,
            "description": self.description, "extra": self.extra,
            # Only when set, so that the descriptions (and every artifact key) of the datasets that do not
            # mask stay what they were before the field existed.
            **({"apply_masks": True} if self.apply_masks else {}),
        }

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "") -> "DatasetSpec":
        depth = d.get("depth")
        return cls(name=d["name"], layout=d["layout"], protocol=d["protocol"], image_size=int(d["image_size"]),
                   n_keypoints=int(d["n_keypoints"]),
                   n_joints=None if d.get("n_joints") is None else int(d["n_joints"]), hflip=bool(d["hflip"]),
                   roles={k: tuple(v) for k, v in d["roles"].items()}, files=dict(d["files"]),
                   keypoint_margin=float(d.get("keypoint_margin") or 0.0),
                   depth=DepthOptions(kind=depth["kind"], scale=float(depth.get("scale", 1.0))) if depth else None,
                   apply_masks=bool(d.get("apply_masks", False)),
                   description=d.get("description") or "", source=source, extra=dict(d.get("extra") or {}))

    @property
    def description_sha256(self) -> str:
        """sha256 (hex) of the canonical JSON of :meth:`to_dict` without the free-text ``description``
        and the informational ``extra``: what the manifest stage key uses."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("description", "extra")}
        text = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def list_datasets() -> list[str]:
    """Names of the dataset descriptions that ship in ``data_manifests/``."""
    import data_manifests

    return data_manifests.names()


def _yaml_file(name_or_path: str | os.PathLike) -> Path:
    import data_manifests

    s = str(name_or_path)
    if s.endswith((".yaml", ".yml")) or os.sep in s or "/" in s:
        p = Path(s).expanduser()
        if not p.is_file():
            raise ManifestError(f"dataset description {p} not found (give a data_manifests name: "
                                f"{', '.join(list_datasets())}, or a path to a YAML file)")
        return p
    p = data_manifests.yaml_path(s)
    if p is None:
        raise ManifestError(f"unknown dataset {s!r}; valid names: {', '.join(list_datasets())} "
                            f"(or pass a path to your own dataset YAML)")
    return p


def _check_type(src: str, key: str, value: Any, types: tuple, what: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ManifestError(f"{src}: field {key!r} must be {what}, got {value!r}")


def _validate(d: Any, src: str) -> dict:
    if not isinstance(d, dict):
        raise ManifestError(f"{src}: expected a mapping of fields at the top level, got {type(d).__name__}")
    unknown = sorted(set(d) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ManifestError(f"{src}: unknown field(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(_REQUIRED + _OPTIONAL)}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ManifestError(f"{src}: missing field(s) {', '.join(missing)}")
    if d["layout"] not in LAYOUTS:
        raise ManifestError(f"{src}: layout {d['layout']!r} unknown; valid: {', '.join(LAYOUTS)}")
    if d["protocol"] not in PROTOCOLS:
        raise ManifestError(f"{src}: protocol {d['protocol']!r} unknown; valid: {', '.join(PROTOCOLS)}")
    for k in ("image_size", "n_keypoints"):
        _check_type(src, k, d[k], (int,), "a positive integer")
        if d[k] <= 0:
            raise ManifestError(f"{src}: field {k!r} must be a positive integer, got {d[k]!r}")
    if d["n_joints"] is not None:
        _check_type(src, "n_joints", d["n_joints"], (int,), "a positive integer or null")
        if d["n_joints"] <= 0:
            raise ManifestError(f"{src}: field 'n_joints' must be a positive integer or null, got {d['n_joints']!r}")
    _check_type(src, "hflip", d["hflip"], (bool,), "true or false")
    _check_type(src, "apply_masks", d.get("apply_masks", False), (bool,), "true or false")
    margin = d.get("keypoint_margin", 0.0)
    _check_type(src, "keypoint_margin", margin, (int, float), "a number >= 0")
    if margin < 0:
        raise ManifestError(f"{src}: field 'keypoint_margin' must be >= 0, got {margin!r}")
    roles = d["roles"]
    if not isinstance(roles, dict) or not {"train", "regress", "test"} <= set(roles):
        raise ManifestError(f"{src}: field 'roles' must map train, regress and test to lists of partitions, "
                            f"got {roles!r}")
    for k, v in roles.items():
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ManifestError(f"{src}: roles.{k} must be a list of partition names, got {v!r}")
    if not isinstance(d["files"], dict):
        raise ManifestError(f"{src}: field 'files' must be a mapping, got {d['files']!r}")
    depth = d.get("depth")
    if depth is not None:
        if not isinstance(depth, dict) or depth.get("kind") not in DEPTH_KINDS or set(depth) - {"kind", "scale"}:
            raise ManifestError(f"{src}: field 'depth' must be {{kind: depth|inverse_depth, scale: number}}, "
                                f"got {depth!r}")
    return d


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ManifestError(f"cannot read dataset description {path}: {e}") from None


def _apply_overrides(d: dict, root: Path, src: str) -> dict:
    """Merge ``ROOT/<options_file>`` (folder layout) into the description; returns a new dict."""
    name = d["files"].get("options_file")
    if not name:
        return d
    p = root / name
    if not p.is_file():
        return d
    o = _read_yaml(p)
    if o is None:
        return d
    if not isinstance(o, dict):
        raise ManifestError(f"{p}: expected a mapping such as 'depth_kind: depth', got {type(o).__name__}")
    d = dict(d)
    extra = {k: v for k, v in o.items() if k not in _OVERRIDABLE}
    if set(extra) - set(_INFORMATIONAL):
        log.warning("%s: keys %s are not dataset options (kept as information only); options are: %s",
                    p, ", ".join(sorted(extra)), ", ".join(_OVERRIDABLE))
    if extra:
        d["extra"] = extra
    for k in ("n_joints", "n_keypoints", "image_size", "hflip", "keypoint_margin", "protocol"):
        if k in o:
            d[k] = o[k]
    if "depth_kind" in o or "depth_scale" in o:
        base = dict(d.get("depth") or {})
        if "depth_kind" in o:
            base["kind"] = o["depth_kind"]
        if "depth_scale" in o:
            scale = o["depth_scale"]
            if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
                raise ManifestError(f"{p}: depth_scale must be a positive number, got {scale!r}")
            base["scale"] = float(scale)
        if base.get("kind") not in DEPTH_KINDS:
            raise ManifestError(f"{p}: depth_kind must be 'depth' (near = small) or 'inverse_depth' "
                                f"(near = large), got {base.get('kind')!r}")
        d["depth"] = base
    return _validate({k: v for k, v in d.items() if k != "extra"}, f"{src} + {p}") | (
        {"extra": d["extra"]} if "extra" in d else {})


def load_spec(name_or_yaml_path: str | os.PathLike, root: Optional[str | os.PathLike] = None) -> DatasetSpec:
    """The resolved :class:`DatasetSpec` of a shipped name or a YAML path (+ ``ROOT/dataset.yaml``)."""
    path = _yaml_file(name_or_yaml_path)
    src = path.name if path.parent.name == "data_manifests" else str(path)
    d = _validate(_read_yaml(path), src)
    if root is not None and d["layout"] == "folder":
        d = _apply_overrides(d, Path(root), src)
    return DatasetSpec.from_dict(d, source=str(path))


# --------------------------------------------------------------------------------------------------
# the manifest


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

    def __post_init__(self) -> None:
        n = len(self.frame_ids)
        self.root = Path(self.root)
        self.sizes = np.asarray(self.sizes, dtype=np.int64).reshape(n, 2)  # (N, 2) (W, H)
        for name in ("paths", "splits", "fingerprints", "mask_paths", "mask_fingerprints", "depth_paths",
                     "depth_fingerprints", "orientations"):
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
        """``combine`` of the ordered frame fingerprints: changes iff a frame's bytes or the order change."""
        return combine(self.fingerprints)

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
        mask = np.isin(np.asarray(self.splits, dtype=object), list(self.spec.roles[name]))
        if name != "train":
            mask &= self.has_gt
        return np.flatnonzero(mask).astype(np.int64)

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
            },
            "keypoints": keypoints_file,
        }

    @staticmethod
    def _side_file(path: Path) -> Path:
        stem = path.name[:-5] if path.name.endswith(".json") else path.name
        return path.with_name(stem + ".keypoints.npy")

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON (+ ``<stem>.keypoints.npy`` beside it when there are keypoints), each atomically.

        The side file is written first and its xxh3 recorded in the JSON, so a JSON never names a
        half-written or foreign side file. No pickles. Returns the JSON path.
        """
        import xxhash

        from pipeline.artifacts import write_atomic

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
        write_atomic(path, json.dumps(self.to_json_dict(kp_entry), indent=1) + "\n")
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
                    orientations=f.get("orientation"))
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"manifest {path} is malformed ({type(e).__name__}: {e}); {fix}") from None
        if m.fingerprint != d.get("fingerprint"):
            raise ManifestError(f"manifest {path}: frame fingerprints do not add up to the recorded "
                                f"fingerprint (file edited by hand?); {fix}")
        return m


# --------------------------------------------------------------------------------------------------
# building


@dataclass
class _Listing:
    """What a layout walker finds, before fingerprinting; keypoints still in the dataset's units."""

    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    kp: Optional[np.ndarray] = None  # (N, J, 2) float64 in `kp_units`, NaN = missing / no annotation
    kp_units: str = "pixels_xy"  # pixels_xy | unit_rowcol (Human3.6M: (row, col) in [0, 1])
    kp_sources: list[str] = field(default_factory=list)  # per frame: annotation file (for messages)
    masks: Optional[list[Optional[str]]] = None
    depths: Optional[list[str]] = None


def _fail(spec: DatasetSpec, msg: str) -> ManifestError:
    return ManifestError(f"dataset {spec.name}: {msg}")


def _safe_relpath(spec: DatasetSpec, root: Path, rel: str, where: str) -> str:
    """``rel`` as a clean POSIX relative path, refusing absolute paths and ``..`` (paths escaping the root)."""
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise _fail(spec, f"path {rel!r} in {where} escapes the root {root} (absolute or '..'); "
                          f"paths must be relative to the dataset root")
    return str(p)


class _Inside:
    """Checks that files resolve inside the root (symlinks included), caching directory results."""

    def __init__(self, spec: DatasetSpec, root: Path) -> None:
        self.spec, self.root = spec, root
        self.real_root = os.path.realpath(root)
        self._dirs: dict[str, bool] = {}

    def _ok(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)

    def check(self, rel: str, what: str) -> None:
        full = os.path.join(self.root, rel)
        parent = os.path.dirname(full)
        ok = self._dirs.get(parent)
        if ok is None:
            ok = self._dirs[parent] = self._ok(os.path.realpath(parent))
        try:
            is_link = _stat.S_ISLNK(os.lstat(full).st_mode)
        except FileNotFoundError:
            raise _fail(self.spec, f"{what} {rel!r} not found under root {self.root} "
                                   f"(did you pass the right --root?)") from None
        if not ok or (is_link and not self._ok(os.path.realpath(full))):
            raise _fail(self.spec, f"{what} {rel!r} resolves to {os.path.realpath(full)}, outside the root "
                                   f"{self.root} (a symlink leaving the dataset); copy the file into the root "
                                   f"or point --root at a directory that contains it")


def _require_dir(spec: DatasetSpec, root: Path, rel: str, hint: str) -> Path:
    p = root / rel
    if not p.is_dir():
        raise _fail(spec, f"directory {rel!r} not found under root {root} ({hint})")
    return p


def _walk_images(spec: DatasetSpec, root: Path, top: Path, exts: Sequence[str]) -> list[str]:
    """Sorted POSIX paths (relative to ``root``) of image files below ``top``, following in-root symlinks."""
    exts = tuple(e.lower() for e in exts)
    out: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop inside the root
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        rel_dir = Path(os.path.relpath(dirpath, root)).as_posix()  # string joins below: pathlib is slow per file
        pre = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        out.extend(pre + fn for fn in filenames if fn.lower().endswith(exts) and not _hidden(fn))
    return sorted(out)


def _hidden(name: str) -> bool:
    """Hidden files and folders (".x"), macOS AppleDouble companions ("._x.jpg": resource forks, not images)
    and the "__MACOSX" folder of zip files: never frames or depth maps."""
    return name.startswith(".") or name == "__MACOSX"


def _strip_ext(rel: str) -> str:
    return os.path.splitext(rel)[0]  # only the last component's extension ("a.b/c.png" -> "a.b/c")


# ---- Human3.6M


def _read_h36m_mat(path: Path, key: str) -> np.ndarray:
    """``key`` of a MATLAB file as float64; v5 files via scipy (as AutoLink does), v7.3 (HDF5) via h5py."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x89HDF") or _is_hdf5(path):
        import h5py

        with h5py.File(path, "r") as h:
            # MATLAB v7.3 stores arrays column-major: an (A, B) matrix appears as (B, A).
            return np.asarray(h[key], dtype=np.float64).T
    try:
        import scipy.io
    except ImportError:
        raise ManifestError("reading Human3.6M landmarks (.mat, MATLAB v5) needs scipy: pip install scipy") from None
    return np.asarray(scipy.io.loadmat(str(path))[key], dtype=np.float64)


def _is_hdf5(path: Path) -> bool:
    # v7.3 MAT files are HDF5 with a 512-byte user block in front.
    with open(path, "rb") as f:
        f.seek(512)
        return f.read(4) == b"\x89HDF"


def _h36m_landmarks(spec: DatasetSpec, root: Path, rels: list[str], memo: Optional[FingerprintMemo],
                    progress: bool) -> np.ndarray:
    """(N, J, 2) float64 landmarks of the given .mat files, cached by their combined content hash."""
    key = spec.files.get("landmarks_key", "keypoints_2d")
    try:
        fps = [fi.fingerprint for fi in scan_files(root, rels, memo, progress=progress, desc="landmarks")]
    except OSError as e:
        raise _fail(spec, f"landmark file unreadable: {e}") from None
    cache = None
    if memo is not None:
        cache = memo.path.parent / "annotations" / f"{combine(fps + [key])[5:]}.npy"
        try:
            arr = np.load(cache, allow_pickle=False)
            if arr.shape[0] == len(rels) and (not spec.n_joints or arr.shape[1:] == (spec.n_joints, 2)):
                return arr
        except (OSError, ValueError):
            pass  # no cache yet, or a corrupt one: parse again
    out = []
    for rel in rels:
        try:
            a = _read_h36m_mat(root / rel, key)
        except ManifestError:
            raise
        except Exception as e:  # scipy/h5py raise many types for damaged files
            raise _fail(spec, f"landmark file {rel!r} unreadable ({type(e).__name__}: {e}); re-extract it "
                              f"from human_images.tar.gz") from None
        if a.ndim != 2 or a.shape[1] != 2 or (spec.n_joints and a.shape[0] != spec.n_joints):
            raise _fail(spec, f"landmark file {rel!r}: '{key}' has shape {a.shape}, expected "
                              f"({spec.n_joints}, 2) (row, col) in [0, 1]")
        out.append(a)
    arr = np.stack(out) if out else np.zeros((0, spec.n_joints or 0, 2))  # (N, J, 2)
    if cache is not None:
        try:
            from pipeline.artifacts import write_atomic

            cache.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            write_atomic(cache, buf.getvalue())
        except OSError as e:
            log.warning("could not cache parsed landmarks in %s (%s)", cache, e)
    return arr


def _walk_human36m(spec: DatasetSpec, root: Path, memo: Optional[FingerprintMemo], progress: bool) -> _Listing:
    f = spec.files
    L = _Listing(kp_units="unit_rowcol", masks=[] if f.get("masks_dir") else None)
    ext = f.get("frame_ext", ".jpg")
    mats: list[str] = []
    for part, subjects in f["subjects"].items():
        for s in subjects:
            sdir = f["subject_dir"].format(subject=s)
            fdir = _require_dir(spec, root, f"{sdir}/{f['frames_dir']}",
                                "is --root the extracted human_images/ directory?")
            actions = sorted(a for a in os.listdir(fdir)
                             if any(a.startswith(x) for x in f["actions"]) and (fdir / a).is_dir())
            for act in actions:
                for fn in sorted(os.listdir(fdir / act)):
                    if not fn.endswith(ext):
                        continue
                    stem = fn[: -len(ext)]
                    L.ids.append(f"{sdir}/{act}/{stem}")
                    L.paths.append(f"{sdir}/{f['frames_dir']}/{act}/{fn}")
                    L.splits.append(part)
                    mat = f"{sdir}/{f['landmarks_dir']}/{act}/{stem}.mat"
                    if not (root / mat).is_file():
                        raise _fail(spec, f"landmark file {mat!r} for frame {L.paths[-1]!r} not found under "
                                          f"root {root} (incomplete extraction of human_images.tar.gz?)")
                    mats.append(mat)
                    if L.masks is not None:
                        mask = f"{sdir}/{f['masks_dir']}/{act}/{stem}.png"
                        if not (root / mask).is_file():
                            raise _fail(spec, f"mask {mask!r} for frame {L.paths[-1]!r} not found under root "
                                              f"{root} (the folder is spelt 'BackgroudMask' in the release)")
                        L.masks.append(mask)
        if not any(sp == part for sp in L.splits):
            raise _fail(spec, f"no frames for partition {part!r} (subjects {subjects}, actions "
                              f"{', '.join(f['actions'])}) under root {root}")
    L.kp = _h36m_landmarks(spec, root, mats, memo, progress)
    L.kp_sources = mats
    return L


# ---- Taichi: the GT pickle, read without executing code


class _Stub:
    """Inert stand-in for a class or function named in a pickle: records what it was called with.

    Pickle "executes" a global by calling it; a stub only stores the arguments and the state, so a
    pickle can name pandas classes (or anything we map to a stub) without any of their code running.
    """

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Stub":
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stub {self.qualname}>"


def _numpy_globals() -> dict[tuple[str, str], Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    allowed = {}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = core.numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("builtins", "slice")] = slice
    allowed[("builtins", "object")] = object
    allowed[("collections", "OrderedDict")] = dict
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for GT files from other people: numpy arrays are rebuilt, pandas objects become stubs,
    every other global is refused.

    ``pickle.load`` runs whatever callable a file names (``os.system`` included); these files come
    from third parties, so we allow only numpy's array/dtype/scalar reconstruction (which allocate and
    fill arrays, nothing else) and replace pandas' classes by :class:`_Stub`, then read the columns
    out of the stubs ourselves. pandas is therefore not needed either.
    """

    _allowed = None

    def find_class(self, module: str, name: str) -> Any:
        if _SafeUnpickler._allowed is None:
            _SafeUnpickler._allowed = _numpy_globals()
        hit = self._allowed.get((module, name))
        if hit is not None:
            return hit
        if module == "copyreg" and name == "_reconstructor":
            return _copyreg_reconstructor
        if module == "pandas" or module.startswith("pandas."):
            return type(name, (_Stub,), {"qualname": f"{module}.{name}"})
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays and pandas "
                                     f"tables are allowed in annotation pickles)")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in annotation pickles")


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # protocol 0/1 pickles build objects this way; only stubs may be built
    if isinstance(cls, type) and issubclass(cls, _Stub):
        return cls.__new__(cls)
    raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")


def _index_values(idx: Any) -> list:
    """Labels of a pickled pandas Index (a stub of ``_new_Index(cls, {"data": ...})`` or RangeIndex)."""
    if isinstance(idx, np.ndarray):
        return idx.tolist()
    if isinstance(idx, (list, tuple)):
        return list(idx)
    if isinstance(idx, _Stub):
        d = None
        for a in idx.args:
            if isinstance(a, dict):
                d = a
        if d is None and isinstance(idx.state, dict):
            d = idx.state
        if d is not None:
            if "data" in d:
                return _index_values(d["data"])
            if "start" in d or "stop" in d:
                return list(range(d.get("start", 0) or 0, d["stop"], d.get("step", 1) or 1))
        if idx.args and isinstance(idx.args[0], (np.ndarray, list)):
            return _index_values(idx.args[0])
    raise ValueError(f"cannot read a pandas index from {idx!r}")


def _locs(x: Any) -> list[int]:
    """Column positions of a block: an int array, a slice, or a BlockPlacement stub around either."""
    if isinstance(x, slice):
        return list(range(x.start or 0, x.stop, x.step or 1))
    if isinstance(x, np.ndarray):
        return [int(i) for i in x.ravel()]
    if isinstance(x, _Stub) and x.args:
        return _locs(x.args[0])
    if isinstance(x, (list, tuple)):
        return [int(i) for i in x]
    raise ValueError(f"cannot read block positions from {x!r}")


def _dataframe_columns(obj: Any) -> dict[str, np.ndarray]:
    """Column name -> 1-D array, from an unpickled dict of columns or a stubbed pandas DataFrame."""
    if isinstance(obj, dict):
        return {str(k): np.asarray(v, dtype=object) if not isinstance(v, np.ndarray) else v for k, v in obj.items()}
    if not isinstance(obj, _Stub) or not isinstance(obj.state, dict):
        raise ValueError(f"expected a pandas DataFrame or a dict of columns, got {obj!r}")
    mgr = obj.state.get("_mgr", obj.state.get("_data"))
    if not isinstance(mgr, _Stub):
        raise ValueError("DataFrame without a block manager")
    blocks: list[tuple[Any, Any]] = []
    st = mgr.state
    if isinstance(st, tuple) and len(st) == 4 and isinstance(st[3], dict) and "0.14.1" in st[3]:
        # pandas >= 0.14: (axes, values, items, {"0.14.1": {"axes": [...], "blocks": [{values, mgr_locs}]}})
        s = st[3]["0.14.1"]
        axes = s["axes"]
        blocks = [(b["values"], b["mgr_locs"]) for b in s["blocks"]]
        items = _index_values(axes[0])
    elif isinstance(st, tuple) and len(st) >= 3:
        # older pandas: (axes, block values, block items)
        axes = st[0]
        items = _index_values(axes[0])
        blocks = [(v, np.asarray([items.index(x) for x in _index_values(it)])) for v, it in zip(st[1], st[2])]
    elif mgr.args and len(mgr.args) >= 2:
        # pandas >= 1.3 (Cython BlockManager.__reduce__): (blocks, axes); blocks = stubs of (values, placement, ndim)
        items = _index_values(mgr.args[1][0])
        blocks = [(b.args[0], b.args[1]) for b in mgr.args[0]]
    else:
        raise ValueError("unrecognised pandas block manager layout")
    cols: dict[str, np.ndarray] = {}
    for values, locs in blocks:
        values = np.asarray(values)
        values = values.reshape(1, -1) if values.ndim == 1 else values  # (n_block_columns, n_rows)
        for j, loc in enumerate(_locs(locs)):
            cols[str(items[loc])] = values[j]
    return cols


def read_taichi_gt(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """File names and (M, J, 2) float64 (x, y) pixel GT (``-1`` kept) from a Taichi GT pickle, safely.

    Accepts the motion-cosegmentation pandas DataFrame (``file_name``, ``value`` columns) or a plain
    dict of those columns. Raises ManifestError for anything else, including pickles that name code.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f).load()
        cols = _dataframe_columns(obj)
        names = [str(x) for x in cols["file_name"]]
        values = np.stack([np.asarray(v, dtype=np.float64) for v in cols["value"]]) if names else np.zeros((0, 0, 2))
    except FileNotFoundError:
        raise
    except KeyError as e:
        raise ManifestError(f"Taichi GT {path}: no column {e} (expected file_name and value, as in "
                            f"motion-cosegmentation's landmarks/taichi_*_gt.pkl)") from None
    except Exception as e:  # any damage or refusal: the file cannot be used
        raise ManifestError(f"Taichi GT {path} unreadable ({type(e).__name__}: {e}); use the original "
                            f"landmarks/taichi_*_gt.pkl from motion-cosegmentation") from None
    if values.ndim != 3 or values.shape[2] != 2:
        raise ManifestError(f"Taichi GT {path}: 'value' entries have shape {values.shape[1:]}, expected (J, 2)")
    return names, values


def _walk_taichi(spec: DatasetSpec, root: Path) -> _Listing:
    f = spec.files
    L = _Listing(kp_units="pixels_xy")
    tdir = _require_dir(spec, root, f["train_dir"], "the training videos' frame folders, <video>.mp4/<n>.png")
    # ImageFolder semantics: each sub-folder (a video) is a class; files directly in train/ are not frames.
    train = [r for r in _walk_images(spec, root, tdir, f["train_exts"])
             if len(PurePosixPath(r).relative_to(PurePosixPath(f["train_dir"])).parts) >= 2]
    if not train:
        raise _fail(spec, f"no training frames in {tdir}")
    J = spec.n_joints
    rows: list[np.ndarray] = []
    for rel in train:
        L.ids.append(_strip_ext(rel))
        L.paths.append(rel)
        L.splits.append("train")
        L.kp_sources.append("")
    rows.append(np.full((len(train), J, 2), np.nan))
    masks_dir = f.get("test_masks_dir")
    have_masks = bool(masks_dir) and (root / masks_dir).is_dir()
    masks: list[Optional[str]] = [None] * len(train)
    for part in ("regress", "test"):
        gt_rel = f[f"{part}_gt"]
        img_dir = f[f"{part}_dir"]
        _require_dir(spec, root, img_dir, "eval_images.tar.gz from motion-cosegmentation, extracted in the root")
        try:
            names, values = read_taichi_gt(root / gt_rel)
        except FileNotFoundError:
            raise _fail(spec, f"GT file {gt_rel!r} not found under root {root} (copy motion-cosegmentation's "
                              f"landmarks/ into the root as {PurePosixPath(gt_rel).parent}/)") from None
        if values.shape[0] and values.shape[1] != J:
            raise _fail(spec, f"GT file {gt_rel!r} has {values.shape[1]} joints per frame, expected {J}")
        # -1 marks a missing *coordinate* (AutoLink tests |v + 1| > 1e-6 per coordinate): only that component
        # becomes NaN. The protocol fits and scores each coordinate on its own, so a joint whose x is known and
        # y is not still counts for x, exactly as in AutoLink.
        values = np.where(np.abs(values + 1) <= 1e-6, np.nan, values)  # (M, J, 2)
        for i, name in enumerate(names):
            rel = _safe_relpath(spec, root, f"{img_dir}/{name}", gt_rel)
            L.ids.append(_strip_ext(rel))
            L.paths.append(rel)
            L.splits.append(part)
            L.kp_sources.append(gt_rel)
            mask = None
            if part == "test" and have_masks:
                mask = _safe_relpath(spec, root, f"{masks_dir}/{name}", gt_rel)
            masks.append(mask)
        rows.append(values)
    L.kp = np.concatenate(rows)  # (N, J, 2)
    L.masks = masks if have_masks else None
    return L


# ---- DeepFashion


def _walk_deepfashion(spec: DatasetSpec, root: Path) -> _Listing:
    f = spec.files
    L = _Listing(kp_units="pixels_xy")
    img_dir = f["images_dir"]
    _require_dir(spec, root, img_dir, "DeepFashion In-shop Img/img, 256x256, placed in the root as img/")
    rows: list[np.ndarray] = []
    for part, pf in f["partitions"].items():
        csv_rel, json_rel = pf["csv"], pf["json"]
        try:
            with open(root / csv_rel, newline="") as fh:
                lines = list(csv.reader(fh))
        except FileNotFoundError:
            raise _fail(spec, f"split file {csv_rel!r} not found under root {root} (copy data_*.csv and "
                              f"data_*.json from Lorenz et al.'s custom_datasets/deepfashion/)") from None
        except (OSError, csv.Error, UnicodeDecodeError) as e:
            raise _fail(spec, f"split file {csv_rel!r} unreadable ({e})") from None
        if not lines or len(lines[0]) < 2 or lines[0][1].strip() != "filename":
            raise _fail(spec, f"split file {csv_rel!r}: expected the header 'id,filename', got "
                              f"{','.join(lines[0]) if lines else '(empty file)'!r}")
        files = []
        for n, row in enumerate(lines[1:], start=2):
            if len(row) < 2 or not row[1].strip():
                raise _fail(spec, f"split file {csv_rel!r} line {n}: no filename in {row!r}")
            files.append(row[1].strip())
        try:
            entries = json.loads((root / json_rel).read_text())
        except FileNotFoundError:
            raise _fail(spec, f"keypoint file {json_rel!r} not found under root {root} (it ships beside "
                              f"{csv_rel} in Lorenz et al.'s split)") from None
        except (OSError, ValueError) as e:
            raise _fail(spec, f"keypoint file {json_rel!r} unreadable ({e})") from None
        if not isinstance(entries, list) or len(entries) != len(files):
            n_e = len(entries) if isinstance(entries, list) else type(entries).__name__
            raise _fail(spec, f"keypoint file {json_rel!r} has {n_e} entries but {csv_rel!r} has {len(files)} "
                              f"rows; they must be aligned row by row (same release of both files)")
        try:
            kp = np.asarray([e["keypoints"] for e in entries], dtype=np.float64)  # (M, J, 2) (x, y)
        except (KeyError, TypeError, ValueError) as e:
            raise _fail(spec, f"keypoint file {json_rel!r}: entries need 'keypoints' as (J, 2) numbers ({e})") from None
        if len(files) and (kp.ndim != 3 or kp.shape[1:] != (spec.n_joints, 2)):
            raise _fail(spec, f"keypoint file {json_rel!r}: keypoints have shape {kp.shape[1:]}, expected "
                              f"({spec.n_joints}, 2)")
        for name in files:
            rel = _safe_relpath(spec, root, f"{img_dir}/{name}", csv_rel)
            L.ids.append(_strip_ext(name))
            L.paths.append(rel)
            L.splits.append(part)
            L.kp_sources.append(json_rel)
        rows.append(kp.reshape(len(files), spec.n_joints, 2))
    L.kp = np.concatenate(rows)
    return L


# ---- folder


def _walk_folder(spec: DatasetSpec, root: Path) -> _Listing:
    f = spec.files
    L = _Listing(kp_units="pixels_xy")
    idir = _require_dir(spec, root, f["images_dir"], f"put your frames in {root}/{f['images_dir']}/")
    images = _walk_images(spec, root, idir, f["image_exts"])
    if not images:
        raise _fail(spec, f"no images ({', '.join(f['image_exts'])}) in {idir}")
    prefix = f["images_dir"].rstrip("/") + "/"
    index: dict[str, int] = {}
    by_name: dict[str, int] = {}
    for rel in images:
        fid = _strip_ext(rel[len(prefix):])
        if fid in index:
            raise _fail(spec, f"duplicate frame id {fid!r}: {L.paths[index[fid]]!r} and {rel!r}; keep one file "
                              f"per frame name")
        index[fid] = len(L.ids)
        by_name[rel[len(prefix):]] = len(L.ids)
        L.ids.append(fid)
        L.paths.append(rel)
        L.splits.append("train")  # frames not in keypoints.csv are unlabelled training frames
        L.kp_sources.append("")
    csv_rel = f["keypoints_csv"]
    if (root / csv_rel).is_file():
        L.kp = _read_folder_csv(spec, root, csv_rel, index, by_name, L)
    elif spec.n_joints:
        L.kp = np.full((len(L.ids), spec.n_joints, 2), np.nan)
    ddir = root / f["depth_dir"]
    if ddir.is_dir():
        if spec.depth is None:
            raise _fail(spec, f"{f['depth_dir']}/ found under {root} but nothing says what it holds: add "
                              f"'depth_kind: depth' (near = small) or 'depth_kind: inverse_depth' (near = large), "
                              f"and 'depth_scale: S' if the stored numbers need scaling, to "
                              f"{root / f['options_file']}")
        depths = _walk_images(spec, root, ddir, (".png", ".npy"))
        dprefix = f["depth_dir"].rstrip("/") + "/"
        found: dict[str, str] = {}
        for rel in depths:
            did = _strip_ext(rel[len(dprefix):])
            if did in found:
                raise _fail(spec, f"two depth files for frame {did!r}: {found[did]!r} and {rel!r}; keep one")
            if did not in index:
                raise _fail(spec, f"depth file {rel!r} has no frame {did!r} in {f['images_dir']}/; remove it or "
                                  f"add the frame")
            found[did] = rel
        lacking = [i for i in L.ids if i not in found]
        if lacking:
            raise _fail(spec, f"{len(lacking)} frames have no depth file in {f['depth_dir']}/, e.g. {lacking[0]!r}; "
                              f"give every frame one (<frame>.png 16-bit or <frame>.npy float) or remove "
                              f"{f['depth_dir']}/ to use MiDaS")
        L.depths = [found[i] for i in L.ids]
    return L


def _read_folder_csv(spec: DatasetSpec, root: Path, csv_rel: str, index: dict[str, int], by_name: dict[str, int],
                     L: _Listing) -> np.ndarray:
    try:
        with open(root / csv_rel, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's "CSV UTF-8" BOM
            rows = list(csv.reader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise _fail(spec, f"{csv_rel} unreadable ({e})") from None
    if not rows:
        raise _fail(spec, f"{csv_rel} is empty; expected a header frame,split,x0,y0,x1,y1,...")
    header = [h.strip() for h in rows[0]]
    n_coord = len(header) - 2
    expect = [f"{a}{j}" for j in range(max(n_coord, 0) // 2) for a in ("x", "y")]
    if header[:2] != ["frame", "split"] or n_coord <= 0 or n_coord % 2 or header[2:] != expect:
        raise _fail(spec, f"{csv_rel}: header must be frame,split,x0,y0,x1,y1,... (pixels, x right, y down), "
                          f"got {','.join(header)!r}")
    J = n_coord // 2
    if spec.n_joints is not None and spec.n_joints != J:
        raise _fail(spec, f"{csv_rel} has {J} joints (header) but the dataset says n_joints: {spec.n_joints}; "
                          f"fix one of them")
    kp = np.full((len(L.ids), J, 2), np.nan)  # (N, J, 2)
    seen: dict[int, int] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise _fail(spec, f"{csv_rel} line {n}: {len(row)} cells, the header has {len(header)}")
        name, split = row[0].strip(), row[1].strip()
        i = index.get(name, by_name.get(name))
        if i is None:
            raise _fail(spec, f"{csv_rel} line {n}: frame {name!r} has no image in {spec.files['images_dir']}/ "
                              f"(remove the row or add the image)")
        if i in seen:
            raise _fail(spec, f"{csv_rel} line {n}: duplicate frame id {name!r} (first on line {seen[i]})")
        seen[i] = n
        if split not in FOLDER_SPLITS:
            raise _fail(spec, f"{csv_rel} line {n}: split {split!r} is not one of {', '.join(FOLDER_SPLITS)}")
        L.splits[i] = split
        L.kp_sources[i] = f"{csv_rel} line {n}"
        cells = [c.strip() for c in row[2:]]
        for j in range(J):
            xs, ys = cells[2 * j], cells[2 * j + 1]
            if not xs and not ys:
                continue
            if not xs or not ys:
                raise _fail(spec, f"{csv_rel} line {n}: joint {j} has only one coordinate; leave both x{j} and "
                                  f"y{j} empty for a missing joint")
            try:
                kp[i, j] = (float(xs), float(ys))
            except ValueError:
                raise _fail(spec, f"{csv_rel} line {n}: joint {j} ({xs!r}, {ys!r}) is not a number") from None
            if not np.isfinite(kp[i, j]).all():
                raise _fail(spec, f"{csv_rel} line {n}: joint {j} ({xs!r}, {ys!r}) is not finite; leave the "
                                  f"cells empty for a missing joint")
    return kp


# ---- common part


def _to_pixels(L: _Listing, sizes: np.ndarray) -> Optional[np.ndarray]:
    """(N, J, 2) float32 pixels (x, y) from the listing's units, given (N, 2) (W, H)."""
    if L.kp is None:
        return None
    if L.kp_units == "pixels_xy":
        return L.kp.astype(np.float32)
    if L.kp_units == "unit_rowcol":
        # (row, col) in [0, 1] where 0 and 1 are the first and last pixel centres -- the inverse of
        # AutoLink's detector output * 0.5 + 0.5, so the h36m protocol gets its numbers back exactly
        # with x / (W - 1), y / (H - 1).
        wh1 = (sizes - 1).astype(np.float64)[:, None, :]  # (N, 1, 2) (W-1, H-1)
        return (L.kp[..., ::-1] * wh1).astype(np.float32)
    raise AssertionError(L.kp_units)


def _check_range(spec: DatasetSpec, kp: np.ndarray, sizes: np.ndarray, L: _Listing) -> None:
    m = spec.keypoint_margin
    wh = sizes.astype(np.float64)[:, None, :]  # (N, 1, 2)
    lo = -0.5 - m * wh
    hi = wh - 0.5 + m * wh
    with np.errstate(invalid="ignore"):
        bad = (kp < lo) | (kp > hi)  # NaN compares False: missing joints pass
    if bad.any():
        i, j, c = (int(v) for v in np.argwhere(bad)[0])
        W, H = (int(v) for v in sizes[i])
        src = L.kp_sources[i] or "annotations"
        raise _fail(spec, f"joint {j} of frame {L.paths[i]!r} (from {src}) is at (x, y) = "
                          f"({kp[i, j, 0]:.2f}, {kp[i, j, 1]:.2f}) px, outside the {W}x{H} frame "
                          f"(margin {m:g} of the side; {int(bad.any(axis=(1, 2)).sum())} frames affected). "
                          f"Check the units (pixels, x right, y down) or raise keypoint_margin")


def build_manifest(name_or_yaml_path: str | os.PathLike, root: str | os.PathLike, *,
                   memo: Optional[FingerprintMemo] = None, progress: bool = True) -> Manifest:
    """Walk dataset ``name_or_yaml_path`` (a ``data_manifests`` name or a YAML path) under ``root``.

    Reads annotations into docs/conventions.md, fingerprints every frame (and mask/depth file),
    reads each frame's size from its header while hashing it. ``memo`` defaults to the per-root memo
    in ``$DKP_CACHE_DIR/fingerprints``; unchanged files are not read again. Raises ManifestError for
    anything the user must fix.
    """
    root_p = Path(root).expanduser()
    spec = load_spec(name_or_yaml_path, root_p)
    if not root_p.is_dir():
        raise _fail(spec, f"root {root_p} is not a directory (pass the dataset's root with --root)")
    root_p = Path(os.path.abspath(root_p))
    if memo is None:
        memo = FingerprintMemo.for_root(root_p)
    if spec.layout == "human36m":
        L = _walk_human36m(spec, root_p, memo, progress)
    elif spec.layout == "taichi":
        L = _walk_taichi(spec, root_p)
    elif spec.layout == "deepfashion":
        L = _walk_deepfashion(spec, root_p)
    else:
        L = _walk_folder(spec, root_p)

    first: dict[str, int] = {}
    for i, fid in enumerate(L.ids):
        j = first.setdefault(fid, i)
        if j != i:
            raise _fail(spec, f"duplicate frame id {fid!r}: {L.paths[j]!r} and {L.paths[i]!r} "
                              f"(listed twice in the annotations?)")
    inside = _Inside(spec, root_p)
    for rel in L.paths:
        inside.check(rel, "frame")
    for rel in L.masks or []:
        if rel is not None:
            inside.check(rel, "mask")
    for rel in L.depths or []:
        inside.check(rel, "depth file")

    infos = _scan(spec, root_p, L.paths, memo, progress, probe_image, ("wh", "orientation"), "frames")
    sizes = np.asarray([fi.extra["wh"] for fi in infos], dtype=np.int64).reshape(len(infos), 2)  # (N, 2) (W, H)
    kp = _to_pixels(L, sizes)
    if kp is not None:
        _check_range(spec, kp, sizes, L)
    mask_fps = None
    if spec.apply_masks and (L.masks is None or None in L.masks):
        raise _fail(spec, f"the description says apply_masks: true but not every frame has a mask (this layout "
                          f"lists masks from files.masks_dir, {spec.files.get('masks_dir')!r}); set that folder or "
                          f"drop apply_masks")
    if L.masks is not None:
        present = [i for i, m in enumerate(L.masks) if m is not None]
        minfos = _scan(spec, root_p, [L.masks[i] for i in present], memo, progress, probe_image, ("wh",), "masks")
        if spec.apply_masks:  # the mask multiplies the frame pixel by pixel: same size or nothing lines up
            for i, fi in zip(present, minfos):
                if list(fi.extra["wh"]) != list(sizes[i]):
                    raise _fail(spec, f"mask {L.masks[i]!r} is {fi.extra['wh'][0]}x{fi.extra['wh'][1]} but its frame "
                                      f"{L.paths[i]!r} is {sizes[i][0]}x{sizes[i][1]}; a mask must match its frame")
        fps = iter(fi.fingerprint for fi in minfos)
        mask_fps = [next(fps) if m is not None else None for m in L.masks]
    depth_fps = None
    if L.depths is not None:
        dinfos = _scan(spec, root_p, L.depths, memo, progress, probe_depth, ("wh", "depth_format"), "depth")
        for i, fi in enumerate(dinfos):
            if list(fi.extra["wh"]) != list(sizes[i]):
                raise _fail(spec, f"depth file {L.depths[i]!r} is {fi.extra['wh'][0]}x{fi.extra['wh'][1]} but its "
                                  f"frame {L.paths[i]!r} is {sizes[i][0]}x{sizes[i][1]}; depth must match the frame")
        depth_fps = [fi.fingerprint for fi in dinfos]
    return Manifest(spec=spec, root=root_p, frame_ids=L.ids, paths=L.paths, splits=L.splits,
                    fingerprints=[fi.fingerprint for fi in infos], sizes=sizes, keypoints=kp,
                    mask_paths=L.masks, mask_fingerprints=mask_fps, depth_paths=L.depths,
                    depth_fingerprints=depth_fps,
                    orientations=_orientations([fi.extra["orientation"] for fi in infos]))


def _orientations(values: list[int]) -> Optional[list[int]]:
    return None if all(v == 1 for v in values) else values


def _scan(spec: DatasetSpec, root: Path, rels: list[str], memo: Optional[FingerprintMemo], progress: bool,
          probe: Any, keys: tuple, desc: str) -> list:
    try:
        return scan_files(root, rels, memo, probe=probe, probe_keys=keys, progress=progress, desc=desc)
    except FileNotFoundError as e:
        raise _fail(spec, f"file {e.filename} not found (was it removed while the manifest was built?)") from None
    except (OSError, ValueError) as e:
        name = getattr(e, "filename", None)  # OSErrors carry it; probe ValueErrors put the path in the text
        what = f"{desc} file {name}" if name else f"{desc} file"
        raise _fail(spec, f"{what} unreadable: {e}; replace or remove it") from None
