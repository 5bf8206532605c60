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


def key_config(s: C.TrainConfig) -> dict:
    """A training section's config as its key hashes it (:func:`pipeline.config.key_dict`: the fields added later
    left out at their old values) with the VGG weights by their digest."""
    from pipeline.store.fingerprint import file_digest

    sem = C.key_dict(s)
    if s.recon_loss == "perceptual":
        sem["vgg_sha256"] = file_digest(s.vgg_weights) if s.vgg_weights else "torchvision-default"
    return sem


def progress(path: Path) -> str:
    from pipeline.stages.common import train_progress

    done, total = train_progress(path)
    return f"step {done}/{total}"


def repair(path: Path, damaged: list) -> None:
    from pipeline.stages.common import repair_training

    repair_training(path, [d["file"] for d in damaged])
