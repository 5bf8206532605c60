"""Dataset descriptions: ``data_manifests/<name>.yaml`` (plus a folder root's ``dataset.yaml`` overrides) ->
a validated, frozen :class:`DatasetSpec`.

Every key of a description is checked here (unknown keys are errors); :attr:`DatasetSpec.description_sha256`
is the part of a manifest's identity that comes from the description.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import ManifestError
from pipeline.store.io import json_digest

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
        return json_digest(d, allow_nan=True)  # allow_nan: as this key was always computed


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
