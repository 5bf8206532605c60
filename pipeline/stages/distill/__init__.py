"""Stage 3 `distill`: the RGB student, trained with reconstruction + gamma * (1 - cos) to the frozen teacher
(:mod:`.run`; the teacher's embeddings cached once per frame and flip by :mod:`.teacher_cache`). With
``eval.baseline`` the same stage also builds the gamma = 0 RGB baseline (:data:`BASELINE`, another artifact of it).

Its key hashes its section (:mod:`..trained`; the recipe options added later are left out at their old value) and
what it reads of the dataset: the RGB frames of the train and test splits.
"""
from __future__ import annotations

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
    return KeyParts(trained.key_config(s), env.upstream(DISTILL.upstream), _reads(env.manifest, env.synthetic))


def _run(ctx) -> dict:
    from pipeline.stages.distill.run import run

    return run(ctx)


def baseline_config(cfg: C.ExperimentConfig) -> C.ExperimentConfig:
    """``cfg`` with gamma = 0: plain AutoLink on RGB through the distill stage, sharing depth and teach: every
    field that declares a baseline value reset to it (:func:`pipeline.config.baseline_of`; gamma 0, ``init``
    scratch, no keypoint term, no adapter, as a baseline must not learn from the depth teacher)."""
    return C.baseline_of(cfg)


# 2: its key covers the splits, annotations and frames it reads (issue 13).
DISTILL = Stage(
    name="distill", schema=2, upstream=("teach", "depth"), section="distill", settings=trained.settings_of("distill"),
    key=_key, run=_run, label="student (RGB)", trains=True, reads=_reads, progress=trained.progress,
    side_by_side=True, outputs=("model.pt", "metrics.jsonl"), repair=trained.repair,
    help="""Stage 3: train the RGB student with the frozen teacher: recon + gamma * (1 - cos).""")

# With eval.baseline, a second distill artifact (gamma = 0) is built before eval, which scores it beside the student.
BASELINE = Entry(name="baseline", stage="distill", after="distill", when=lambda cfg: cfg.eval.baseline,
                 config=baseline_config, label="baseline (RGB, gamma 0)")
