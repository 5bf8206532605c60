"""Checkpoint files that survive ``kill -9`` and never run code when loaded.

Two rules, one per direction:

* **Writing** (:func:`save_atomic`): the payload goes to a temporary name in the same
  directory, is flushed and fsynced, then ``os.replace``\\ d over the final name and the directory
  is fsynced. A reader (or a resumed run) therefore sees either the previous complete file or the
  new complete file, never a torn one; a process killed mid-write leaves only a ``.<name>.tmp.<pid>``
  file, which :func:`remove_stale_temporaries` deletes on the next start.
* **Reading** (:func:`load_safe`): always ``torch.load(weights_only=True)``, so a file carrying a
  pickled object (a class with ``__reduce__`` that runs a shell command, say) is refused with a
  :class:`~pipeline.errors.CheckpointError` instead of being executed. Because of that, everything
  we save must be "plain": tensors, numbers, strings, ``None``, lists, tuples and dicts of those.
  :func:`save_atomic` checks this *before* writing, so a non-plain value (a ``Path`` in a config,
  a numpy array in an RNG state) fails at save time with the key that holds it, not weeks later
  when someone tries to resume.

Training checkpoints live in ``<run_dir>/checkpoints/step-<8 digits>.pt``; helpers here list them,
find the newest loadable one and prune old ones.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from pipeline.store.io import atomic_file, is_storage_error, storage_error
from pipeline.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoints"
_CKPT_RE = re.compile(r"^step-(\d{8,})\.pt$")
_TMP_MARK = ".tmp."

# Types `torch.load(weights_only=True)` reconstructs without running arbitrary code. Exact types:
# subclasses (numpy.float64, torch.__version__'s TorchVersion) pickle as globals and are refused.
_PLAIN_SCALARS = frozenset({bool, int, float, str, type(None), torch.dtype, torch.Size})
_PLAIN_MAPPINGS = frozenset({dict, OrderedDict})
_PLAIN_SEQUENCES = frozenset({list, tuple})


def checkpoint_name(step: int) -> str:
    """File name of the training checkpoint taken after ``step`` completed optimiser steps."""
    return f"step-{step:08d}.pt"


def _tmp_path(path: Path) -> Path:
    # Hidden, same directory (os.replace must not cross file systems), pid-tagged so two
    # writers (which the artifact lock should prevent anyway) never share a temp file.
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` naming the first value ``weights_only=True`` loading would refuse.

    ``where`` is the dotted path used in the message (e.g. ``checkpoint.config.data.root``).
    Tensor contents are not traversed, so this is cheap even for large state dicts.
    """
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_SCALARS:
        return
    if type(obj) in _PLAIN_MAPPINGS:
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} is not a str/int; "
                                "checkpoints hold only plain keys so they load with weights_only=True")
            check_plain(value, f"{where}.{key}")
        return
    if type(obj) in _PLAIN_SEQUENCES:
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: value of type {type(obj).__module__}.{type(obj).__qualname__} cannot be "
                    "loaded with torch.load(weights_only=True); convert it to a tensor, number, str, "
                    "list or dict before saving")


def save_atomic(obj: dict[str, Any], path: Path | str) -> Path:
    """Write ``obj`` with ``torch.save`` to ``path`` atomically; returns the final path.

    ``obj`` must be plain (see :func:`check_plain`, which raises ``TypeError`` otherwise). On any
    failure the temporary file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    check_plain(obj)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if is_storage_error(e):
            raise storage_error(e, path.parent, what="checkpoint folder") from e
        raise
    what = "training checkpoint" if _CKPT_RE.match(path.name) else "model file"
    with atomic_file(path, _tmp_path(path), what=what, needed=tensor_bytes(obj)) as f:
        torch.save(obj, f)
    return path


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a plain payload: about what ``torch.save`` writes (the rest is small)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def load_safe(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic` (or any plain ``torch.save`` dict) onto the CPU.

    Always ``weights_only=True``. Raises :class:`CheckpointError` when the file is missing,
    truncated/corrupt, carries pickled objects, or does not hold a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (check the path, or re-run the stage that writes it)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global it does not know: this is where crafted payloads end.
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line or "Unpickler" in line),
                      type(e).__name__)
        raise CheckpointError(
            f"{path} is not a plain-tensor checkpoint: it contains pickled Python objects, which will "
            f"not be executed (torch.load weights_only=True refused it: {reason}). Only load files "
            "written by dkp-pipeline, or re-save the weights as a plain state_dict on a machine you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e}); "
                              "delete it (an older checkpoint beside it will be used) or re-create it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors and settings; "
                              "it was not written by dkp-pipeline")
    return obj


def list_checkpoints(directory: Path | str) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete training checkpoint in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: Path | str) -> tuple[int, Path, dict[str, Any]] | None:
    """Newest checkpoint in ``directory`` that loads, as ``(step, path, payload)``; ``None`` if none.

    Atomic writes mean a listed file is complete; a file that still fails to load (disk damage,
    someone copying by hand) is logged and skipped in favour of the previous one, which is why
    more than one is kept. A file with a pickled payload is *not* skipped: that is refused loudly.
    """
    for step, path in reversed(list_checkpoints(directory)):
        try:
            return step, path, load_safe(path)
        except CheckpointError as e:
            if "not a plain-tensor checkpoint" in str(e):
                raise
            log.warning("skipping unreadable checkpoint: %s", e)
    return None


def prune_checkpoints(directory: Path | str, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns the deleted paths."""
    removed = []
    for _, path in list_checkpoints(directory)[:-keep] if keep > 0 else list_checkpoints(directory):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def remove_stale_temporaries(directory: Path | str) -> list[Path]:
    """Delete ``.<name>.tmp.<pid>`` files left in ``directory`` by a killed writer; returns them.

    Only call this while holding the run's lock: a live writer's temp file looks the same.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        if p.name.startswith(".") and _TMP_MARK in p.name and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
