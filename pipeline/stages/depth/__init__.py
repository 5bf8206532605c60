"""Stage 1 `depth`: every frame of the manifest -> relative inverse depth in the HDF5 depth cache.

Providers:
- ``midas``: MiDaS 3.1 from the official checkpoint the user names; frames decoded and preprocessed
  (run.py-identical) in DataLoader workers, batched by resized shape, ``inference_mode``, autocast
  (bf16/fp16; a batch with non-finite fp16 output is recomputed in fp32 — Swin's and the head's known
  overflow), channels_last on CUDA, optional ``torch.compile``; with ``depth.preprocess: device`` JPEGs are
  decoded on the model's device (nvJPEG on CUDA) and every frame is resized + normalised there (float32 torch
  ops, :func:`device_batch`), leaving the workers only file reads (and non-JPEG decodes);
- ``files``: depth maps named by a ``folder``/``synthetic`` manifest, converted to inverse depth.

Every HDF5 operation runs on one background writer thread (:class:`BackgroundWriter`): the main thread
only decodes results and queues them, so compression and fsyncs overlap the next batch's inference.

The stage's declaration (:data:`DEPTH`: name, schema, settings, key, progress, notes, integrity) is below; what
lives beside it: :mod:`.identity` (what determines the output: the key's inputs and the cache spec, from one
function), :mod:`.stage` (``run_managed``: parts, locks, merge and publish), :mod:`.frames` (decoding and
preprocessing in DataLoader workers, or on the device), :mod:`.compute` (the model and the batching loop),
:mod:`.writer` (the background HDF5 writer thread).

The artifact directory *is* the cache directory (pipeline/depth_cache/). A shard is the unit of
work and atomicity: a crash loses at most the shard being written. Distributed: under torchrun each
rank writes the shards it owns (index % world == rank) and rank 0 merges after a barrier; with
``--shard i/n`` a scheduler array does the same across machines, and the last part to finish (or a
plain re-run) merges and publishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline import config as C
from pipeline.stages.declaration import KeyEnv, KeyParts, Stage
from pipeline.stages.manifest import MANIFEST


def _settings(cfg: C.ExperimentConfig, m):
    from pipeline.stages.depth.identity import DepthSettings
    from pipeline.store.fingerprint import file_digest

    digest = None
    if cfg.depth.provider == "midas":
        digest = file_digest(cfg.depth.weights)
    elif cfg.depth.provider == "transformers":  # a folder: the digest of its weight files (stages/depth/hf.py)
        from pipeline.stages.depth.hf import folder_identity

        digest = folder_identity(cfg.depth.weights)["weights_sha256"]
    return DepthSettings.resolve(cfg.depth, m, digest)


def _key(s, env: KeyEnv) -> KeyParts:
    from pipeline.data import reads
    from pipeline.store.artifacts import artifact_key

    # depth reads the frames only: its upstream is the identity of the frames (the manifest key of schema 1,
    # before annotations and splits entered the manifest's key), so editing annotations never reruns MiDaS and
    # caches built before that change keep their keys.
    frames_key = artifact_key("manifest", env.settings["manifest"], {}, reads.frames_identity(env.manifest),
                              schema=MANIFEST.schema)
    return KeyParts(s.identity.key_config, {"manifest": frames_key}, s.identity.fingerprint)


def _run(ctx) -> bool:
    from pipeline.stages.depth.stage import run_managed

    return run_managed(ctx)


def _progress(path: Path) -> str:
    from pipeline.depth_cache import progress

    done, total = progress(path)
    return f"frames {done}/{total}"


def _integrity(path: Path, deep: bool) -> list:
    from pipeline.depth_cache import damage

    return damage(path, deep=deep)


def _repair(path: Path, damaged: list) -> None:
    from pipeline.depth_cache import forget_damaged

    forget_damaged(path, [d["file"] for d in damaged])


def _notes(record: dict) -> Optional[str]:
    """What a finished depth cache lacks: frames skipped with --skip-bad-frames, frames with holes."""
    notes = []
    skipped = record.get("skipped_frames")
    if skipped:  # built with --skip-bad-frames: say which frames have no depth
        ids = [str(s.get("frame")) for s in skipped[:3]]
        notes.append(f"{len(skipped)} unreadable frame(s) skipped (invalid in the cache): "
                     + ", ".join(ids) + (" …" if len(skipped) > 3 else ""))
    holes = (record.get("compute") or {}).get("frames_with_holes")
    if holes:
        notes.append(f"{holes} frame(s) with depth holes (no reading; ignored by the teacher's normalisation)")
    return "; ".join(notes) or None


DEPTH = Stage(
    name="depth", schema=1, upstream=("manifest",), section="depth", settings=_settings, key=_key, run=_run,
    label="depth cache", managed=True, progress=_progress, notes=_notes, outputs=("layout.json", "index.json"),
    integrity=_integrity, repair=_repair,
    help="""Stage 1: MiDaS 3.1 (or imported depth files) over every frame into the HDF5 depth cache.

    Resumable after any crash (finished shards are kept), shardable across machines with
    --shard i/n and across GPUs with `torchrun --nproc-per-node N dkp-pipeline depth ...`.""")
