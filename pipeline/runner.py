"""Walk the stage graph: reuse fresh artifacts, resume interrupted ones, build the rest.

Each stage of :mod:`pipeline.stages.registry` has a ``run(ctx: StageContext) -> dict`` which writes its files
into ``ctx.path`` (resuming from whatever an interrupted run left there) and returns extra fields for
artifact.json; publishing (artifact.json, then COMPLETE) is done here, once, for every stage but the
``managed`` one (depth), which publishes itself when its last part is done.

Issue 24: a damaged artifact (a file of its record missing, truncated, or with ``--verify`` changed) is taken
back to an interrupted one (:func:`prepare_rebuild`) and resumed, so only what the damage needs is redone; a
write the file system refuses (full, quota, read-only, I/O error) ends the stage with one
:class:`~pipeline.errors.StorageError` naming the artifact, and this process's temporaries are removed.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline import config as C
from pipeline import jobs as jobs_mod
from pipeline.store.artifacts import COMPLETE, LOCK, Lock, Store, damage_text
from pipeline.store.io import is_storage_error, remove_temporaries_of, storage_cause, storage_error
from pipeline.errors import DkpError
from pipeline.graph import Plan, StagePlan, build_plan, preflight
from pipeline.stages import registry


@dataclass
class StageContext:
    cfg: C.ExperimentConfig
    plan: Plan
    stage: StagePlan
    store: Store
    path: Path  # the artifact directory being written
    console: Any
    options: dict = field(default_factory=dict)

    @property
    def settings(self) -> Any:
        """The typed settings this stage runs with (its registry ``settings``: e.g. hflip and protocol resolved)."""
        return self.stage.settings

    def upstream_path(self, entry: str) -> Path:
        """Directory of the plan entry ``entry`` (a stage name, or "baseline")."""
        sp = self.plan.stages[entry]
        return self.store.path(sp.stage, sp.key)


def synthetic_data_pending(cfg: C.ExperimentConfig) -> bool:
    """True when ``cfg`` uses the built-in dataset and it is not generated yet (no plan can be built before)."""
    return cfg.data.manifest == "synthetic" and not (Path(cfg.data.root) / "dataset.yaml").exists()


def ensure_synthetic_data(cfg: C.ExperimentConfig, console) -> None:
    """The built-in dataset is generated on first use, so `run synthetic` works on a fresh clone; data already
    at ``data.root`` must have been generated with the config's ``data.synth_*`` values (else a named error),
    so a changed preset never trains on yesterday's frames."""
    root = Path(cfg.data.root)
    if cfg.data.manifest != "synthetic":
        return
    if _follower_rank():
        # torchrun: rank 0 writes the dataset (dataset.yaml last); the others wait for it.
        deadline = time.time() + 1800
        while not (root / "dataset.yaml").exists():
            if time.time() > deadline:
                raise DkpError(f"rank {os.environ.get('RANK')}: gave up waiting for rank 0 to generate {root}")
            time.sleep(0.5)
        return
    from pipeline.data.synth import write_synthetic

    pending = synthetic_data_pending(cfg)
    if pending:
        console.print(f"generating the synthetic dataset: {cfg.data.synth_frames} frames -> {root}")
    try:
        write_synthetic(root, n=cfg.data.synth_frames, seed=cfg.data.synth_seed, image_size=cfg.data.synth_image_size,
                        clip_length=cfg.data.synth_clip_length, progress=pending, family=cfg.data.synth_family)
    except OSError as e:
        if not is_storage_error(e):
            raise
        raise storage_error(e, what="the built-in synthetic dataset, generated on first use") from None
    except DkpError as e:
        raise type(e)(f"{e} (data.root = {root}; the config's data.synth_* values must match the data there)") from None


def run_pipeline(cfg: C.ExperimentConfig, store_dir: Optional[str], *, dry_run: bool = False, until: str = "eval",
                 only: Optional[str] = None, console=None, stage_options: Optional[dict] = None,
                 jobs: Optional[int] = None, verify: bool = False) -> Plan:
    """Build the plan's stale entries up to ``until`` (or only ``only``). Entries that do not read each other
    (the student and the baseline) are built side by side, ``jobs`` processes at once (None: one per entry on
    a CPU with the threads to spare, :func:`pipeline.jobs.choose_jobs`; 1: one after the other). Damaged
    artifacts are rebuilt; ``verify`` finds those whose files changed without changing size (checksums)."""
    from rich.console import Console

    console = console or Console()
    store = Store.from_option(store_dir)
    if dry_run:
        console.print("[bold]resolved config[/]", markup=True)
        console.print(C.to_yaml(cfg), markup=False, highlight=False)
        if synthetic_data_pending(cfg):
            console.print(f"(synthetic data not generated yet at {cfg.data.root}: `run` would generate it first; "
                          "no plan until then)")
            return None  # type: ignore[return-value]
    else:
        ensure_synthetic_data(cfg, console)
    plan = build_plan(cfg, store, progress=not dry_run, verify=verify)
    order = list(plan.stages)  # STAGES plus extra entries (the baseline) in build order
    wanted = order[: order.index(until) + 1] if only is None else [only]
    if dry_run:
        from pipeline.graph import print_plan

        print_plan(plan, console)
        todo = [s for s in wanted if plan.stages[s].state != "fresh"]
        console.print("would build: " + (", ".join(todo) if todo else "nothing (all fresh)"))
        return plan

    if only is not None:
        for up in order[: order.index(only)]:
            if plan.stages[up].state != "fresh" and up != "manifest":
                damage = f" ({damage_text(plan.stages[up].damage)})" if plan.stages[up].damage else ""
                raise DkpError(
                    f"stage {only} needs {up}, which is {plan.stages[up].state}{damage}; build it first with "
                    f"`dkp-pipeline run {cfg.name} --until {up}` (or `dkp-pipeline {up} ...`)"
                )

    walk = wanted if only is None else ["manifest", only]
    preflight(plan, walk, console)
    built = []
    i = 0
    while i < len(walk):
        name = walk[i]
        sp = plan.stages[name]
        if sp.state == "fresh":
            if name in wanted:
                console.print(f"[green]✓[/] {name:8s} fresh  {sp.key[:16]}  (reused)", markup=True)
            if not _follower_rank():
                store.remember(cfg.name, name, sp.key)
            i += 1
            continue
        group = jobs_mod.independent_group(plan, walk, i)
        n_jobs = jobs_mod.choose_jobs(plan, group, jobs)
        for entry in group:
            if plan.stages[entry].state == "damaged" and not _follower_rank():
                prepare_rebuild(plan, entry, store)
        for entry in group:
            esp = plan.stages[entry]
            reason = "; ".join(([esp.progress] if esp.progress else []) + esp.why) or esp.state
            console.print(f"[yellow]→[/] {entry:8s} {esp.state}  {esp.key[:16]}  ({reason})", markup=True)
            if n_jobs == 1:
                break
        if n_jobs > 1:
            built += jobs_mod.run_side_by_side(cfg, plan, group, store, console, stage_options or {}, n_jobs)
            i += len(group)
            continue
        t0 = time.time()
        i += 1
        if not _run_stage(registry.stage(sp.stage), sp.cfg or cfg, plan, sp, store, console, stage_options or {}):
            _sync_ranks()
            built.append(f"{name} (this process's part)")
            continue  # only this process's part was written (depth --shard / torchrun rank > 0)
        _sync_ranks()
        if _follower_rank():
            continue
        record_built(cfg, store, console, name, sp, time.time() - t0)
        built.append(name)
    if not built:
        console.print("nothing to do: every stage is fresh")
    plan.built = built
    return plan


def record_built(cfg: C.ExperimentConfig, store: Store, console, name: str, sp: StagePlan, seconds: float) -> None:
    """A plan entry was published: remember it as the experiment's, mark it fresh, say so (alone or side by side)."""
    store.remember(cfg.name, name, sp.key)
    sp.state = "fresh"
    console.print(f"[green]✓[/] {name:8s} built  {sp.key[:16]}  in {seconds:.1f}s -> {store.path(sp.stage, sp.key)}",
                  markup=True)


def _follower_rank() -> bool:
    """True in a torchrun process other than rank 0: it writes its part, rank 0 records what was built."""
    import os

    return int(os.environ.get("RANK", "0")) != 0


def _sync_ranks() -> None:
    """Under torchrun, no rank starts the next stage before rank 0 has published this one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def prepare_rebuild(plan: Plan, entry: str, store: Store) -> None:
    """Turn the damaged published artifact of ``entry`` back into an interrupted one that its stage resumes:
    under its lock, COMPLETE goes first (from then on nothing takes it for finished), then the stage's
    ``repair`` deletes what must be redone (default: the damaged files). Refused, naming the damaged file, when
    an artifact the rebuild reads is not fresh (its data is gone)."""
    sp = plan.stages[entry]
    stage = registry.stage(sp.stage)
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


def _run_stage(stage: registry.Stage, cfg, plan: Plan, sp: StagePlan, store: Store, console, options: dict) -> bool:
    """Run one stage; False when the stage wrote only this process's part and another process publishes.

    A write the file system refuses leaves as one StorageError naming this artifact; the temporary files this
    process had open in it are deleted (a killed run's are deleted by the next run, which takes its lock over)."""
    path = store.path(stage.name, sp.key)
    try:
        return _run_stage_here(stage, cfg, plan, sp, store, console, options)
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


def _run_stage_here(stage: registry.Stage, cfg, plan: Plan, sp: StagePlan, store: Store, console,
                    options: dict) -> bool:
    name = stage.name
    if stage.managed:
        # Stages with their own multi-process writing protocol (depth under torchrun / --shard).
        return stage.run(StageContext(cfg, plan, sp, store, store.path(name, sp.key), console, options)) is not False
    if _follower_rank():
        # torchrun rank > 0: trains in the same directory as rank 0 (which holds the lock, checkpoints and
        # publishes); the manifest and evaluation are rank 0's alone (the manifest is not even reported as
        # this process's part: it is written before any stage runs).
        if not stage.followers_join:
            return stage is registry.MANIFEST
        path = store.path(name, sp.key)
        path.mkdir(parents=True, exist_ok=True)
        stage.run(StageContext(cfg, plan, sp, store, path, console, options))
        return False
    path = store.path(name, sp.key)
    fresh_dir = not path.exists()
    try:
        with store.open_for_write(name, sp.key, inputs=sp.inputs, config=sp.config) as w:
            ctx = StageContext(cfg, plan, sp, store, w.path, console, options)
            extra = stage.run(ctx) or {}
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
