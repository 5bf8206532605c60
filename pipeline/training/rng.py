"""The global RNGs (python, numpy, torch, CUDA): reseeded before every step, saved in checkpoints.

States are kept as plain tensors/lists so checkpoints load with ``weights_only=True``.
"""
from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch

from pipeline.training.sampling import TAG_GLOBAL_RNG, derive_seed


def seed_global_rngs(seed: int, step: int, rank: int) -> None:
    s = derive_seed(TAG_GLOBAL_RNG, seed, step, rank)
    random.seed(s)
    np.random.seed(s & 0xFFFF_FFFF)  # the legacy global RNG takes 32-bit seeds
    torch.manual_seed(s)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        # Only if CUDA is already in use: querying would otherwise initialise it in CPU runs.
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)

