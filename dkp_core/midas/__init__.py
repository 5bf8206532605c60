"""MiDaS 3.1 DPT depth models on timm >= 1.0. Pure torch/numpy; reading files is ``pipeline.weights.midas``.

- ``registry.py``: the model zoo (one :class:`MidasSpec` per model type) and ``create_model``;
- ``families/``: one module per backbone family (adapter, official-key maps both ways, ignored keys),
  registered by name (``MidasSpec.backbone``);
- ``dpt.py``: the DPT decoder and head; ``checkpoint.py``: official checkpoint <-> our keys (strict loader);
- ``transforms.py``: run.py-identical pre/post-processing; ``infer.py``: inverse depth for a batch of frames.
"""
from .checkpoint import (convert_official_state_dict, ignored_patterns, load_official_state_dict,
                         official_layout_state_dict)
from .infer import image_to_input, predict_inverse_depth
from .registry import OUTPUT_MEANING, MidasSpec, create_model, get_spec, list_models

__all__ = [
    "OUTPUT_MEANING", "MidasSpec", "create_model", "get_spec", "list_models",
    "convert_official_state_dict", "ignored_patterns", "load_official_state_dict", "official_layout_state_dict",
    "image_to_input", "predict_inverse_depth",
]
