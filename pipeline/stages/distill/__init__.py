"""Stage 3 `distill`: the RGB student, trained with reconstruction + gamma * (1 - cos) to the frozen teacher
(:mod:`.run`; the teacher's embeddings cached once per frame and flip by :mod:`.teacher_cache`). With
``eval.baseline`` the same stage also builds the gamma = 0 RGB baseline (:data:`BASELINE`, another artifact of it).

Its key hashes its section (:mod:`..trained`; the recipe options added later are left out at their old value) and
what it reads of the dataset: the RGB frames of the train and test splits.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from pipeline import config as C
from pipeline.stages import trained
from pipeline.stages.declaration import Entry, KeyEnv, KeyParts, Stage


def _reads(m, synthetic: Optional[dict]) -> dict:
    from pipeline.data.reads import applied_masks, digest, frames_of, union

    train, test = m.split("train"), m.split("test")
    fp = {"train": digest(train), "pictured": digest(test), "frames": frames_of(m, union(m, train, test))}
    return applied_masks(m, fp, "masks")


def _key(s: C.TrainConfig, env: KeyEnv) -> KeyParts:
    sem = trained.key_config(s)
    # fields added later, at the value that was the only behaviour before them: students built then keep keys
    for name, before in (("init", "scratch"), ("keypoint_weight", 0.0)):
        if sem.get(name) == before:
            del sem[name]
    return KeyParts(sem, env.upstream(DISTILL.upstream), _reads(env.manifest, env.synthetic))


def _run(ctx) -> dict:
    from pipeline.stages.distill.run import run

    return run(ctx)


def baseline_config(cfg: C.ExperimentConfig) -> C.ExperimentConfig:
    """``cfg`` with gamma = 0: plain AutoLink on RGB through the distill stage, sharing depth and teach
    (the same key a ``--set distill.gamma=0`` run has; ``init`` scratch, no keypoint term and no adapter, as a
    baseline must not learn from the depth teacher)."""
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, gamma=0.0, init="scratch",
                                                                        keypoint_weight=0.0, adapter=False),
                               eval=dataclasses.replace(cfg.eval, baseline=False))


# 2: its key covers the splits, annotations and frames it reads (issue 13).
DISTILL = Stage(
    name="distill", schema=2, upstream=("teach", "depth"), section="distill", settings=trained.settings_of("distill"),
    key=_key, run=_run, label="student (RGB)", trains=True, reads=_reads, progress=trained.progress,
    side_by_side=True, outputs=("model.pt", "metrics.jsonl"), repair=trained.repair,
    help="""Stage 3: train the RGB student with the frozen teacher: recon + gamma * (1 - cos).""")

# With eval.baseline, a second distill artifact (gamma = 0) is built before eval, which scores it beside the student.
BASELINE = Entry(name="baseline", stage="distill", after="distill", when=lambda cfg: cfg.eval.baseline,
                 config=baseline_config, label="baseline (RGB, gamma 0)")
