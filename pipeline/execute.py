"""Build one plan entry: lock its artifact directory, run its stage (resuming whatever an interrupted run left),
publish it, remember it. The one way an artifact is built, whether the runner builds it in this process
(:mod:`pipeline.runner`) or a side-by-side job builds it in a child (:mod:`pipeline.jobs`).

Each stage's ``run(ctx: StageContext) -> dict`` writes its files into ``ctx.path`` and returns extra fields for
artifact.json; publishing (artifact.json listing the files, then COMPLETE) happens here, for every stage but the
``managed`` one (depth), which publishes itself when its last part is done. A write the file system refuses (full,
quota, read-only, I/O error) ends the stage with one :class:`~pipeline.errors.StorageError` naming the artifact,
and this process's temporaries in it are removed. Issue 24: a damaged artifact is taken back to an interrupted one
(:func:`prepare_rebuild`) and resumed, so only what the damage needs is redone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import config as C
from pipeline.errors import DkpError
from pipeline.graph import Plan, StagePlan
from pipeline.process import Process, this_process
from pipeline.stages.declaration import Stage
from pipeline.store.artifacts import COMPLETE, LOCK, Lock, Store, damage_text
from pipeline.store.io import remove_temporaries_of, storage_cause, storage_error


@dataclass
class StageContext:
    """What a stage's ``run`` gets: the config it runs with, the plan, its own plan entry, the store, the directory it
    writes, the console, the command's options, and this process's place in the job."""

    cfg: C.ExperimentConfig
    plan: Plan
    stage: StagePlan
    store: Store
    path: Path  # the artifact directory being written
    console: Any
    options: dict = field(default_factory=dict)
    process: Process = field(default_factory=this_process)  # rank, local rank, world: read once, here

    @property
    def settings(self) -> Any:
        """The typed settings this stage runs with (its ``Stage.settings``: e.g. hflip and protocol resolved)."""
        return self.stage.settings

    @property
    def run_config(self) -> dict:
        """The config a training records in its checkpoints and model.pt (and checks on resume): what its key
        hashes (the semantic section), with its step count."""
        steps = getattr(self.settings, "steps", None)
        return dict(self.stage.inputs["config"]) | ({"steps": steps} if steps is not None else {})

    def upstream_path(self, entry: str) -> Path:
        """Directory of the plan entry ``entry`` (a stage name, or "baseline")."""
        sp = self.plan.stages[entry]
        return self.store.path(sp.stage, sp.key)


def record_built(cfg: C.ExperimentConfig, store: Store, console, name: str, sp: StagePlan, seconds: float) -> None:
    """A plan entry was published: remember it as the experiment's, mark it fresh, say so (alone or side by side)."""
    store.remember(cfg.name, name, sp.key)
    sp.state = "fresh"
    console.print(f"[green]✓[/] {name:8s} built  {sp.key[:16]}  in {seconds:.1f}s -> {store.path(sp.stage, sp.key)}",
                  markup=True)


def sync_ranks() -> None:
    """Under torchrun, no rank starts the next stage before rank 0 has published this one."""
    if not this_process().distributed:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def prepare_rebuild(plan: Plan, entry: str, store: Store, stage: Stage) -> None:
    """Turn the damaged published artifact of ``entry`` (of ``stage``) back into an interrupted one that its stage
    resumes: under its lock, COMPLETE goes first (from then on nothing takes it for finished), then the stage's
    ``repair`` deletes what must be redone (default: the damaged files). Refused, naming the damaged file, when
    an artifact the rebuild reads is not fresh (its data is gone)."""
    sp = plan.stages[entry]
    for up in stage.upstream:
        usp = plan.stages.get(up)
        if usp is not None and usp.state != "fresh":
            gone = f" ({damage_text(usp.damage)})" if usp.damage else ""
            raise DkpError(f"the {entry} artifact {sp.path} is damaged ({damage_text(sp.damage)}); rebuilding it reads "
                           f"the {up} artifact, which is {usp.state}{gone}; run `dkp-pipeline run {plan.cfg.name}` "
                           f"to rebuild both in order")
    path = store.path(sp.stage, sp.key)
    with Lock(path / LOCK):
        (path / COMPLETE).unlink(missing_ok=True)
        if stage.repair is not None:
            stage.repair(path, sp.damage)
        else:
            for d in sp.damage:
                if d["file"] != "artifact.json":  # rewritten when the stage resumes
                    (path / d["file"]).unlink(missing_ok=True)


def run_stage(stage: Stage, cfg, plan: Plan, sp: StagePlan, store: Store, console, options: dict) -> bool:
    """Run one stage; False when the stage wrote only this process's part and another process publishes.

    A write the file system refuses leaves as one StorageError naming this artifact; the temporary files this
    process had open in it are deleted (a killed run's are deleted by the next run, which takes its lock over)."""
    path = store.path(stage.name, sp.key)
    try:
        return _run_here(stage, cfg, plan, sp, store, console, options)
    except Exception as e:
        cause = storage_cause(e)
        if cause is None:
            raise
        try:
            remove_temporaries_of(path, os.getpid())
        except OSError:
            pass
        entry = next((n for n, s in plan.stages.items() if s is sp), stage.name)
        unnamed = cause.filename is None and getattr(cause, "filename2", None) is None  # a bare write(): say where
        raise storage_error(cause, path if unnamed else None, what="a file in this directory" if unnamed else "",
                            artifact=f"the {entry} artifact {sp.key[:16]} ({path})") from None


def _run_here(stage: Stage, cfg, plan: Plan, sp: StagePlan, store: Store, console, options: dict) -> bool:
    name = stage.name
    process = this_process()
    if stage.managed:
        # Stages with their own multi-process writing protocol (depth under torchrun / --shard).
        ctx = StageContext(cfg, plan, sp, store, store.path(name, sp.key), console, options, process)
        return stage.run(ctx) is not False
    if not process.is_main:
        # torchrun rank > 0: trains in the same directory as rank 0 (which holds the lock, checkpoints and
        # publishes); the manifest and evaluation are rank 0's alone (the manifest is not even reported as
        # this process's part: it is written before any stage runs).
        if not stage.followers_join:
            return not stage.upstream  # the manifest (no upstream): written by the plan, nothing left to do
        path = store.path(name, sp.key)
        path.mkdir(parents=True, exist_ok=True)
        stage.run(StageContext(cfg, plan, sp, store, path, console, options, process))
        return False
    path = store.path(name, sp.key)
    fresh_dir = not path.exists()
    try:
        with store.open_for_write(name, sp.key, inputs=sp.inputs, config=sp.config) as w:
            extra = stage.run(StageContext(cfg, plan, sp, store, w.path, console, options, process)) or {}
            if sp.damage:  # what this rebuild repaired, for whoever reads the record
                extra = {**extra, "rebuilt_after_damage": sp.damage}
            w.publish(**extra)
    except DkpError:
        # A stage refused before doing any work (missing VGG weights, bad option): leave no empty
        # "interrupted" artifact behind for `status` to report.
        if fresh_dir:
            _remove_if_untouched(path)
        raise
    return True


def _remove_if_untouched(path: Path) -> None:
    import shutil

    try:
        names = set(os.listdir(path))
    except FileNotFoundError:
        return
    if names <= {"artifact.json"}:
        shutil.rmtree(path, ignore_errors=True)
