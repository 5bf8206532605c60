"""What the two trainings (teach, distill) declare alike: their settings (``hflip`` resolved), their key's config,
progress of an interrupted run and the repair of a damaged one. Import-light like every
declaration (the training code itself is :mod:`.common` and each stage's ``run.py``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from pipeline import config as C


def settings_of(section: str) -> Callable[[C.ExperimentConfig, Any], C.TrainConfig]:
    def settings(cfg: C.ExperimentConfig, m) -> C.TrainConfig:
        """The section with ``hflip`` resolved (None = what the dataset manifest says AutoLink does)."""
        sec = getattr(cfg, section)
        return dataclasses.replace(sec, hflip=m.hflip if sec.hflip is None else sec.hflip)

    return settings


# Training fields added after artifacts existed, at the value that was the only behaviour before them: left out of
# the key there, so models trained before keep their keys (init and keypoint_weight: distill's own).
_TRAIN_FIELDS_ADDED = (("deterministic", False), ("rerun", 0), ("adapter", False))


def key_config(s: C.TrainConfig) -> dict:
    """A training section's semantic config as its key hashes it (the VGG weights by their digest)."""
    from pipeline.store.fingerprint import file_digest

    sem = C.semantic_dict(s)
    if s.recon_loss == "perceptual":
        sem["vgg_sha256"] = file_digest(s.vgg_weights) if s.vgg_weights else "torchvision-default"
    for name, before in _TRAIN_FIELDS_ADDED:
        if name in sem and sem[name] == before:
            del sem[name]
    if sem["model"].get("extra_blocks") == 0:
        del sem["model"]["extra_blocks"]
    return sem


def progress(path: Path) -> str:
    from pipeline.stages.common import train_progress

    done, total = train_progress(path)
    return f"step {done}/{total}"


def repair(path: Path, damaged: list) -> None:
    from pipeline.stages.common import repair_training

    repair_training(path, [d["file"] for d in damaged])
