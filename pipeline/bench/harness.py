"""How every bench measures: timing, peak memory, interleaved runs, a case in a fresh process, ratios.

A *case* is a function of plain JSON params returning plain JSON, so it can run in a fresh Python process
(``run_case(..., isolate=True)``: ``python -m pipeline.bench CASE PARAMS_JSON``), where its peak memory is its
own. ``CASES`` names them. A *builder* (``BUILDERS``) makes a :class:`Case` (one ``step()`` per unit of work)
for :func:`case_alone` (one case: rates, memory) and :func:`case_interleaved` (several cases timed step by step
in alternating order in one process, so they share whatever load the machine has: speed ratios come from these).
Both tables map a name to ``"module:function"`` inside this package, imported when used.
"""
from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.errors import ConfigError, DkpError

WARMUP = 1
MIB = 1 << 20

CASES = {  # name -> "module:function" (params dict -> JSON-able dict)
    "alone": "harness:case_alone",
    "interleaved": "harness:case_interleaved",
    "depth_abc": "depth:case_depth_abc",
    "depth_overlap": "overlap:case_depth_overlap",  # bench depth-overlap
    "depth_precision": "depth_precision:case_depth_precision",  # bench depth-precision
    "gpu_model": "gpu_model:case_gpu_model",  # bench gpu
    "gpu_train": "gpu:case_gpu_train",
    "train_window": "training:case_train_window",  # bench side-by-side
    "data_loader": "training:case_data_loader",  # bench gpu: the trainer's DataLoader ceiling
    "trainer_syncs": "training:case_trainer_syncs",  # bench gpu: host reads of the trainer's loop
}
BUILDERS = {  # name -> "module:function" (params dict -> Case)
    "autolink_step": "training:build_autolink_step",
    "distill_step": "training:build_distill_step",
}


class BenchError(DkpError):
    """A benchmark case failed (e.g. out of memory at this batch/size)."""


def _resolve(table: dict[str, str], name: str) -> Callable:
    module, fn = table[name].split(":")
    return getattr(importlib.import_module(f"pipeline.bench.{module}"), fn)


# --------------------------------------------------------------------------------------------------
# measuring


def _rss_bytes() -> Optional[int]:
    """Resident set size now (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes; Linux: KiB


class Memory:
    """Peak memory of what runs between ``start()`` and ``stop()``.

    CUDA: ``max_memory_allocated`` (tensors only, not the caching allocator's reserve). CPU: the
    process's peak RSS, which only grows, so it means "this case" only in a fresh process.
    """

    def __init__(self, device) -> None:
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            now = _rss_bytes()
            self.before = now if now is not None else _peak_rss_bytes()

    def stop(self) -> dict:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak, kind = torch.cuda.max_memory_allocated(self.device), "cuda_max_memory_allocated"
        else:
            peak, kind = _peak_rss_bytes(), "peak_rss"
        return {"mem_kind": kind, "peak_mem_mib": round(peak / MIB, 1),
                "peak_mem_growth_mib": round(max(0, peak - self.before) / MIB, 1)}


def sync(device) -> None:
    """Wait for ``device`` (CUDA) to finish its queued work; nothing on a CPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(step: Callable[[], Any], steps: int, device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` after ``WARMUP`` untimed ones (CUDA synchronised)."""
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def rate(times: list[float], per_step: float = 1.0) -> dict:
    """Rates from per-step times. The median step is what a rate is taken from: on a shared machine
    a neighbour's burst inflates single steps, and the median ignores a minority of those."""
    med = statistics.median(times)
    return {"median_s": round(med, 5), "min_s": round(min(times), 5), "max_s": round(max(times), 5),
            "per_s": per_step / med}


def bench_device(name: str):
    """``--device`` (auto, cpu, cuda, cuda:N) as a torch device; ConfigError naming the fix otherwise."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"bench --device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"bench --device {name!r}: torch sees no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"bench --device {name!r}: expected auto, cpu, cuda or cuda:N")
    return dev


def amp_of(p: dict, device):
    """The autocast dtype a training case asks for: ``amp: "bf16"``, any other true value = the device's AMP dtype."""
    import torch

    device_amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16}.get(p.get("amp")) or (device_amp if p.get("amp") else None)


def amp_name(amp) -> str:
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(amp), "off")


def autocast(device, amp):
    import contextlib

    import torch

    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


class Utilisation:
    """GPU utilisation (% of time a kernel ran, NVML via ``torch.cuda.utilization``) sampled every ``period_s``
    between ``start()`` and ``stop()`` on a thread; on a CPU, or without NVML (the ``nvidia-ml-py`` package), stop()
    says why there is no number."""

    def __init__(self, device, period_s: float = 0.1) -> None:
        self.device, self.period_s = device, period_s
        self.samples: list[float] = []
        self.why: Optional[str] = None if device.type == "cuda" else "not a CUDA device"
        self._stop = None

    def start(self) -> None:
        import threading

        import torch

        if self.why:
            return
        try:
            torch.cuda.utilization(self.device)
        except Exception as e:  # noqa: BLE001 - pynvml missing or NVML unusable: recorded, not fatal
            self.why = f"NVML unavailable ({type(e).__name__}: {str(e)[:80]})"
            return
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(self.period_s):
                self.samples.append(float(torch.cuda.utilization(self.device)))

        self._thread = threading.Thread(target=sample, name="gpu-utilisation", daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
        if not self.samples:
            return {"unavailable": self.why or "no sample (the case ran shorter than the sampling period)"}
        return {"mean_pct": round(statistics.fmean(self.samples), 1), "median_pct": statistics.median(self.samples),
                "samples": len(self.samples)}


class EnvVar:
    """``with EnvVar(name, value):`` sets an environment variable for the block, then restores it."""

    def __init__(self, name: str, value: str) -> None:
        self.name, self.value = name, value

    def __enter__(self):
        self.old = os.environ.get(self.name)
        os.environ[self.name] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.old


# --------------------------------------------------------------------------------------------------
# running cases


class Case:
    """A built benchmark case: ``step()`` does one unit of work; ``per_step`` items (frames) per call."""

    def __init__(self, step: Callable[[], Any], *, device, per_step: int = 1, unit: str = "steps_per_s",
                 extra: Optional[Callable[[], dict]] = None, cleanup: Optional[Callable[[], None]] = None) -> None:
        self.step, self.device, self.per_step, self.unit = step, device, per_step, unit
        self.extra = extra or (lambda: {})
        self.cleanup = cleanup or (lambda: None)


def _rate_fields(times: list[float], case: Case) -> dict:
    r = rate(times, per_step=case.per_step)
    return {case.unit: r["per_s"], "s_per_step": r["median_s"], "s_per_step_min": r["min_s"], "s_per_step_max": r["max_s"]}


def case_alone(p: dict) -> dict:
    """One case on its own (its peak memory is this process's): rates, memory, the builder's extras."""
    case = _resolve(BUILDERS, p["builder"])(p["params"])
    mem = Memory(case.device)
    mem.start()
    times = timed(case.step, p["params"]["steps"], case.device)
    res = {**_rate_fields(times, case), **mem.stop(), **case.extra()}
    case.cleanup()
    return res


def case_interleaved(p: dict) -> dict:
    """Several cases built in one process and timed step by step in alternating order (ABBA...).

    A ratio of two rates measured minutes apart on a shared machine mostly measures the neighbours;
    interleaved, both cases see the same load, so their ratio is what the ratios come from."""
    cases = {name: _resolve(BUILDERS, b)(params) for name, (b, params) in p["cases"].items()}
    names = list(cases)
    for _ in range(WARMUP):
        for n in names:
            cases[n].step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(p["steps"]):
        for n in (names if r % 2 == 0 else names[::-1]):
            c = cases[n]
            sync(c.device)
            t0 = time.perf_counter()
            c.step()
            sync(c.device)
            times[n].append(time.perf_counter() - t0)
    out = {n: _rate_fields(times[n], cases[n]) for n in names}
    for c in cases.values():
        c.cleanup()
    return out


def run_case(fn: str, params: dict, *, isolate: bool = True, timeout: float = 3600) -> dict:
    """Run case ``fn`` (a name in ``CASES``), in a fresh ``python -m pipeline.bench`` process when ``isolate``."""
    if not isolate:
        return _resolve(CASES, fn)(params)
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-m", "pipeline.bench", fn, json.dumps(params)], capture_output=True,
                       text=True, env=env, timeout=timeout)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        hint = "; try a smaller --batch or --size" if "out of memory" in r.stderr.lower() or r.returncode < 0 else ""
        raise BenchError(f"bench case {fn} {params} failed (exit {r.returncode}): {tail}{hint}")
    return json.loads(lines[-1])


def main(argv: list[str]) -> None:
    """``python -m pipeline.bench CASE PARAMS_JSON``: run one case, print its JSON result."""
    fn, params = argv[0], json.loads(argv[1])
    print(json.dumps(_resolve(CASES, fn)(params)), flush=True)


# --------------------------------------------------------------------------------------------------
# comparing


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    # 4 significant digits: a ratio far below 1 (the perceptual loss: ~0.02) keeps its precision
    return float(f"{a / b:.4g}") if a is not None and b not in (None, 0) else None


def compare(specs: dict[str, tuple[str, dict]], *, steps: int, isolate: bool) -> dict[str, dict]:
    """Each case alone (its memory and rates), then all of them interleaved in one process (the rates
    that ratios use, under ``"interleaved"``). ``specs``: name -> (builder, params)."""
    cases = {n: run_case("alone", {"builder": b, "params": prm}, isolate=isolate) for n, (b, prm) in specs.items()}
    inter = run_case("interleaved", {"cases": {n: list(v) for n, v in specs.items()}, "steps": steps},
                     isolate=isolate)
    for n in cases:
        cases[n]["interleaved"] = inter[n]
    return cases


def speed(case: dict) -> float:
    """The interleaved rate of a compared case (steps/s or frames/s)."""
    r = case["interleaved"]
    return r["steps_per_s"] if "steps_per_s" in r else r["frames_per_s"]
