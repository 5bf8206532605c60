"""Walk the stage graph: reuse fresh artifacts, resume interrupted ones, build the rest (each entry through
:mod:`pipeline.execute`: lock, run, publish, record; entries that do not read each other side by side through
:mod:`pipeline.jobs`). A damaged artifact (a file of its record missing, truncated, or with ``--verify`` changed)
is taken back to an interrupted one and resumed. Also: the built-in synthetic dataset, generated on first use.
"""
from __future__ import annotations

import time

from pathlib import Path
from typing import Optional

from pipeline import config as C
from pipeline import jobs as jobs_mod
from pipeline.errors import DkpError
from pipeline.execute import prepare_rebuild, record_built, run_stage, sync_ranks
from pipeline.graph import Plan, build_plan, preflight
from pipeline.process import this_process
from pipeline.stages import registry
from pipeline.store.artifacts import Store, damage_text
from pipeline.store.io import is_storage_error, storage_error


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
    process = this_process()
    if not process.is_main:
        # torchrun: rank 0 writes the dataset (dataset.yaml last); the others wait for it.
        deadline = time.time() + 1800
        while not (root / "dataset.yaml").exists():
            if time.time() > deadline:
                raise DkpError(f"rank {process.rank}: gave up waiting for rank 0 to generate {root}")
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
    done: set[tuple[str, str]] = set()  # (stage, key) built by this run: an entry of the same artifact is fresh
    i = 0
    while i < len(walk):
        name = walk[i]
        sp = plan.stages[name]
        if (sp.stage, sp.key) in done:  # e.g. the baseline of a gamma = 0 student: the student's own artifact
            sp.state, sp.why, sp.damage, sp.progress = "fresh", [], [], None
        if sp.state == "fresh":
            if name in wanted:
                console.print(f"[green]✓[/] {name:8s} fresh  {sp.key[:16]}  (reused)", markup=True)
            if this_process().is_main:
                store.remember(cfg.name, name, sp.key)
            i += 1
            continue
        group = jobs_mod.independent_group(plan, walk, i)
        n_jobs = jobs_mod.choose_jobs(plan, group, jobs)
        for entry in group:
            if plan.stages[entry].state == "damaged" and this_process().is_main:
                prepare_rebuild(plan, entry, store, registry.stage(plan.stages[entry].stage))
        for entry in group:
            esp = plan.stages[entry]
            reason = "; ".join(([esp.progress] if esp.progress else []) + esp.why) or esp.state
            console.print(f"[yellow]→[/] {entry:8s} {esp.state}  {esp.key[:16]}  ({reason})", markup=True)
            if n_jobs == 1:
                break
        if n_jobs > 1:
            built += jobs_mod.run_side_by_side(cfg, plan, group, store, console, stage_options or {}, n_jobs)
            done |= {(plan.stages[e].stage, plan.stages[e].key) for e in group}
            i += len(group)
            continue
        t0 = time.time()
        i += 1
        done.add((sp.stage, sp.key))
        if not run_stage(registry.stage(sp.stage), sp.cfg or cfg, plan, sp, store, console, stage_options or {}):
            sync_ranks()
            built.append(f"{name} (this process's part)")
            continue  # only this process's part was written (depth --shard / torchrun rank > 0)
        sync_ranks()
        if not this_process().is_main:
            continue
        record_built(cfg, store, console, name, sp, time.time() - t0)
        built.append(name)
    if not built:
        console.print("nothing to do: every stage is fresh")
    plan.built = built
    return plan


