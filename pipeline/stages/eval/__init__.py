"""Stage 4 `eval`: score the student (and the teacher, the baseline) with the dataset's protocol: metrics.json and
pictures (:mod:`.run`).

Its key hashes its section (``protocol: auto`` resolved to the manifest's, the left/right pairs it reads from
ROOT/dataset.yaml when ``flip_pairs: dataset``) and what it reads of the dataset: the regress and test splits,
their annotations (coordinates and visibility), their frames, the test frames' foreground masks and the synthetic
block of ``ROOT/dataset.yaml``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from pipeline import config as C
from pipeline.stages.declaration import KeyEnv, KeyParts, Stage


def _settings(cfg: C.ExperimentConfig, m) -> C.EvalConfig:
    """eval's section with ``protocol: auto`` resolved to the manifest's protocol."""
    e = cfg.eval
    return dataclasses.replace(e, protocol=m.protocol) if e.protocol == "auto" else e


def _reads(m, synthetic: Optional[dict]) -> dict:
    from pipeline.data.reads import annotations_of, applied_masks, digest, frames_of, union
    from pipeline.store.fingerprint import combine

    fit, test = m.split("regress"), m.split("test")
    both = union(m, fit, test)
    masks = None
    if m.mask_fingerprints is not None:
        masks = combine([m.mask_fingerprints[i] or "-" for i in test.tolist()])
    fp = {"splits": digest(fit, test), "annotations": annotations_of(m, both), "frames": frames_of(m, both),
          "masks": masks, "synthetic": None if synthetic is None else digest(synthetic)}
    return applied_masks(m, fp, "masks_applied")


def _key(s: C.EvalConfig, env: KeyEnv) -> KeyParts:
    sem = C.semantic_dict(s)
    if s.flip_pairs == "dataset":  # eval reads the pairs from ROOT/dataset.yaml: key them
        sem["left_right_pairs"] = env.manifest.left_right_pairs
    return KeyParts(sem, env.upstream(EVAL.upstream), _reads(env.manifest, env.synthetic))


def _run(ctx) -> dict:
    from pipeline.stages.eval.run import run

    return run(ctx)


# 2: the floor, ratios and the optional baseline in metrics.json; the GT/splits it reads in the key.
EVAL = Stage(
    name="eval", schema=2, upstream=("distill", "teach", "depth", "baseline"), section="eval", settings=_settings,
    key=_key, run=_run, label="eval", reads=_reads, followers_join=False, outputs=("metrics.json",),
    help="""Score the student (and teacher, baseline) with the dataset's protocol: metrics.json + pictures.""")
