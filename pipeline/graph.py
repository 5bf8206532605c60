"""The stage graph: keys of every stage for a config, and why each is fresh, stale or missing.

manifest -> depth -> teach -> distill -> eval; with ``eval.baseline`` a second distill artifact, the
gamma = 0 RGB-only baseline ("baseline": the same key a ``--set distill.gamma=0`` run has), is built
before eval, which scores it beside the student. Which entries there are, what each key hashes and how a
stage runs is declared once, in each stage's folder (the tuple in :mod:`pipeline.stages.registry`); this module
walks it. Computing the keys needs only the manifest (whose frame
fingerprints are memoised by inode/size/mtime) and the digests of weight files, so `status` is cheap.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline import config as C
from pipeline.store.artifacts import Store, artifact_key, key_inputs
from pipeline.stages import registry
from pipeline.stages.changes import explain_change
from pipeline.stages.declaration import KeyEnv, Stage


@dataclass
class StagePlan:
    stage: str  # the stage kind: its registry entry, schema version and store directory
    key: str
    inputs: dict
    config: dict  # resolved config section saved beside the artifact (semantic and not)
    settings: Any = None  # the typed settings the stage runs with (registry Stage.settings)
    state: str = "missing"  # fresh | damaged | stale | missing | in_progress
    why: list[str] = field(default_factory=list)
    damage: list[dict] = field(default_factory=list)  # damaged: [{"file": relative path, "problem": ...}]
    progress: Optional[str] = None
    path: Optional[Path] = None
    # The config this entry runs with when it is not the plan's (the baseline: distill.gamma = 0).
    cfg: Optional[C.ExperimentConfig] = None


@dataclass
class Plan:
    cfg: C.ExperimentConfig
    store: Store
    stages: dict[str, StagePlan]
    manifest: Any  # pipeline.data.manifest.Manifest
    warnings: list[str] = field(default_factory=list)  # about the data: printed by status and run
    built: list[str] = field(default_factory=list)  # the entries `run` built (or built its part of) with this plan

    def __iter__(self):
        return iter(self.stages.values())




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



def build_plan(cfg: C.ExperimentConfig, store: Store, *, progress: bool = True, manifest=None,
               verify: bool = False) -> Plan:
    """Every entry's key and state. A published artifact is fresh only if its files are all there with their
    recorded sizes (a stat each); ``verify`` also re-hashes them (depth: every shard and frame checksum)."""
    from pipeline.data.build import build_manifest_once

    if manifest is None and not Path(cfg.data.root).is_dir():
        from pipeline.errors import ManifestError

        if cfg.data.manifest == "synthetic":
            raise ManifestError(f"the synthetic dataset is not generated yet at {cfg.data.root}: "
                                f"`dkp-pipeline run {cfg.name}` generates it with the preset's data.synth_* settings")
        raise ManifestError(f"dataset {cfg.data.manifest}: root {cfg.data.root} is not a directory; point the "
                            f"config at it with --set data.root=/path/to/{cfg.data.manifest} (see docs/datasets.md)")
    m = manifest if manifest is not None else build_manifest_once(cfg.data.manifest, cfg.data.root,
                                                                  store_root=store.root, progress=progress,
                                                                  frame_stride=cfg.data.frame_stride)
    stages: dict[str, StagePlan] = {}
    from pipeline.data import reads

    synthetic = reads.synthetic_block(m.root)
    keys: dict[str, str] = {}
    settings: dict[str, Any] = {}
    for entry, stage, entry_cfg in registry.plan_entries(cfg):
        s = stage.settings(entry_cfg, m)
        parts = stage.key(s, KeyEnv(manifest=m, synthetic=synthetic, keys=keys, settings=settings))
        key = artifact_key(stage.name, parts.config, parts.upstream, parts.fingerprint, schema=stage.schema)
        stages[entry] = StagePlan(stage.name, key, key_inputs(stage.name, parts.config, parts.upstream,
                                                              parts.fingerprint, schema=stage.schema),
                                  C.to_dict(getattr(entry_cfg, stage.section)), settings=s,
                                  cfg=entry_cfg if entry_cfg is not cfg else None)
        keys[entry], settings[entry] = key, s

    # states and reasons
    last = store.last_built(cfg.name)
    old_manifest = _old_manifest(store, last.get("manifest"), stages["manifest"].key)
    for name, sp in stages.items():
        stage = registry.stage(sp.stage)
        st = store.state(sp.stage, sp.key, verify=verify, outputs=stage.outputs, check=stage.integrity)
        sp.path = st.path
        if st.state == "damaged":
            sp.state, sp.damage = "damaged", st.damage
            sp.why = [f"{d['file']} {d['problem']}" for d in st.damage[:5]]
            if len(st.damage) > 5:
                sp.why.append(f"and {len(st.damage) - 5} more damaged file(s)")
            sp.why.append("`run --verify` rebuilds it" if verify else "`run` rebuilds it")  # what found it
        elif st.state == "fresh":
            sp.state = "fresh"
            if stage.notes is not None:
                sp.progress = stage.notes(st.record or {})
        elif st.state == "in_progress":
            sp.state = "in_progress"
            sp.progress = progress_of(stage, st.path)
            if st.locked_by:
                sp.why.append(st.locked_by.get("note")
                              or f"being written by pid {st.locked_by.get('pid')} on {st.locked_by.get('host')}")
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


def progress_of(stage: Stage, path: Path) -> Optional[str]:
    """'frames 1024/6000' or 'step 300/20001' for an interrupted artifact, read from its files (None: unknown)."""
    if stage.progress is None:
        return None
    try:
        return stage.progress(path)
    except Exception:
        return None


def plan_as_json(plan: Plan) -> list[dict]:
    """One dict per stage (the plan's data warnings go to stderr with `status --json`, keeping stdout a list)."""
    return [
        {"stage": name, "kind": s.stage, "key": s.key, "state": s.state, "why": s.why, "progress": s.progress,
         "path": str(s.path) if s.path else None, "damaged_files": [d["file"] for d in s.damage]}
        for name, s in plan.stages.items()
    ]


def dumps(plan: Plan) -> str:
    return json.dumps(plan_as_json(plan), indent=2)


def print_plan(plan, console, title: str = "") -> None:
    """The plan as a table: stage, state (coloured), key prefix, why stale / progress."""
    from rich.table import Table

    colours = {"fresh": "green", "stale": "yellow", "missing": "red", "in_progress": "cyan", "damaged": "magenta"}
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
