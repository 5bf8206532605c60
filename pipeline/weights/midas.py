"""Reading official MiDaS 3.1 weights files (the file side of ``dkp_core.midas``).

``load_midas`` builds the model for a type, reads the ``.pt`` with ``torch.load(weights_only=True)``
(no pickled code runs), maps the official key layout strictly, and returns the file's sha256,
which belongs in the depth cache's spec and provenance. Every failure a user can fix is a
:class:`~pipeline.errors.CheckpointError` naming the model type, the expected file and where to get it.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Union

from pipeline.errors import CheckpointError
from pipeline.store.io import sha256_file


def file_sha256(path: Union[str, Path]) -> str:
    """Hex sha256 of the file's bytes (streamed)."""
    return sha256_file(path, prefix="")


def _where(spec) -> str:
    return f"expected the official file {spec.weights_file!r}, downloadable from {spec.weights_url}"


def load_midas(model_type: str, weights_path: Union[str, Path], device="cpu"):
    """Build ``model_type`` and load the official weights at ``weights_path``.

    Returns ``(model, sha256_hex)``: the :class:`~dkp_core.midas.dpt.MidasDpt` on ``device`` in
    eval mode ((B, 3, H, W) normalised input -> (B, H, W) relative inverse depth, larger =
    nearer) and the hex sha256 of the file's bytes.
    Raises CheckpointError for an unknown type, a missing/unreadable file, or a file that is not
    a MiDaS checkpoint for ``model_type``.
    """
    import torch

    from dkp_core.midas import create_model, get_spec, list_models, load_official_state_dict

    try:
        spec = get_spec(model_type)
    except ValueError as e:
        raise CheckpointError(f"depth model: {e}") from None
    path = Path(weights_path)
    if not path.is_file():
        raise CheckpointError(f"MiDaS weights for {model_type} not found at {str(path)!r}: {_where(spec)} "
                              f"(download it and pass its path)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{str(path)!r} cannot be read as a weights-only torch file for {model_type} "
                              f"({first}); {_where(spec)}") from None
    # MiDaS's BaseModel.load unwraps training checkpoints that carry an optimizer.
    if isinstance(obj, dict) and "optimizer" in obj and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{str(path)!r} is not a MiDaS state dict (a dict of tensors) for {model_type}; "
                              f"{_where(spec)}")
    model = create_model(model_type)
    try:
        load_official_state_dict(model, obj, model_type)
    except ValueError as e:
        hint = ""
        if path.stem in list_models() and path.stem != model_type:
            hint = f" (the file name suggests model type {path.stem!r})"
        raise CheckpointError(f"{str(path)!r} is not a MiDaS checkpoint for {model_type}{hint}; {_where(spec)}. "
                              f"Details: {e}") from None
    sha = file_sha256(path)
    return model.to(device).eval(), sha
