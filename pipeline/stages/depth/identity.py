"""What determines the depth output, in one function: :func:`depth_identity` gives both the artifact key's
inputs (semantic config + fingerprint) and the cache spec (stored in the cache, checked on reuse and import).

Import-light (the stage registry derives keys from here for ``status``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline import config as C
from pipeline.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class DepthIdentity:
    key_config: dict  # the key's semantic config
    fingerprint: Any  # the key's input fingerprint: the frames (midas) or the depth files (files)
    # the cache spec, made on first use: a MiDaS spec needs dkp_core.midas (torch and timm, seconds to import),
    # which `status` must not pay for a key that does not need it
    make_spec: Callable[[], Optional[dict]] = field(repr=False, compare=False)

    @functools.cached_property
    def spec(self) -> Optional[dict]:
        """The cache spec; None for an unknown MiDaS model type (the stage refuses it first)."""
        return self.make_spec()


def depth_identity(d: C.DepthConfig, m, weights_digest: Optional[str]) -> DepthIdentity:
    """The identity of the depth cache of ``d`` over manifest ``m``; ``weights_digest`` is
    ``"sha256:<hex>"`` of ``d.weights`` (:func:`pipeline.store.fingerprint.file_digest`; midas only).

    Where key and spec differ, it is on purpose: the key holds the weights digest as planned (``"missing:..."``
    for an absent file, so `status` still works) and the frames' identity; the spec holds the numbers a reader
    of the cache needs (input size, resize rule, mean/std), which follow from the model type, and the
    manifest's fingerprint, against which a cache is checked on import.
    """
    from pipeline.data import reads
    from pipeline.data.images import DEPTH_FILE_RULE

    d = resolve_auto(d)
    key = C.key_dict(d)  # preprocess "cpu" and tf32 off, the behaviour before they existed, are left out
    # degrade is applied when the teacher reads the cache (pipeline/data/degrade.py), never to the cache: it is in
    # teach's key, and one cache serves every degradation
    key.pop("degrade", None)
    if d.provider != "midas" or d.precision != "fp32":  # tf32 is read only by fp32 MiDaS (on CUDA)
        key.pop("tf32", None)
    spec: Optional[dict] = {"provider": d.provider, "manifest_fingerprint": m.fingerprint,
                            "storage_dtype": d.storage_dtype}
    # preprocess changes values only on the device path of MiDaS (the other providers never read it)
    if d.provider != "midas":
        key.pop("preprocess", None)
    preprocess = key.get("preprocess")
    if d.provider == "midas":
        key["weights_sha256"] = weights_digest
        fingerprint = reads.frames_identity(m)

        def midas_spec() -> Optional[dict]:
            ms = _known_spec(d.model_type)
            if ms is None:
                return None
            out = dict(spec, model_type=d.model_type,
                       weights_sha256=(weights_digest or "").split(":", 1)[-1] or None, precision=d.precision,
                       net_w=ms.net_w, net_h=ms.net_h, resize_mode=ms.resize_mode,
                       ensure_multiple_of=ms.ensure_multiple_of, interpolation=ms.interpolation,
                       mean=list(ms.mean), std=list(ms.std), output_resize="bicubic to frame size")
            if preprocess is not None:
                out["preprocess"] = preprocess
            if "tf32" in key:
                out["tf32"] = True
            return out

        return DepthIdentity(key, fingerprint, midas_spec)
    elif d.provider == "transformers":  # a Hugging Face folder: its weights, config and processor (hf.py)
        from pipeline.stages.depth.hf import folder_identity

        hf = folder_identity(d.weights)
        key.pop("model_type", None)
        key["weights_sha256"] = weights_digest
        key["transformers"] = {k: v for k, v in hf.items() if k != "weights_sha256"}
        fingerprint = reads.frames_identity(m)
        proc = hf.get("processor") or {}
        spec.update(model_type=(hf.get("config") or {}).get("model_type"), weights_sha256=weights_digest,
                    precision=d.precision, output_meaning=hf.get("output_meaning"),
                    stored_as="relative inverse depth" if hf.get("output_meaning") != "metric_depth"
                    else "1 / metric depth (1/m), holes where depth <= 0",
                    processor_backend=hf.get("processor_backend"), processor_json=json.dumps(proc, sort_keys=True),
                    output_resize="bicubic to frame size (align_corners=False)")
    else:
        key.pop("model_type", None)
        key.pop("precision", None)
        key["depth_options"] = m.depth_options
        key["decode"] = DEPTH_FILE_RULE
        fingerprint = m.depth_fingerprint
        opts = m.depth_options or {}
        spec.update(depth_fingerprint=m.depth_fingerprint, **{f"depth_options.{k}": v for k, v in sorted(opts.items())})
    return DepthIdentity(key, fingerprint, lambda: spec)


@dataclass(frozen=True)
class DepthSettings:
    """The depth stage's typed settings: its config section, the weights digest planned, the identity."""

    config: C.DepthConfig
    weights_digest: Optional[str]  # "sha256:<hex>" of config.weights when planned (midas), else None
    identity: DepthIdentity

    @classmethod
    def resolve(cls, d: C.DepthConfig, m, weights_digest: Optional[str]) -> "DepthSettings":
        d = resolve_auto(d)
        return cls(d, weights_digest, depth_identity(d, m, weights_digest))

    @property
    def weights_sha256(self) -> Optional[str]:
        """The planned weights' hex sha256 (what the loaded file must have), or None."""
        return (self.weights_digest or "").split(":", 1)[-1] or None


def runs_on_cuda(d: C.DepthConfig) -> bool:
    """Whether the depth model of ``d`` runs on CUDA: ``device: cuda``, or ``auto`` with a GPU visible. (torch is
    imported only to answer ``auto``.)"""
    if d.device in ("cpu", "cuda"):
        return d.device == "cuda"
    import torch

    return torch.cuda.is_available()


def resolve_auto(d: C.DepthConfig) -> C.DepthConfig:
    """``d`` with ``precision``/``preprocess: auto`` made concrete for the device it runs on (they are in the key):
    on CUDA bf16 (fp16 on GPUs without bf16) and ``device`` preprocessing where nvJPEG decodes; on a CPU fp32 and
    ``cpu`` (run.py-identical), which is what a CPU run keyed as before ``auto`` existed. The files provider
    reads neither: fp32 / cpu, without asking torch."""
    if d.precision != "auto" and d.preprocess != "auto":
        return d
    cuda = d.provider in ("midas", "transformers") and runs_on_cuda(d)
    precision, preprocess = d.precision, d.preprocess
    if precision == "auto":
        precision = gpu_amp_name() if cuda else "fp32"
    if preprocess == "auto":  # transformers: its image processor, in the workers (cpu)
        preprocess = "device" if cuda and d.provider == "midas" and nvjpeg_works() else "cpu"
    return dataclasses.replace(d, precision=precision, preprocess=preprocess)


def gpu_amp_name() -> str:
    """bf16 where the current GPU has bf16 units (Ampere and later), else fp16. Planned on a machine without the
    GPU (``depth.device: cuda`` in `status` on a login node): bf16, what every GPU since Ampere has."""
    import torch

    if not torch.cuda.is_available():
        return "bf16"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@functools.lru_cache(maxsize=None)
def nvjpeg_works() -> bool:
    """Whether torchvision decodes a JPEG on the current CUDA device (a build without nvJPEG raises). Planned on a
    machine without the GPU: True (torchvision's CUDA builds ship nvJPEG)."""
    import cv2
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        return True
    ok, buf = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    try:
        from torchvision.io import decode_jpeg

        img = decode_jpeg(torch.from_numpy(buf.reshape(-1)), device="cuda")
        return tuple(img.shape) == (3, 16, 16)
    except Exception:  # noqa: BLE001 - any failure means: decode on the CPU instead
        return False


def _known_spec(model_type: str):
    from dkp_core.midas import get_spec

    try:
        return get_spec(model_type)
    except ValueError:
        return None


def expected_spec(cfg: C.ExperimentConfig, manifest) -> dict:
    """The spec a cache for ``cfg`` over ``manifest`` must have (weights hashed from the file named in cfg)."""
    digest = None
    if cfg.depth.provider == "midas":
        check_midas_config(cfg.depth)
        from pipeline.store.fingerprint import file_digest

        digest = file_digest(cfg.depth.weights)
    elif cfg.depth.provider == "transformers":
        from pipeline.stages.depth.hf import folder_identity

        check_transformers_config(cfg.depth)
        digest = folder_identity(cfg.depth.weights)["weights_sha256"]
    return depth_identity(cfg.depth, manifest, digest).spec


def check_transformers_config(d: C.DepthConfig) -> None:
    """The folder depth.weights names is a loadable depth-estimation model (hf.py); checked before anything is written."""
    from pipeline.stages.depth.hf import check_folder

    if d.preprocess == "device":
        raise ConfigError("depth.preprocess: device is for provider midas; the transformers provider runs the folder's "
                          "own image processor in the DataLoader workers: set depth.preprocess: auto or cpu")
    check_folder(d.weights)


def check_midas_config(d: C.DepthConfig) -> None:
    """Model type known, weights named and present: all checked before anything is written."""
    from dkp_core.midas import get_spec, list_models

    try:
        ms = get_spec(d.model_type)
    except ValueError:
        raise ConfigError(f"depth.model_type {d.model_type!r} is not a MiDaS 3.1 model; valid: "
                          f"{', '.join(list_models())}") from None
    where = f"the official checkpoint {ms.weights_file!r} (download: {ms.weights_url})"
    if not d.weights:
        raise ConfigError(f"depth.weights is not set: pass {where} with --set depth.weights=/path/to/{ms.weights_file}")
    if not Path(d.weights).expanduser().is_file():
        raise CheckpointError(f"depth.weights: MiDaS weights for {d.model_type} not found at {d.weights!r}; "
                              f"expected {where}")
