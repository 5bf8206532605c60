"""Stage 2 `teach`: the AutoLink teacher, trained on the cached depth maps (:mod:`.run`; resumes from its last
checkpoint). Its declaration is here: its key hashes its section (:mod:`..trained`), the worse depth it may read
(``depth.degrade``), and what it reads of the dataset: the train split's depth, the test split's for its pictures
and figure-mass number, the synthetic generator's parameters for the latter.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from pipeline import config as C
from pipeline.stages import trained
from pipeline.stages.declaration import KeyEnv, KeyParts, Stage


def _reads(m, synthetic: Optional[dict]) -> dict:
    from pipeline.data.reads import applied_masks, digest

    fp = {"train": digest(m.split("train")), "pictured": digest(m.split("test")),
          "synthetic": None if synthetic is None else digest(synthetic.get("parameters"))}
    return applied_masks(m, fp, "masks")


def degrade_settings(depth_settings) -> Optional[dict]:
    """depth.degrade as the teacher applies it, or None when it leaves the depth as it is (the default)."""
    d = getattr(getattr(depth_settings, "config", None), "degrade", None)
    if d is None or d == C.DegradeConfig():
        return None
    return dataclasses.asdict(d)


def _key(s: C.TrainConfig, env: KeyEnv) -> KeyParts:
    sem = trained.key_config(s)
    degrade = degrade_settings(env.settings.get("depth"))
    if degrade is not None:  # the teacher reads worse depth than the cache holds (docs/studies.md)
        sem["depth_degrade"] = degrade
    return KeyParts(sem, env.upstream(TEACH.upstream), _reads(env.manifest, env.synthetic))


def _run(ctx) -> dict:
    from pipeline.stages.teach.run import run

    return run(ctx)


# 2: its key covers the splits, annotations and frames it reads (issue 13).
TEACH = Stage(
    name="teach", schema=2, upstream=("depth",), section="teach", settings=trained.settings_of("teach"), key=_key,
    run=_run, label="teacher (depth)", trains=True, reads=_reads, progress=trained.progress, side_by_side=True,
    outputs=("model.pt", "metrics.jsonl"), repair=trained.repair,
    help="""Stage 2: train the AutoLink teacher on the cached depth maps (resumes from its last checkpoint).""")
