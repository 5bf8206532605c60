"""Jobs on a cluster through submitit (the ``slurm`` extra): `sweep --executor slurm` submits one job per run,
`depth --executor slurm --shards N` an array of N shard jobs.

Every job is the ordinary command in another process (:func:`run_job`: ``run_pipeline`` with the same config, store
and options), so what is done stays done exactly as on one machine: a re-submitted sweep skips runs whose eval is
fresh (not even submitted) and reuses shared stages; a depth shard resumes from its finished HDF5 shards. Jobs of a
sweep share upstream artifacts (the depth cache, a teacher): a job that finds one being written by another job
waits for it (:data:`LOCK_WAIT_S` between looks) and then reuses it, instead of failing.

Executors: ``slurm`` (sbatch through submitit; needs ``srun`` on PATH), ``local`` (submitit's LocalExecutor: real
processes on this machine, what the tests use). The store, the data, the job folder and this Python environment must
be on storage every node sees (docs/cli.md "Running on a cluster").
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import ConfigError, DkpError, LockError

EXECUTORS = ("slurm", "local")
LOCK_WAIT_S = 5.0  # a job waiting for another job's artifact looks again this often


@dataclass(frozen=True)
class JobOptions:
    """What each job asks the scheduler for (sbatch's --partition, --time, --gpus-per-node, --cpus-per-task)."""

    executor: str = "slurm"
    partition: Optional[str] = None
    time_min: int = 60
    gpus: int = 0
    cpus: int = 1
    mem_gb: Optional[int] = None
    folder: Optional[str] = None  # submitit's logs and pickles; default STORE/jobs
    extra: dict = field(default_factory=dict)  # other slurm_* parameters of submitit (e.g. slurm_account)


def job_options(opts: dict) -> JobOptions:
    """JobOptions from the CLI's --executor/--partition/--time/--gpus/--cpus/--mem-gb/--jobs-folder values."""
    return JobOptions(executor=opts["executor"], partition=opts.get("partition"), time_min=int(opts.get("time") or 60),
                      gpus=int(opts.get("gpus") or 0), cpus=int(opts.get("cpus") or 1), mem_gb=opts.get("mem_gb"),
                      folder=opts.get("jobs_folder"))


CLI_KEYS = ("executor", "partition", "time", "gpus", "cpus", "mem_gb", "jobs_folder", "shards")


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("--executor needs submitit: pip install -e '.[slurm]' (or pip install submitit)") from None
    return submitit


def make_executor(opts: JobOptions, store_root: Path, name: str):
    """A submitit executor for ``opts`` writing its files under ``opts.folder`` (default ``STORE/jobs``)."""
    submitit = require_submitit()
    if opts.executor not in EXECUTORS:
        raise ConfigError(f"--executor {opts.executor!r}: valid: {', '.join(EXECUTORS)}")
    folder = Path(opts.folder) if opts.folder else Path(store_root) / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        ex = submitit.AutoExecutor(folder=str(folder), cluster=opts.executor)
    except RuntimeError as e:  # no srun: not on a Slurm cluster
        raise ConfigError(f"--executor slurm: {e}; run this on a Slurm login node, or use --executor local to run "
                          "the jobs as processes here") from None
    params: dict[str, Any] = {"name": name, "timeout_min": int(opts.time_min), "cpus_per_task": int(opts.cpus),
                              "gpus_per_node": int(opts.gpus), "tasks_per_node": 1, "nodes": 1}
    if opts.mem_gb:
        params["mem_gb"] = int(opts.mem_gb)
    if opts.executor == "slurm":
        if opts.partition:
            params["slurm_partition"] = opts.partition
        params.update(opts.extra)
    ex.update_parameters(**params)
    return ex


def run_job(config: str, overrides: list[str], store: Optional[str], until: str = "eval", only: Optional[str] = None,
            stage_options: Optional[dict] = None, max_wait_s: Optional[float] = None) -> dict:
    """One job: the ordinary ``run`` (or one stage) of ``config``. Waits while an artifact it needs is being written
    by another job (a LockError), then plans again and reuses it. Returns {stage: key} of the plan."""
    from rich.console import Console

    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    cfg = load_config(config, overrides)
    console = Console(highlight=False, width=160)
    deadline = None if max_wait_s is None else time.time() + max_wait_s
    while True:
        try:
            plan = run_pipeline(cfg, store, until=until, only=only, console=console, stage_options=stage_options)
            return {name: sp.key for name, sp in plan.stages.items()}
        except LockError as e:  # another job is writing an artifact this one needs: wait, plan again, reuse it
            if deadline is not None and time.time() > deadline:
                raise
            console.print(f"waiting: {e}", markup=False, soft_wrap=True)
            time.sleep(LOCK_WAIT_S)
        except DkpError as e:
            if "is already complete" not in str(e):  # planned before another job published it: plan again
                raise
            console.print(f"another job published it meanwhile ({e}); planning again", markup=False, soft_wrap=True)


def wait_all(jobs: list, labels: list[str], console) -> list[Optional[str]]:
    """Wait for every job; return each one's error text (None: done). Says each as it ends."""
    submitit = require_submitit()
    errors: list[Optional[str]] = [None] * len(jobs)
    pending = set(range(len(jobs)))
    while pending:
        for i in sorted(pending):
            if jobs[i].done():
                pending.discard(i)
                try:
                    jobs[i].result()
                    console.print(f"job {jobs[i].job_id} ({labels[i]}): done", markup=False, soft_wrap=True)
                except (submitit.core.utils.UncompletedJobError, Exception) as e:  # the job's own traceback text
                    errors[i] = _last_error_line(str(e)) or type(e).__name__
                    console.print(f"job {jobs[i].job_id} ({labels[i]}) failed: {errors[i]} (log: "
                                  f"{jobs[i].paths.stderr})", markup=False, soft_wrap=True)
        if pending:
            time.sleep(1.0)
    return errors


def _last_error_line(text: str) -> str:
    """The exception line of a failed job's traceback (submitit wraps it between lines of dashes)."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    dashes = [i for i, ln in enumerate(lines) if ln.startswith("-----")]
    body = lines[dashes[0] + 1:dashes[-1]] if len(dashes) >= 2 else lines
    body = [ln for ln in body if ln.strip()]
    return body[-1].strip() if body else ""


def submit_sweep(config: str, overrides: tuple[str, ...], runs, cfgs, store_dir: Optional[str], opts: JobOptions,
                 console) -> None:
    """One job per run whose eval is not fresh; waits for them all. Raises DkpError naming the failed runs."""
    from pipeline.graph import build_plan
    from pipeline.runner import synthetic_data_pending
    from pipeline.store.artifacts import Store

    from pipeline.runner import ensure_synthetic_data

    store = Store.from_option(store_dir)
    for cfg in cfgs:  # generated here, once: jobs writing the same data root at once would race
        ensure_synthetic_data(cfg, console)
    todo = []
    for r, cfg in zip(runs, cfgs):
        if not synthetic_data_pending(cfg) and build_plan(cfg, store, progress=False).stages["eval"].state == "fresh":
            console.print(f"  {r.name}: fresh, not submitted", markup=False, soft_wrap=True)
            continue
        todo.append(r)
    if not todo:
        return
    ex = make_executor(opts, store.root, "dkp-sweep")
    jobs = []
    with ex.batch():  # one sbatch --array on Slurm
        for r in todo:
            jobs.append(ex.submit(run_job, config, list(overrides) + list(r.overrides), store_dir))
    for r, j in zip(todo, jobs):
        console.print(f"  {r.name}: submitted as job {j.job_id}", markup=False, soft_wrap=True)
    errors = wait_all(jobs, [r.name for r in todo], console)
    failed = [(r.name, e) for r, e in zip(todo, errors) if e]
    if failed:
        raise DkpError(f"{len(failed)} of {len(todo)} sweep jobs failed: "
                       + "; ".join(f"{n}: {e}" for n, e in failed)
                       + f". Their logs are in {Path(opts.folder) if opts.folder else store.root / 'jobs'}; what "
                         "finished is kept: fix the cause and submit the same sweep again to continue")


def submit_depth_shards(config: str, overrides: tuple[str, ...], store_dir: Optional[str], shards: int,
                        opts: JobOptions, skip_bad_frames: bool, console) -> None:
    """An array of ``shards`` jobs, each ``depth --shard i/N``; the last to finish merges and publishes (the
    depth stage's own protocol). Re-submitting resumes: a part skips its finished shards."""
    from pipeline.config import load_config
    from pipeline.graph import build_plan
    from pipeline.store.artifacts import Store

    if shards < 1:
        raise ConfigError(f"--shards {shards}: must be >= 1")
    cfg = load_config(config, overrides)
    store = Store.from_option(store_dir)
    plan = build_plan(cfg, store, progress=False)
    if plan.stages["depth"].state == "fresh":
        console.print(f"depth is fresh ({plan.stages['depth'].key[:16]}): nothing to submit", markup=False)
        return
    # the manifest artifact first, here: every shard job then plans from the same frames
    from pipeline.runner import run_pipeline

    run_pipeline(cfg, store_dir, until="manifest", console=console)
    ex = make_executor(opts, store.root, "dkp-depth")
    jobs = []
    with ex.batch():
        for i in range(shards):
            # max_wait_s=0: a part's lock can only be a previous job of the same part, alive (then this one is a
            # duplicate) or dead on another node (its lock must be removed by hand): waiting helps neither
            jobs.append(ex.submit(run_job, config, list(overrides), store_dir, "depth", "depth",
                                  {"shard": f"{i}/{shards}", "skip_bad_frames": skip_bad_frames}, 0))
    console.print(f"depth: {shards} shard jobs submitted ({', '.join(str(j.job_id) for j in jobs)})", markup=False,
                  soft_wrap=True)
    errors = wait_all(jobs, [f"shard {i}/{shards}" for i in range(shards)], console)
    if any(errors):
        raise DkpError(f"{sum(1 for e in errors if e)} of {shards} depth shard jobs failed ("
                       + "; ".join(f"shard {i}: {e}" for i, e in enumerate(errors) if e)
                       + "); finished shards are kept: submit the same command again to resume")
    state = build_plan(cfg, store, progress=False).stages["depth"]
    if state.state != "fresh":  # every part done but nobody merged (should not happen): merge here
        run_pipeline(cfg, store_dir, until="depth", only="depth", console=console)
    console.print(f"depth published: {build_plan(cfg, store, progress=False).stages['depth'].path}", markup=False,
                  soft_wrap=True)
