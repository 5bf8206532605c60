"""The stage graph: keys of every stage for a config, and why each is fresh, stale or missing.

manifest -> depth -> teach -> distill -> eval; with ``eval.baseline`` a second distill artifact, the
gamma = 0 RGB-only baseline ("baseline": the same key a ``--set distill.gamma=0`` run has), is built
before eval, which scores it beside the student. Computing the keys needs only the manifest (whose frame
fingerprints are memoised by inode/size/mtime) and the digests of weight files, so `status` is cheap.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline import config as C
from pipeline.store.artifacts import Store, artifact_key, key_inputs
from pipeline.data.images import DEPTH_FILE_RULE

STAGES = ("manifest", "depth", "teach", "distill", "eval")
# Plan entries that are another artifact of an existing stage kind: entry name -> stage kind.
EXTRA_ENTRIES = {"baseline": "distill"}


@dataclass
class StagePlan:
    stage: str  # the stage kind: its module, schema version and store directory
    key: str
    inputs: dict
    config: dict  # resolved config section saved beside the artifact (semantic and not)
    state: str = "missing"  # fresh | stale | missing | in_progress
    why: list[str] = field(default_factory=list)
    progress: Optional[str] = None
    path: Optional[Path] = None
    # The config this entry runs with when it is not the plan's (the baseline: distill.gamma = 0).
    cfg: Optional[C.ExperimentConfig] = None


def baseline_config(cfg: C.ExperimentConfig) -> C.ExperimentConfig:
    """``cfg`` with gamma = 0: plain AutoLink on RGB through the distill stage, sharing depth and teach."""
    import dataclasses

    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, gamma=0.0),
                               eval=dataclasses.replace(cfg.eval, baseline=False))


@dataclass
class Plan:
    cfg: C.ExperimentConfig
    store: Store
    stages: dict[str, StagePlan]
    manifest: Any  # pipeline.manifest.Manifest
    warnings: list[str] = field(default_factory=list)  # about the data: printed by status and run

    def __iter__(self):
        return iter(self.stages.values())


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as {"a.b.c": leaf}; lists are leaves."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def explain_change(stage: str, old: dict, new: dict, data=None) -> list[str]:
    """Human reasons why the inputs of a stage differ from those it was last built with.

    ``data`` = (manifest the experiment last built or None, current manifest, dataset.yaml synthetic block):
    with it, a changed fingerprint part is named with counts ("splits changed: 2 frames moved ...")."""
    why: list[str] = []
    if old.get("schema") != new.get("schema"):
        why.append(f"stage schema version changed ({old.get('schema')} -> {new.get('schema')})")
    of, nf = flatten(old.get("config", {})), flatten(new.get("config", {}))
    for k in sorted(set(of) | set(nf)):
        if of.get(k, "<absent>") != nf.get(k, "<absent>"):
            why.append(f"config field {stage}.{k} changed ({of.get(k, '<absent>')!r} -> {nf.get(k, '<absent>')!r})")
    ou, nu = old.get("upstream", {}), new.get("upstream", {})
    for k in sorted(set(ou) | set(nu)):
        if ou.get(k) != nu.get(k):
            label = "dataset manifest" if k == "manifest" else f"{k}"
            why.append(f"upstream {label} changed ({str(ou.get(k))[:12]} -> {str(nu.get(k))[:12]})")
    ofp, nfp = old.get("fingerprint"), new.get("fingerprint")
    if ofp != nfp:
        if isinstance(ofp, dict) and isinstance(nfp, dict):
            from pipeline.data.reads import describe

            old_m, new_m, synthetic = data if data is not None else (None, None, None)
            for part in sorted(set(ofp) | set(nfp)):
                if ofp.get(part) == nfp.get(part):
                    continue
                if part == "frames" and stage == "manifest":
                    why.append(frames_changed(old_m, new_m))
                else:
                    why.append(describe(stage, part, ofp.get(part), old_m, new_m, synthetic))
        elif stage == "manifest":
            why.append(frames_changed(*(data or (None, None))[:2]))
        else:
            why.append("input fingerprint changed")
    return why or ["inputs differ"]


def _old_manifest(store: Store, key: Optional[str], current_key: str):
    """The manifest this experiment last built (for counting what changed), or None."""
    if not key or key == current_key:
        return None
    from pipeline.errors import DkpError
    from pipeline.data.manifest import Manifest

    try:
        return Manifest.load(store.path("manifest", key) / "manifest.json")
    except (DkpError, OSError, ValueError):
        return None


def frames_changed(old_m, new_m) -> str:
    """'frames changed: 1 added, 2 modified' between two manifests (matched by frame id)."""
    if old_m is None or new_m is None:  # the old manifest is gone or unreadable
        return "frames changed"
    a = dict(zip(old_m.frame_ids, old_m.fingerprints))
    b = dict(zip(new_m.frame_ids, new_m.fingerprints))
    added = len(set(b) - set(a))
    removed = len(set(a) - set(b))
    modified = sum(1 for k in set(a) & set(b) if a[k] != b[k])
    parts = [f"{n} {w}" for n, w in ((added, "added"), (removed, "removed"), (modified, "modified")) if n]
    return "frames changed: " + (", ".join(parts) if parts else "order changed")


def file_digest(path: Optional[str]) -> Optional[str]:
    """sha256 of a weights file, memoised by (inode, size, mtime) like frame fingerprints."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        return f"missing:{p}"
    from pipeline.store.fingerprint import sha256_file_memo

    return sha256_file_memo(p)


def build_plan(cfg: C.ExperimentConfig, store: Store, *, progress: bool = True, manifest=None) -> Plan:
    from pipeline.data.build import build_manifest

    if manifest is None and not Path(cfg.data.root).is_dir():
        from pipeline.errors import ManifestError

        if cfg.data.manifest == "synthetic":
            raise ManifestError(f"the synthetic dataset is not generated yet at {cfg.data.root}: "
                                f"`dkp-pipeline run {cfg.name}` generates it with the preset's data.synth_* settings")
        raise ManifestError(f"dataset {cfg.data.manifest}: root {cfg.data.root} is not a directory; point the "
                            f"config at it with --set data.root=/path/to/{cfg.data.manifest} (see docs/datasets.md)")
    m = manifest if manifest is not None else build_manifest(cfg.data.manifest, cfg.data.root, progress=progress)
    stages: dict[str, StagePlan] = {}

    def add(stage: str, semantic: dict, upstream: dict, fingerprint: Optional[str], resolved: dict, *,
            entry: Optional[str] = None, entry_cfg: Optional[C.ExperimentConfig] = None) -> StagePlan:
        key = artifact_key(stage, semantic, upstream, fingerprint)
        sp = StagePlan(stage, key, key_inputs(stage, semantic, upstream, fingerprint), resolved, cfg=entry_cfg)
        stages[entry or stage] = sp
        return sp

    from pipeline.data import reads

    synthetic = reads.synthetic_block(m.root)
    mdesc = {"dataset": cfg.data.manifest, "description_sha256": m.description_sha256}
    add("manifest", mdesc, {}, reads.manifest_fingerprint(m), C.to_dict(cfg.data))
    # depth reads the frames only: its upstream is the identity of the frames (the manifest key of schema
    # 1, before annotations and splits entered the manifest's key), so editing annotations never reruns MiDaS
    # and caches built before that change keep their keys.
    frames_key = artifact_key("manifest", mdesc, {}, reads.frames_identity(m))

    d_sem = C.semantic_dict(cfg.depth)
    if cfg.depth.provider != "midas" or cfg.depth.preprocess == "cpu":
        d_sem.pop("preprocess")  # the run.py-identical default: keys from before the option stay valid
    if cfg.depth.provider == "midas":
        d_sem["weights_sha256"] = file_digest(cfg.depth.weights)
        d_fp = reads.frames_identity(m)
    else:
        d_sem.pop("model_type", None)
        d_sem.pop("precision", None)
        d_sem["depth_options"] = m.depth_options
        d_sem["decode"] = DEPTH_FILE_RULE
        d_fp = m.depth_fingerprint
    add("depth", d_sem, {"manifest": frames_key}, d_fp, C.to_dict(cfg.depth))

    def train_sem(section: C.TrainConfig) -> dict:
        s = C.semantic_dict(section)
        s["hflip"] = m.hflip if section.hflip is None else section.hflip
        if section.recon_loss == "perceptual":
            s["vgg_sha256"] = file_digest(section.vgg_weights) if section.vgg_weights else "torchvision-default"
        return s

    teach_fp, distill_fp = reads.teach_fingerprint(m, synthetic), reads.distill_fingerprint(m)
    e_fp = reads.eval_fingerprint(m, synthetic)
    if m.apply_masks:
        # human36m_wobg: every model input is multiplied by its frame's mask, so the masks' content is read
        teach_fp["masks"] = distill_fp["masks"] = e_fp["masks_applied"] = m.mask_fingerprint
    add("teach", train_sem(cfg.teach), {"depth": stages["depth"].key}, teach_fp, C.to_dict(cfg.teach))
    distill_up = {"teach": stages["teach"].key, "depth": stages["depth"].key}
    add("distill", train_sem(cfg.distill), distill_up, distill_fp, C.to_dict(cfg.distill))
    eval_up = {"distill": stages["distill"].key, "teach": stages["teach"].key, "depth": stages["depth"].key}
    if cfg.eval.baseline:
        bcfg = baseline_config(cfg)
        eval_up["baseline"] = add("distill", train_sem(bcfg.distill), distill_up, distill_fp, C.to_dict(bcfg.distill),
                                  entry="baseline", entry_cfg=bcfg).key
    e_sem = C.semantic_dict(cfg.eval)
    if e_sem.get("protocol") == "auto":
        e_sem["protocol"] = m.protocol
    if e_sem.get("flip_pairs") == "dataset":  # eval reads the pairs from ROOT/dataset.yaml: key them
        e_sem["left_right_pairs"] = m.left_right_pairs
    add("eval", e_sem, eval_up, e_fp, C.to_dict(cfg.eval))

    # states and reasons
    last = store.last_built(cfg.name)
    old_manifest = _old_manifest(store, last.get("manifest"), stages["manifest"].key)
    for name, sp in stages.items():
        st = store.state(sp.stage, sp.key)
        sp.path = st.path
        if st.state == "fresh":
            sp.state = "fresh"
            if sp.stage == "depth":
                sp.progress = depth_notes(st.record or {})
        elif st.state == "in_progress":
            sp.state = "in_progress"
            sp.progress = progress_of(sp.stage, st.path)
            if st.locked_by:
                sp.why.append(f"being written by pid {st.locked_by.get('pid')} on {st.locked_by.get('host')}")
            else:
                sp.why.append("interrupted; will resume")
        else:
            prev_key = last.get(name)
            prev = store.record(sp.stage, prev_key) if prev_key else None
            if prev is not None and prev_key != sp.key:
                sp.state = "stale"
                sp.why = explain_change(sp.stage, prev.get("inputs", {}), sp.inputs, data=(old_manifest, m, synthetic))
            else:
                sp.state = "missing"
    from pipeline.data.images import size_warnings

    model_size = max(cfg.teach.model.image_size, cfg.distill.model.image_size)
    return Plan(cfg=cfg, store=store, stages=stages, manifest=m,
                warnings=size_warnings(m.sizes, m.frame_ids, model_size))


def preflight(plan: Plan, stages, console=None) -> None:
    """Print the plan's warnings about the data; refuse, before anything is built, what would fail later: a
    store that cannot be written, an eval without ground truth (found only after two models trained, otherwise)."""
    from pipeline.errors import DkpError
    from pipeline.data.reads import eval_data_problem

    if console is not None:
        print_warnings(plan, console)
    todo = [s for s in stages if plan.stages[s].state != "fresh"]
    if not todo:
        return
    plan.store.check_writable(f"{', '.join(todo)} need{'s' * (len(todo) == 1)} building")
    if "eval" in todo:
        problem = eval_data_problem(plan.manifest)
        if problem:
            raise DkpError(problem)


def depth_notes(record: dict) -> Optional[str]:
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


def progress_of(stage: str, path: Path) -> Optional[str]:
    """'frames 1024/6000' or 'step 300/20001' for an interrupted artifact, read from its files."""
    try:
        if stage == "depth":
            from pipeline.depth_cache import progress

            done, total = progress(path)
            return f"frames {done}/{total}"
        if stage in ("teach", "distill"):
            from pipeline.stages.common import train_progress

            done, total = train_progress(path)
            return f"step {done}/{total}"
    except Exception:
        return None
    return None


def digest_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def plan_as_json(plan: Plan) -> list[dict]:
    """One dict per stage (the plan's data warnings go to stderr with `status --json`, keeping stdout a list)."""
    return [
        {"stage": name, "kind": s.stage, "key": s.key, "state": s.state, "why": s.why, "progress": s.progress,
         "path": str(s.path) if s.path else None}
        for name, s in plan.stages.items()
    ]


def dumps(plan: Plan) -> str:
    return json.dumps(plan_as_json(plan), indent=2)


def print_plan(plan, console, title: str = "") -> None:
    """The plan as a table: stage, state (coloured), key prefix, why stale / progress."""
    from rich.table import Table

    colours = {"fresh": "green", "stale": "yellow", "missing": "red", "in_progress": "cyan"}
    t = Table(title=title or f"experiment {plan.cfg.name!r} · store {plan.store.root}", title_justify="left")
    t.add_column("stage")
    t.add_column("state")
    t.add_column("key")
    t.add_column("why / progress", overflow="fold")
    for name, s in plan.stages.items():
        detail = "; ".join(([s.progress] if s.progress else []) + s.why)
        t.add_row(name if name == s.stage else f"{name} ({s.stage})", f"[{colours.get(s.state, 'white')}]{s.state}[/]", s.key[:16], detail)
    console.print(t)
    print_warnings(plan, console)


def print_warnings(plan, console) -> None:
    from rich.markup import escape

    for w in plan.warnings:
        console.print("[yellow]warning:[/] " + escape(w), markup=True, soft_wrap=True)
