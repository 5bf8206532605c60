"""Stage 0 `manifest`: the dataset as a frame list (frames, splits, annotations, masks, fingerprints), saved as
``manifest.json``. Built by the plan itself (pipeline/data/build.py); this stage only publishes it.

Its key is also the frames identity that depth's key hangs on (stages/depth), so bumping its schema rebuilds every
depth cache; manifest keys changed without a bump when annotations and splits entered them (the fingerprint became
a dict of parts, so no old key can be met again).
"""
from __future__ import annotations

from pipeline import config as C
from pipeline.stages.declaration import KeyEnv, KeyParts, Stage


def _description(cfg: C.ExperimentConfig, m) -> dict:
    return {"dataset": cfg.data.manifest, "description_sha256": m.description_sha256}


def _reads(m, synthetic) -> dict:
    from pipeline.data import reads

    return reads.manifest_fingerprint(m)


def _key(s: dict, env: KeyEnv) -> KeyParts:
    return KeyParts(s, {}, _reads(env.manifest, env.synthetic))


def _run(ctx) -> dict:
    ctx.plan.manifest.save(ctx.path / "manifest.json")
    return {"n_frames": len(ctx.plan.manifest.frame_ids), "fingerprint": ctx.plan.manifest.fingerprint}


MANIFEST = Stage(name="manifest", schema=1, upstream=(), section="data", settings=_description, key=_key, run=_run,
                 label="manifest", reads=_reads, followers_join=False, outputs=("manifest.json",))
