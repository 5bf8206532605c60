"""Find and load the ImageNet VGG16 weights for the perceptual loss. Never downloads."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import CheckpointError

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def default_vgg16_path() -> Path:
    """Where torchvision caches its VGG16 weights: ``torch.hub.get_dir()/checkpoints/<file>``
    (``$TORCH_HOME/hub/...``, by default ``~/.cache/torch/hub/checkpoints``)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def _how_to_get(where: Path) -> str:
    return (f"get it on a machine with network access with "
            f"`python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\"` "
            f"(it lands in {default_vgg16_path()}), or download {VGG16_URL} and put it at {where} "
            f"or pass its path; a run without weights can use the reconstruction loss 'l1ssim' instead")


def load_vgg16_state_dict(path: str | None) -> dict:
    """Load torchvision's ImageNet VGG16 state dict from ``path``, or from torchvision's cache when
    ``path`` is None. Loaded with ``weights_only=True`` onto the CPU.

    Raises :class:`CheckpointError` naming the file and how to get it when it is missing,
    unreadable or not a VGG16 state dict.
    """
    import torch

    file = Path(os.path.expanduser(path)) if path is not None else default_vgg16_path()
    if not file.is_file():
        what = "VGG16 weights file" if path is not None else "VGG16 weights not found in torchvision's cache"
        raise CheckpointError(f"{what}: {file} does not exist; {_how_to_get(file)}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/zip error means the same thing to the user
        raise CheckpointError(f"VGG16 weights file {file} could not be read ({type(exc).__name__}: {exc}); "
                              f"the file may be truncated or not a torch checkpoint: {_how_to_get(file)}") from exc
    if not isinstance(state, dict) or "features.0.weight" not in state:
        raise CheckpointError(f"VGG16 weights file {file} is not a torchvision vgg16 state dict "
                              f"(no 'features.0.weight' key); {_how_to_get(file)}")
    return state
