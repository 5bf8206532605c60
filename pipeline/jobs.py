"""Build independent plan entries side by side, one process each.

On a CPU two small trainings in two processes of one thread each get more steps done than one process
with two threads (`bench side-by-side` on the 2-core development VM: 7.11 against 4.88 steps/s of the
synthetic preset's step, 1.46 x; docs/benchmarks.md). The runner hands over a group of entries none of which
reads another's artifact (the distilled student and the gamma = 0 baseline: both read teach and depth
only). Each entry runs in its own spawned process through :func:`pipeline.execute.run_stage` (the lock,
the resume from the last checkpoint, the publish), with ``threads // n`` torch threads, its console
output appended to ``STORE/logs/<entry>-<key16>.log``. The parent shows each entry's step (from its
metrics.jsonl) and, when one fails, re-raises its error once every entry has stopped; what the others
finished is published.

Signals: on SIGINT or SIGTERM the parent sends each child one SIGTERM (Ctrl-C reached them too, as one
process group); each trainer checkpoints and stops as it does alone, and `run` exits with 130 / 143. On Linux
a child dies with its parent (PR_SET_PDEATHSIG), so a ``kill -9`` of ``run`` loses, as ever, only the steps
since each entry's last checkpoint.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import DkpError
from pipeline.process import this_process

POLL_S = 0.5
LINE_EVERY_S = 30.0  # a progress line at most this often when the console is not a terminal


def independent_group(plan, walk: list[str], start: int) -> list[str]:
    """The entries from ``walk[start]`` on that could be built side by side: consecutive, not fresh, of a stage
    that allows it (``Stage.side_by_side``), none reading another's artifact nor being the same artifact (a gamma =
    0 student is its own baseline: built once, then found fresh). Always at least ``walk[start]``."""
    from pipeline.stages import registry

    group = [walk[start]]
    if not registry.stage(plan.stages[walk[start]].stage).side_by_side:
        return group
    for name in walk[start + 1:]:  # build order: an entry can read only entries before it
        sp = plan.stages[name]
        stage = registry.stage(sp.stage)
        if sp.state == "fresh" or not stage.side_by_side or any(g in stage.upstream for g in group):
            break
        if any((plan.stages[g].stage, plan.stages[g].key) == (sp.stage, sp.key) for g in group):
            break
        group.append(name)
    return group


def choose_jobs(plan, group: list[str], requested: Optional[int]) -> int:
    """How many of ``group`` to run at once: one under torchrun (every rank trains the same entry together);
    else ``requested`` (``--jobs``), else one per entry on a CPU while each keeps at least one of torch's
    threads (``OMP_NUM_THREADS=1`` therefore means one at a time), one where a training would use CUDA (one
    GPU, kept by one process)."""
    if len(group) < 2 or this_process().distributed:
        return 1
    if requested is not None:
        return max(1, min(int(requested), len(group)))
    import torch

    for name in group:
        device = getattr(plan.stages[name].settings, "device", "auto")
        if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
            return 1
    return max(1, min(len(group), torch.get_num_threads()))


def log_path(store, entry: str, key: str) -> Path:
    return store.root / "logs" / f"{entry}-{key[:16]}.log"


def last_step(path: Path) -> int:
    """The newest step in ``path``/metrics.jsonl (0 before the first line)."""
    from pipeline.training.log import METRICS_FILENAME, read_metric_lines

    try:
        lines = read_metric_lines(Path(path) / METRICS_FILENAME)
    except OSError:
        return 0
    return lines[-1][0] if lines else 0


def run_side_by_side(cfg, plan, group: list[str], store, console, options: dict, jobs: int) -> list[str]:
    """Build the entries of ``group``, ``jobs`` at a time; return them in the order they finished.

    Raises the first failed entry's error (a :class:`DkpError` with its message and exit code) after every
    started entry has stopped."""
    threads = max(1, _thread_budget() // jobs)
    ctx = multiprocessing.get_context("spawn")
    pending = list(group)
    running: dict[str, tuple[Any, Any, float]] = {}  # entry -> (process, pipe, started)
    finished: list[str] = []
    failures: list[tuple[str, str, int, Path]] = []
    console.print(f"building {', '.join(group)} side by side ({jobs} processes x {threads} thread"
                  f"{'s' * (threads != 1)}; logs in {store.root / 'logs'})", markup=False)
    try:
        (store.root / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as e:  # logs are for people: the trainings run without them (each child says so)
        console.print(f"warning: {store.root / 'logs'} could not be created ({e.strerror or e})", markup=False)
    stop = {"signalled": 0}

    def forward(signum, _frame):
        # Ctrl-C reached the children too (one process group); SIGTERM sent to `run` alone did not. Either way
        # each child gets one SIGTERM: a trainer treats it, after a SIGINT, as the same request to checkpoint
        # and stop (a second SIGINT, only, means "abort without saving": the terminal sends that to them itself).
        if stop["signalled"]:
            return
        stop["signalled"] = signum
        console.print(f"{signal.Signals(signum).name}: the side-by-side trainings save a checkpoint and stop",
                      markup=False)
        for proc, _, _ in running.values():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    in_main = _in_main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    for s in previous:
        signal.signal(s, forward)
    display = _Display(console, plan, group)
    try:
        while pending or running:
            while pending and len(running) < jobs and not failures and not stop["signalled"]:
                name = pending.pop(0)
                sp = plan.stages[name]
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, name=f"dkp-{name}", daemon=False,
                                   args=(cfg, str(store.root), name, sp.key, threads, str(log_path(store, name, sp.key)),
                                         options, os.getpid(), send))
                proc.start()
                send.close()
                running[name] = (proc, receive, time.time())
            if failures or stop["signalled"]:
                pending.clear()  # start nothing new after a failure or a signal; let the running ones finish
            for name in list(running):
                proc, receive, started = running[name]
                if proc.is_alive():
                    continue
                proc.join()
                result = receive.recv() if receive.poll() else ("crash", f"exited with code {proc.exitcode}", 1)
                receive.close()
                del running[name]
                sp = plan.stages[name]
                if result[0] == "ok":
                    from pipeline.execute import record_built

                    if len(result) > 1:  # its log could not be written (a full disk): a warning, not a failure
                        console.print(f"warning: {result[1]}", markup=False, soft_wrap=True)
                    display.done(name)
                    record_built(cfg, store, console, name, sp, time.time() - started)
                    finished.append(name)
                else:
                    failures.append((name, result[1], int(result[2]), log_path(store, name, sp.key)))
            display.update({n: store.path(plan.stages[n].stage, plan.stages[n].key) for n in running})
            if running:
                time.sleep(POLL_S)
    finally:
        display.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failures:
        failures.sort(key=lambda f: group.index(f[0]))
        name, message, code, log = failures[0]
        parts = [f"{name}: {message} (its output: {log})"]
        for other, m, other_code, other_log in failures[1:]:
            verb = "stopped too" if other_code in (130, 143) else "failed too"
            parts.append(f"{other} {verb}" + (" with the same error" if m == message else f": {m}") + f" ({other_log})")
        err = DkpError("; ".join(parts) + "; what finished is kept: run the same command again to continue")
        err.exit_code = code
        raise err
    if stop["signalled"]:  # every entry finished before it saw the signal: still, stop here as asked
        err = DkpError(f"stopped by {signal.Signals(stop['signalled']).name} after {', '.join(finished)} finished; "
                       "run the same command again to continue")
        err.exit_code = 128 + stop["signalled"]
        raise err
    return finished


def _thread_budget() -> int:
    import torch

    return torch.get_num_threads()


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when its parent dies (a kill -9 of `run` must not leave trainings running)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the prctl
        os._exit(1)


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


class BestEffortStream:
    """A text stream for a child's log file: a write the file system refuses (a full disk) is remembered in
    :attr:`failed` and the rest of the output dropped, instead of failing the training that printed it."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.failed: Optional[str] = None

    def write(self, text: str) -> int:
        if self.failed is None:
            try:
                return self._stream.write(text)
            except OSError as e:
                self.failed = e.strerror or str(e)
        return len(text)

    def flush(self) -> None:
        if self.failed is None:
            try:
                self._stream.flush()
            except OSError as e:
                self.failed = e.strerror or str(e)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _child(cfg, store_root: str, name: str, key: str, threads: int, log: str, options: dict, parent_pid: int,
           send) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, _interrupt)  # until the trainer installs its own: stop cleanly, say so
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        log_problem = None
    except OSError as e:  # the log is for people: without it the training still runs (issue 24)
        fd, log_problem = os.open(os.devnull, os.O_WRONLY), f"{log} could not be created ({e.strerror or e})"
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = BestEffortStream(os.fdopen(1, "w", buffering=1, closefd=False))
    sys.stderr = BestEffortStream(os.fdopen(2, "w", buffering=1, closefd=False))
    try:
        import torch

        torch.set_num_threads(threads)
        from rich.console import Console

        from pipeline.execute import run_stage
        from pipeline.graph import build_plan
        from pipeline.stages import registry
        from pipeline.store.artifacts import Store

        console = Console(file=sys.stdout, highlight=False, width=120)
        console.print(f"== {name} {key[:16]} (pid {os.getpid()}, {threads} torch thread(s)) "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}", markup=False)
        store = Store(Path(store_root))
        plan = build_plan(cfg, store, progress=False)
        sp = plan.stages[name]
        if sp.key != key:  # the inputs changed between the parent's plan and this one
            raise DkpError(f"{name}: its inputs changed while the run was starting (key {key[:16]} -> {sp.key[:16]})")
        run_stage(registry.stage(sp.stage), sp.cfg or cfg, plan, sp, store, console, options)
        failed = log_problem or sys.stdout.failed or sys.stderr.failed
        send.send(("ok", f"the output of {name} is incomplete in {log} ({failed}); the training itself finished")
                  if failed else ("ok",))
    except DkpError as e:
        print(f"error: {e}", file=sys.stderr)
        send.send(("error", str(e), getattr(e, "exit_code", 2)))
    except KeyboardInterrupt:
        send.send(("error", "interrupted before training started (nothing to resume from yet)", 130))
    except BaseException as e:  # noqa: BLE001 - a bug: the parent shows where, the traceback is in the log
        traceback.print_exc()
        send.send(("crash", f"{type(e).__name__}: {e}", 1))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class _Display:
    """Each running entry's step: a rich bar on a terminal, else a line every LINE_EVERY_S seconds."""

    def __init__(self, console, plan, group: list[str]) -> None:
        self.console, self.plan = console, plan
        self.totals = {n: int(getattr(plan.stages[n].settings, "steps", 0) or 0) for n in group}
        self.last_line = time.time()
        self.progress = None
        self.tasks: dict[str, Any] = {}
        if getattr(console, "is_terminal", False):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description:10s}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=console)
            self.progress.start()
            for n in group:
                self.tasks[n] = self.progress.add_task(n, total=self.totals[n] or None)

    def update(self, paths: dict[str, Path]) -> None:
        steps = {n: last_step(p) for n, p in paths.items()}
        if self.progress is not None:
            for n, s in steps.items():
                self.progress.update(self.tasks[n], completed=s)
        elif steps and time.time() - self.last_line >= LINE_EVERY_S:
            self.last_line = time.time()
            self.console.print("  " + ", ".join(f"{n} step {s}/{self.totals[n]}" for n, s in steps.items()),
                               markup=False)

    def done(self, name: str) -> None:
        if self.progress is not None and name in self.tasks:
            self.progress.update(self.tasks[name], completed=self.totals[name])

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
