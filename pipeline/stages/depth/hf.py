"""``depth.provider: transformers``: any local Hugging Face depth-estimation folder (``config.json`` +
``model.safetensors`` + ``preprocessor_config.json``), loaded with ``AutoModelForDepthEstimation`` and
``AutoImageProcessor``: DPT (BEiT/Swin/ViT: MiDaS 3.1 as published on the Hub, e.g. ``Intel/dpt-beit-large-512``),
Depth Anything (V1/V2), and whatever else that auto class loads. The ``hf`` extra; nothing is ever downloaded.

What it computes is what transformers' own ``pipeline("depth-estimation")`` computes, frame by frame: the folder's
image processor (PIL backend, pinned: the torchvision one gives other numbers, and would depend on what is
installed) makes ``pixel_values`` in the DataLoader workers, the model's ``predicted_depth`` (B, h, w) comes back to
the frame's size by bicubic interpolation (align_corners=False, ``post_process_depth_estimation``'s call, which is
also the MiDaS path's :func:`dkp_core.midas.transforms.postprocess`). Batches group frames whose pixel_values have
one shape, like the MiDaS path's buckets. Note this is the Hub processor's preprocessing (for BEiT-L-512: squashed
to 512 x 512, PIL bilinear), not MiDaS run.py's (research/ecosystem.md §1): use ``provider: midas`` with the
official ``.pt`` for run.py-identical numbers.

What the output means (recorded in the key and the cache spec as ``output_meaning``): relative inverse depth
(MiDaS ports, Depth Anything "relative": affine-invariant disparity) is stored as it is; metric depth (Depth
Anything "metric", ZoeDepth, GLPN, Depth Pro, DPT with a DINOv2 backbone: the KITTI/NYU heads) is stored as its
inverse, 1 / d (holes where d <= 0), because every depth map in this tool is inverse depth (docs/conventions.md).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from pipeline.errors import CheckpointError, ConfigError

CONFIG, PROCESSOR = "config.json", "preprocessor_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
METRIC_TYPES = ("zoedepth", "glpn", "depth_pro")  # model types whose predicted_depth is metres
PROCESSOR_BACKEND = "pil"


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("depth.provider: transformers needs the hf extra: pip install -e '.[hf]' "
                          "(transformers, safetensors)") from None
    return transformers


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"depth.weights: {path} is unreadable ({e}); is the folder a complete `save_pretrained` "
                          "of a depth model?") from None
    if not isinstance(d, dict):
        raise ConfigError(f"depth.weights: {path} is not a JSON object")
    return d


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def check_folder(weights: Optional[str]) -> Path:
    """The folder ``depth.weights`` names, checked: it exists, holds config, processor and weights, and is a depth
    model (``architectures`` ending in ``ForDepthEstimation``, a model type the auto class maps). ConfigError
    naming what is missing and the fix."""
    hint = ("set depth.weights to a local Hugging Face depth model folder (what `save_pretrained` writes, e.g. a "
            "clone of Intel/dpt-beit-large-512 or depth-anything/Depth-Anything-V2-Small-hf)")
    if not weights:
        raise ConfigError(f"depth.provider transformers: depth.weights is not set; {hint}")
    folder = Path(weights).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"depth.weights {weights!r}: no such folder; {hint}")
    for name in (CONFIG, PROCESSOR):
        if not (folder / name).is_file():
            raise ConfigError(f"depth.weights {weights!r}: no {name} in it; {hint}")
    if not weight_files(folder):
        raise ConfigError(f"depth.weights {weights!r}: no weights file (*.safetensors or *.bin) in it; {hint}")
    cfg = _read_json(folder / CONFIG)
    model_type, archs = cfg.get("model_type"), cfg.get("architectures") or []
    mapped = _depth_model_types()
    if model_type not in mapped or not any(str(a).endswith("ForDepthEstimation") for a in archs):
        raise ConfigError(f"depth.weights {weights!r}: not a depth-estimation model (model_type {model_type!r}, "
                          f"architectures {archs}); AutoModelForDepthEstimation loads model types "
                          f"{', '.join(sorted(mapped))} with a *ForDepthEstimation head")
    output_meaning(cfg, weights)  # refuses a type whose output we cannot name
    return folder


def _depth_model_types() -> set[str]:
    _require_transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES

    return set(MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES)


def output_meaning(cfg: dict, where: str = "") -> str:
    """``"relative_inverse_depth"`` or ``"metric_depth"`` for a model config (module docstring)."""
    t = cfg.get("model_type")
    if t in ("depth_anything", "prompt_depth_anything"):
        return "metric_depth" if cfg.get("depth_estimation_type") == "metric" else "relative_inverse_depth"
    if t == "dpt":
        encoder = (cfg.get("backbone_config") or {}).get("model_type")  # DPT-DINOv2: the KITTI/NYU metric heads
        return "metric_depth" if encoder == "dinov2" else "relative_inverse_depth"
    if t in METRIC_TYPES:
        return "metric_depth"
    raise ConfigError(f"depth.weights {where!r}: model type {t!r} loads, but what its output means (relative inverse "
                      f"depth or metric depth) is not known to this tool; supported: depth_anything, dpt, "
                      f"{', '.join(METRIC_TYPES)}")


def folder_identity(weights: Optional[str]) -> dict:
    """What of the folder enters the depth key: the weights' digest (sha256 over each weight file's sha256, in name
    order; memoised like frames), the model config and the processor settings as saved. Never raises: a missing or
    broken folder gives ``{"weights_sha256": "missing:<path>"}`` so `status` still works (the stage refuses it)."""
    from pipeline.store.fingerprint import sha256_file_memo
    from pipeline.store.io import json_digest

    folder = Path(weights).expanduser() if weights else None
    try:
        if folder is None or not folder.is_dir():
            raise OSError
        files = weight_files(folder)
        if not files:
            raise OSError
        digests = {p.name: sha256_file_memo(p) for p in files}
        cfg, proc = json.loads((folder / CONFIG).read_text()), json.loads((folder / PROCESSOR).read_text())
    except (OSError, ValueError):
        return {"weights_sha256": f"missing:{folder}"}
    cfg = {k: v for k, v in cfg.items() if k not in ("transformers_version", "_name_or_path")}  # not the model
    meaning = None
    try:
        meaning = output_meaning(cfg, str(weights))
    except ConfigError:
        pass
    return {"weights_sha256": "sha256:" + json_digest(digests), "config": cfg, "processor": proc,
            "output_meaning": meaning, "processor_backend": PROCESSOR_BACKEND}


def load_processor(folder: str | os.PathLike):
    """The folder's image processor, PIL backend (``backend=`` in transformers 5, the slow processor in 4)."""
    _require_transformers()
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(folder), backend=PROCESSOR_BACKEND, local_files_only=True)
    except TypeError:  # transformers 4: the slow (PIL) processor
        return AutoImageProcessor.from_pretrained(str(folder), use_fast=False, local_files_only=True)


class HFDepthSpec:
    """What the depth loop needs of the folder's processor, picklable into DataLoader workers (each loads the
    processor once): :meth:`preprocess` (H, W, 3) uint8 -> (3, h, w) float32 pixel_values, :meth:`key` the shape a
    frame of a size becomes (the batch bucket)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = str(folder)
        self._proc = None
        self._keys: dict = {}
        size = _read_json(Path(folder) / PROCESSOR).get("size") or {}
        self.net_h, self.net_w = int(size.get("height", 384)), int(size.get("width", 384))

    def __getstate__(self):
        return {"folder": self.folder, "net_h": self.net_h, "net_w": self.net_w, "_proc": None, "_keys": {}}

    @property
    def processor(self):
        if self._proc is None:
            self._proc = load_processor(self.folder)
        return self._proc

    def preprocess(self, img):
        """(H, W, 3) uint8 RGB -> (3, h, w) float32 tensor: the processor's pixel_values for this frame."""
        return self.processor(images=[img], return_tensors="pt")["pixel_values"][0]

    def key(self, h: int, w: int) -> tuple:
        if (h, w) not in self._keys:
            import numpy as np

            self._keys[(h, w)] = tuple(self.preprocess(np.zeros((h, w, 3), np.uint8)).shape)
        return self._keys[(h, w)]


def load_model(d, weights_digest: Optional[str], device):
    """``(module, device, amp)`` like the MiDaS path: module(x (B, 3, h, w)) -> (B, h, w) predicted_depth, float32;
    ``module.dkp_metric`` tells the loop to store 1 / d after resizing back. Offline (local files only)."""
    import torch

    folder = check_folder(d.weights)
    ident = folder_identity(d.weights)
    if weights_digest and ident["weights_sha256"].split(":")[-1] != weights_digest.split(":")[-1]:
        raise CheckpointError(f"depth.weights {d.weights!r} changed since the plan (weights {ident['weights_sha256']}"
                              f", planned {weights_digest}); re-run")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach the Hub
    from transformers import AutoModelForDepthEstimation

    try:
        hf = AutoModelForDepthEstimation.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"depth.weights {d.weights!r}: transformers cannot load it as a depth model "
                          f"({str(e).splitlines()[0][:300]})") from None

    class Predicted(torch.nn.Module):
        def __init__(self, model, metric: bool) -> None:
            super().__init__()
            self.model, self.dkp_metric = model, metric

        def forward(self, x):  # (B, 3, h, w) pixel_values -> (B, h, w)
            return self.model(pixel_values=x).predicted_depth

    module = Predicted(hf.eval().to(device), ident["output_meaning"] == "metric_depth").eval()
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[d.precision]
    return module, device, amp
