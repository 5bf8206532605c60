"""MiDaS 3.1 DPT depth models on timm >= 1.0: registry, model, official-checkpoint loading,
run.py-identical transforms. Pure torch/numpy; reading files is ``pipeline.midas_weights``."""
from .checkpoint import convert_official_state_dict, ignored_patterns, load_official_state_dict
from .infer import image_to_input, predict_inverse_depth
from .registry import OUTPUT_MEANING, MidasSpec, create_model, get_spec, list_models

__all__ = [
    "OUTPUT_MEANING", "MidasSpec", "create_model", "get_spec", "list_models",
    "convert_official_state_dict", "ignored_patterns", "load_official_state_dict",
    "image_to_input", "predict_inverse_depth",
]
