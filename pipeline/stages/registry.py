"""The stage registry: every stage of the pipeline declared once, in the order data flows.

A :class:`Stage` is the stage's whole identity: its name (CLI command, store directory, plan entry), its
schema version, the plan entries it reads, its typed settings, how its key is derived and how it runs.
:data:`ENTRIES` adds the plan entries that are another artifact of a registered stage (the gamma = 0
baseline). The plan (:func:`pipeline.graph.build_plan`), the runner, ``status``, the CLI's stage names and
:data:`SCHEMA_VERSIONS` all iterate these two tuples; adding a stage is a module under ``pipeline/stages/``
with a ``run(ctx)`` plus one declaration here.

Import-light on purpose (config and dataclasses only; stage modules, torch and the data readers are
imported when a stage runs or a key is derived), so ``dkp-pipeline --help`` stays instant and
:mod:`pipeline.store.artifacts` may import :data:`SCHEMA_VERSIONS` from here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline import config as C


@dataclass(frozen=True)
class KeyParts:
    """What a stage's artifact key hashes besides its name and schema (:func:`pipeline.store.artifacts.artifact_key`)."""

    config: dict  # the semantic settings: every field that changes the output (config.NON_SEMANTIC removed)
    upstream: dict  # plan entry -> key of the artifact read
    fingerprint: Any  # "xxh3:..." or a dict of named parts (pipeline/data/reads.py): the data read


@dataclass(frozen=True)
class KeyEnv:
    """What a key derivation may look at besides the stage's settings."""

    manifest: Any  # pipeline.data.manifest.Manifest
    synthetic: Optional[dict]  # the `synthetic` block of ROOT/dataset.yaml (pipeline.data.reads.synthetic_block)
    keys: dict  # plan entry -> key, for the entries planned before this one
    settings: dict  # plan entry -> typed settings, for the same entries

    def upstream(self, names: tuple[str, ...]) -> dict:
        """{entry: key} of ``names`` that are in the plan (an optional entry, the baseline, may be absent)."""
        return {n: self.keys[n] for n in names if n in self.keys}


@dataclass(frozen=True)
class Stage:
    name: str  # CLI command, store directory STORE/<name>/, plan entry
    schema: int  # bumped by hand when the meaning of the output changes (never derived from the git SHA)
    upstream: tuple[str, ...]  # plan entries whose artifacts it reads (and whose keys enter its key)
    section: str  # the config section saved beside the artifact (artifact.json "config")
    settings: Callable[[C.ExperimentConfig, Any], Any]  # (config, manifest) -> the typed settings it runs with
    key: Callable[[Any, KeyEnv], KeyParts]  # (settings, env) -> what its key hashes
    run: Callable[[Any], Any]  # (pipeline.runner.StageContext) -> extra artifact.json fields (or, if managed, bool)
    help: Optional[str] = None  # docstring of its CLI command; None: no command of its own
    managed: bool = False  # True: writes and publishes its artifact itself (depth's multi-process protocol)
    followers_join: bool = True  # torchrun ranks > 0 run it too (in rank 0's directory); False: rank 0 only
    progress: Optional[Callable[[Path], Optional[str]]] = None  # "step 300/20001" of an interrupted artifact
    notes: Optional[Callable[[dict], Optional[str]]] = None  # what a finished artifact lacks, from its record
    # True: entries of it that do not read each other may be built side by side, one process each
    # (pipeline.jobs: a training's small convolutions use a CPU's cores better so than with all threads in one).
    side_by_side: bool = False
    # Damaged finished artifacts (issue 24). outputs: files every finished artifact has, checked for artifacts
    # published before artifact.json listed its files. integrity: (path, deep) -> [{"file", "problem"}], the
    # stage's own check beyond the file list (deep: checksums). repair: (path, damage) -> None, prepares a damaged
    # artifact for `run` to rebuild by resuming in it (default: delete the damaged files).
    outputs: tuple[str, ...] = ()
    integrity: Optional[Callable[[Path, bool], list]] = None
    repair: Optional[Callable[[Path, list], None]] = None


@dataclass(frozen=True)
class Entry:
    """A plan entry that is another artifact of a registered stage, run with a derived config."""

    name: str
    stage: str
    after: str  # planned right after this entry
    when: Callable[[C.ExperimentConfig], bool]
    config: Callable[[C.ExperimentConfig], C.ExperimentConfig]


def file_digest(path: Optional[str]) -> Optional[str]:
    """sha256 of a weights file, memoised by (inode, size, mtime) like frame fingerprints."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        return f"missing:{p}"
    from pipeline.store.fingerprint import sha256_file_memo

    return sha256_file_memo(p)


# ------------------------------------------------------------------------------------------------ manifest
def _manifest_description(cfg: C.ExperimentConfig, m) -> dict:
    return {"dataset": cfg.data.manifest, "description_sha256": m.description_sha256}


def _manifest_key(s: dict, env: KeyEnv) -> KeyParts:
    from pipeline.data import reads

    return KeyParts(s, {}, reads.manifest_fingerprint(env.manifest))


def _run_manifest(ctx) -> dict:
    ctx.plan.manifest.save(ctx.path / "manifest.json")
    return {"n_frames": len(ctx.plan.manifest.frame_ids), "fingerprint": ctx.plan.manifest.fingerprint}


# ------------------------------------------------------------------------------------------------ depth
def _depth_settings(cfg: C.ExperimentConfig, m):
    from pipeline.stages.depth.identity import DepthSettings

    digest = None
    if cfg.depth.provider == "midas":
        digest = file_digest(cfg.depth.weights)
    elif cfg.depth.provider == "transformers":  # a folder: the digest of its weight files (stages/depth/hf.py)
        from pipeline.stages.depth.hf import folder_identity

        digest = folder_identity(cfg.depth.weights)["weights_sha256"]
    return DepthSettings.resolve(cfg.depth, m, digest)


def _depth_key(s, env: KeyEnv) -> KeyParts:
    from pipeline.data import reads
    from pipeline.store.artifacts import artifact_key

    # depth reads the frames only: its upstream is the identity of the frames (the manifest key of schema 1,
    # before annotations and splits entered the manifest's key), so editing annotations never reruns MiDaS and
    # caches built before that change keep their keys.
    m = env.manifest
    frames_key = artifact_key("manifest", env.settings["manifest"], {}, reads.frames_identity(m))
    return KeyParts(s.identity.key_config, {"manifest": frames_key}, s.identity.fingerprint)


def _run_depth(ctx) -> bool:
    from pipeline.stages.depth.stage import run_managed

    return run_managed(ctx)


def _depth_progress(path: Path) -> str:
    from pipeline.depth_cache import progress

    done, total = progress(path)
    return f"frames {done}/{total}"


def _depth_integrity(path: Path, deep: bool) -> list:
    from pipeline.depth_cache import damage

    return damage(path, deep=deep)


def _depth_repair(path: Path, damaged: list) -> None:
    from pipeline.depth_cache import forget_damaged

    forget_damaged(path, [d["file"] for d in damaged])


def _depth_notes(record: dict) -> Optional[str]:
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


# ------------------------------------------------------------------------------------------------ teach, distill
def _train_settings(section: str) -> Callable[[C.ExperimentConfig, Any], C.TrainConfig]:
    def settings(cfg: C.ExperimentConfig, m) -> C.TrainConfig:
        """The section with ``hflip`` resolved (None = what the dataset manifest says AutoLink does)."""
        sec = getattr(cfg, section)
        return dataclasses.replace(sec, hflip=m.hflip if sec.hflip is None else sec.hflip)

    return settings


# Training fields added after artifacts existed, at the value that was the only behaviour before them: left out of
# the key there, so models trained before keep their keys (init and keypoint_weight: distill's own, below).
_TRAIN_FIELDS_ADDED = (("deterministic", False), ("rerun", 0), ("adapter", False))


def _train_config(s: C.TrainConfig) -> dict:
    sem = C.semantic_dict(s)
    if s.recon_loss == "perceptual":
        sem["vgg_sha256"] = file_digest(s.vgg_weights) if s.vgg_weights else "torchvision-default"
    for name, before in _TRAIN_FIELDS_ADDED:
        if name in sem and sem[name] == before:
            del sem[name]
    if sem["model"].get("extra_blocks") == 0:
        del sem["model"]["extra_blocks"]
    return sem


def degrade_settings(depth_settings) -> Optional[dict]:
    """depth.degrade as the teacher applies it, or None when it leaves the depth as it is (the default)."""
    d = getattr(getattr(depth_settings, "config", None), "degrade", None)
    if d is None or d == C.DegradeConfig():
        return None
    return dataclasses.asdict(d)


def _masked(env: KeyEnv, fingerprint: dict, part: str) -> dict:
    # human36m_wobg: every model input is multiplied by its frame's mask, so the masks' content is read
    if env.manifest.apply_masks:
        fingerprint[part] = env.manifest.mask_fingerprint
    return fingerprint


def _teach_key(s: C.TrainConfig, env: KeyEnv) -> KeyParts:
    from pipeline.data import reads

    sem = _train_config(s)
    degrade = degrade_settings(env.settings.get("depth"))
    if degrade is not None:  # the teacher reads worse depth than the cache holds (docs/studies.md)
        sem["depth_degrade"] = degrade
    return KeyParts(sem, env.upstream(TEACH.upstream),
                    _masked(env, reads.teach_fingerprint(env.manifest, env.synthetic), "masks"))


def _distill_key(s: C.TrainConfig, env: KeyEnv) -> KeyParts:
    from pipeline.data import reads

    sem = _train_config(s)
    # fields added later, at the value that was the only behaviour before them: students built then keep keys
    for name, before in (("init", "scratch"), ("keypoint_weight", 0.0)):
        if sem.get(name) == before:
            del sem[name]
    return KeyParts(sem, env.upstream(DISTILL.upstream),
                    _masked(env, reads.distill_fingerprint(env.manifest), "masks"))


def _train_progress(path: Path) -> str:
    from pipeline.stages.common import train_progress

    done, total = train_progress(path)
    return f"step {done}/{total}"


def _train_repair(path: Path, damaged: list) -> None:
    from pipeline.stages.common import repair_training

    repair_training(path, [d["file"] for d in damaged])


def _run_teach(ctx) -> dict:
    from pipeline.stages import teach

    return teach.run(ctx)


def _run_distill(ctx) -> dict:
    from pipeline.stages import distill

    return distill.run(ctx)


def baseline_config(cfg: C.ExperimentConfig) -> C.ExperimentConfig:
    """``cfg`` with gamma = 0: plain AutoLink on RGB through the distill stage, sharing depth and teach
    (the same key a ``--set distill.gamma=0`` run has; ``init`` scratch, no keypoint term and no adapter, as a
    baseline must not learn from the depth teacher)."""
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, gamma=0.0, init="scratch",
                                                                        keypoint_weight=0.0, adapter=False),
                               eval=dataclasses.replace(cfg.eval, baseline=False))


# ------------------------------------------------------------------------------------------------ eval
def _eval_settings(cfg: C.ExperimentConfig, m) -> C.EvalConfig:
    """eval's section with ``protocol: auto`` resolved to the manifest's protocol."""
    e = cfg.eval
    return dataclasses.replace(e, protocol=m.protocol) if e.protocol == "auto" else e


def _eval_key(s: C.EvalConfig, env: KeyEnv) -> KeyParts:
    from pipeline.data import reads

    sem = C.semantic_dict(s)
    if s.flip_pairs == "dataset":  # eval reads the pairs from ROOT/dataset.yaml: key them
        sem["left_right_pairs"] = env.manifest.left_right_pairs
    return KeyParts(sem, env.upstream(EVAL.upstream),
                    _masked(env, reads.eval_fingerprint(env.manifest, env.synthetic), "masks_applied"))


def _run_eval(ctx) -> dict:
    from pipeline.stages import evaluate

    return evaluate.run(ctx)


# ------------------------------------------------------------------------------------------------ the registry
MANIFEST = Stage(name="manifest", schema=1, upstream=(), section="data", settings=_manifest_description,
                 key=_manifest_key, run=_run_manifest, followers_join=False, outputs=("manifest.json",))
# manifest 1: its key is also the frames identity that depth's key hangs on, so bumping it rebuilds every depth
# cache; manifest keys changed without a bump when annotations and splits entered them (the fingerprint became
# a dict of parts, so no old key can be met again).
DEPTH = Stage(
    name="depth", schema=1, upstream=("manifest",), section="depth", settings=_depth_settings, key=_depth_key,
    run=_run_depth, managed=True, progress=_depth_progress, notes=_depth_notes, outputs=("layout.json", "index.json"),
    integrity=_depth_integrity, repair=_depth_repair,
    help="""Stage 1: MiDaS 3.1 (or imported depth files) over every frame into the HDF5 depth cache.

    Resumable after any crash (finished shards are kept), shardable across machines with
    --shard i/n and across GPUs with `torchrun --nproc-per-node N dkp-pipeline depth ...`.""")
# teach, distill, eval 2: their keys cover the splits, annotations and frames they read (issue 13).
TEACH = Stage(
    name="teach", schema=2, upstream=("depth",), section="teach", settings=_train_settings("teach"),
    key=_teach_key, run=_run_teach, progress=_train_progress, side_by_side=True,
    outputs=("model.pt", "metrics.jsonl"), repair=_train_repair,
    help="""Stage 2: train the AutoLink teacher on the cached depth maps (resumes from its last checkpoint).""")
DISTILL = Stage(
    name="distill", schema=2, upstream=("teach", "depth"), section="distill", settings=_train_settings("distill"),
    key=_distill_key, run=_run_distill, progress=_train_progress, side_by_side=True,
    outputs=("model.pt", "metrics.jsonl"), repair=_train_repair,
    help="""Stage 3: train the RGB student with the frozen teacher: recon + gamma * (1 - cos).""")
EVAL = Stage(  # 2: the floor, ratios and the optional baseline in metrics.json; the GT/splits it reads in the key
    name="eval", schema=2, upstream=("distill", "teach", "depth", "baseline"), section="eval",
    settings=_eval_settings, key=_eval_key, run=_run_eval, followers_join=False, outputs=("metrics.json",),
    help="""Score the student (and teacher, baseline) with the dataset's protocol: metrics.json + pictures.""")

STAGES: tuple[Stage, ...] = (MANIFEST, DEPTH, TEACH, DISTILL, EVAL)

# With eval.baseline, a second distill artifact (gamma = 0) is built before eval, which scores it beside the student.
ENTRIES: tuple[Entry, ...] = (
    Entry(name="baseline", stage="distill", after="distill", when=lambda cfg: cfg.eval.baseline,
          config=baseline_config),
)

SCHEMA_VERSIONS: dict[str, int] = {s.name: s.schema for s in STAGES}
_BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    """The registered stage ``name`` (KeyError naming the valid ones)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; registered: {', '.join(_BY_NAME)}") from None


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def plan_entries(cfg: C.ExperimentConfig) -> list[tuple[str, Stage, C.ExperimentConfig]]:
    """(entry name, stage, config it runs with) of every plan entry of ``cfg``, in build order."""
    out = []
    for s in STAGES:
        out.append((s.name, s, cfg))
        out += [(e.name, stage(e.stage), e.config(cfg)) for e in ENTRIES if e.after == s.name and e.when(cfg)]
    return out
