"""`dkp-pipeline bench`: throughput and peak memory, always as ratios against a baseline in the same run.

Absolute numbers depend on the machine and on whoever else uses it; a ratio of two cases measured
back to back on the same machine mostly does not, so every bench reports both and the ratios are
what docs/benchmarks.md compares.

=================  ================================================  =====================================
bench              cases                                             ratios (speed: interleaved rates)
=================  ================================================  =====================================
``teach``          AutoLink training step (K=16, heatmaps S/4,       width64 vs width16 (steps/s, memory);
                   l1ssim loss, AdamW) at width 16 and at            on CUDA also AMP vs fp32 at width 64
                   AutoLink's width 64; on CUDA also width 64 + AMP
``teacher-cache``  distillation step, width 64, K=16: student step   cached vs live steps/s (the speed-up
                   + live frozen teacher forward on depth, or        of ``distill.teacher_cache``)
                   student step + teacher embeddings read from an
                   HDF5 embedding cache (distill's own reader)
``depth``          MiDaS 3.1 dpt_levit_224 and dpt_swin2_tiny_256,   batch B vs batch 1 frames/s, per model
                   random init, inference at the model's net size
``cache``          B*N depth maps (S x S, float32) written/read      cache vs .npy frames/s; bytes on disk
                   through the depth cache vs one ``np.save`` file
                   per frame
=================  ================================================  =====================================

Each model case runs alone in a fresh Python process (``isolate=True``, the CLI's behaviour), so its
peak memory is its own: peak RSS from ``getrusage`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA,
reported both absolute and as growth over the process's footprint just before the first step. The
timed loop runs ``steps`` steps after one untimed warm-up step and times each; rates come from the
median step (min and max are kept), so a neighbour's burst on a shared machine moves them less.
Inputs are random tensors already on the device: data loading is not part of any model case.
Then all cases of a bench are built in one more process and timed step by step in alternating
order (ABBA...), so they share whatever load the machine has; speed ratios come from these
``interleaved`` rates (on a shared 2-core machine, runs minutes apart differed by up to 2x).
``teacher-cache`` also times the target alone (``target_s``: teacher forward vs embedding lookup).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.errors import ConfigError, DkpError

WHATS = ("teach", "depth", "cache", "teacher-cache")
DEPTH_MODELS = ("dpt_levit_224", "dpt_swin2_tiny_256")
N_KEYPOINTS = 16  # AutoLink's K for Human3.6M / DeepFashion
WIDTH = 64  # AutoLink's detector/decoder width
BASELINE_WIDTH = 16  # the synthetic preset's width
WARMUP = 1
MIB = 1 << 20


class BenchError(DkpError):
    """A benchmark case failed (e.g. out of memory at this batch/size)."""


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


class _Memory:
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


def _timed(step: Callable[[], Any], steps: int, device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` after ``WARMUP`` untimed ones (CUDA synchronised)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _rate(times: list[float], per_step: float = 1.0) -> dict:
    """Rates from per-step times. The median step is what a rate is taken from: on a shared machine
    a neighbour's burst inflates single steps, and the median ignores a minority of those."""
    import statistics

    med = statistics.median(times)
    return {"median_s": round(med, 5), "min_s": round(min(times), 5), "max_s": round(max(times), 5),
            "per_s": per_step / med}


def _device(name: str):
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


def _amp_dtype(device):
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# --------------------------------------------------------------------------------------------------
# cases (each takes plain JSON params and returns plain JSON, so it can run in a fresh process)


def _autolink(size: int, width: int, device):
    from dkp_core.keypoints import AutoLink

    return AutoLink(n_keypoints=N_KEYPOINTS, image_size=size, heatmap_size=size // 4, width=width).to(device)


class _Case:
    """A built benchmark case: ``step()`` does one unit of work; ``per_step`` items (frames) per call."""

    def __init__(self, step: Callable[[], Any], *, device, per_step: int = 1, unit: str = "steps_per_s",
                 extra: Optional[Callable[[], dict]] = None, cleanup: Optional[Callable[[], None]] = None) -> None:
        self.step, self.device, self.per_step, self.unit = step, device, per_step, unit
        self.extra = extra or (lambda: {})
        self.cleanup = cleanup or (lambda: None)


def build_autolink_step(p: dict) -> _Case:
    """One AutoLink training step (forward, l1ssim loss, backward, AdamW) as the trainer does it."""
    import contextlib

    import torch

    from dkp_core.losses import make_reconstruction_loss

    device = _device(p["device"])
    torch.manual_seed(0)
    model = _autolink(p["size"], p["width"], device).train()
    recon = make_reconstruction_loss("l1ssim").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    amp = _amp_dtype(device) if p.get("amp") else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    x = torch.rand(p["batch"], 3, p["size"], p["size"], device=device) * 2 - 1  # (B, 3, S, S)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            out = model(x, mask_generator=gen)
            loss = recon(out.reconstruction.float(), x)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    n_params = sum(t.numel() for t in model.parameters())
    return _Case(step, device=device, extra=lambda: {
        "params_m": round(n_params / 1e6, 3), "amp": {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]})


def build_distill_step(p: dict) -> _Case:
    """A distillation step: student AutoLink step + (live frozen teacher | cached embeddings) + (1 - cos)."""
    import numpy as np
    import torch

    from dkp_core.losses import distillation_loss, make_reconstruction_loss

    device = _device(p["device"])
    B, S, steps = p["batch"], p["size"], p["steps"]
    torch.manual_seed(0)
    student = _autolink(S, WIDTH, device).train()
    recon = make_reconstruction_loss("l1ssim").to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=1e-3)
    rgb = torch.rand(B, 3, S, S, device=device) * 2 - 1  # (B, 3, S, S)
    gen = torch.Generator(device=device).manual_seed(0)
    gamma = 0.1
    tmp = None
    if p["mode"] == "live":
        teacher = _autolink(S, WIDTH, device).eval()
        for t in teacher.parameters():
            t.requires_grad_(False)
        depth = torch.rand(B, 3, S, S, device=device) * 2 - 1

        def target(_s):
            with torch.no_grad():
                return teacher.detector(depth, return_features=("logits",)).features["logits"].float()
    else:
        import h5py

        from pipeline.stages.distill import EmbeddingCache

        n = B * (steps + WARMUP)
        tmp = tempfile.TemporaryDirectory(prefix="dkp-bench-")
        path = Path(tmp.name) / "teacher_embeddings.h5"
        shape = (N_KEYPOINTS, S // 4, S // 4)  # logits (K, S/4, S/4)
        with h5py.File(path, "w") as f:  # the layout distill writes: position, embedding (N, n_flip, ...)
            f.create_dataset("position", data=np.arange(n, dtype=np.int64))
            emb = f.create_dataset("embedding", shape=(n, 2, *shape), dtype="float32", chunks=(1, 2, *shape))
            emb[...] = np.random.default_rng(0).standard_normal((n, 2, *shape), dtype=np.float32)
        cache = EmbeddingCache(path)

        def target(s):
            idx = torch.arange(s * B, (s + 1) * B) % n
            return cache.lookup(idx, torch.zeros(B, dtype=torch.bool)).to(device)

    counter = {"s": 0}
    target_times: list[float] = []

    def step():
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        t = target(counter["s"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        target_times.append(time.perf_counter() - t0)
        counter["s"] += 1
        out = student(rgb, mask_generator=gen, return_features=("logits",))
        loss = recon(out.reconstruction.float(), rgb) + gamma * distillation_loss(
            out.detector_output.features["logits"].float(), t)
        loss.backward()
        opt.step()

    return _Case(step, device=device, extra=lambda: {"target_s": _rate(target_times[WARMUP:])["median_s"]},
                 cleanup=tmp.cleanup if tmp is not None else None)


def build_midas(p: dict) -> _Case:
    """MiDaS 3.1 inference (random init) on a batch at the model's net size."""
    import torch

    from dkp_core.midas import create_model, get_spec

    device = _device(p["device"])
    spec = get_spec(p["model_type"])
    torch.manual_seed(0)
    model = create_model(p["model_type"]).to(device)
    x = torch.randn(p["batch"], 3, spec.net_h, spec.net_w, device=device)  # (B, 3, net_h, net_w)

    def step():
        with torch.inference_mode():
            model(x)

    return _Case(step, device=device, per_step=p["batch"], unit="frames_per_s", extra=lambda: {"net_size": [spec.net_h, spec.net_w]})


BUILDERS: dict[str, Callable[[dict], _Case]] = {
    "autolink_step": build_autolink_step,
    "distill_step": build_distill_step,
    "midas": build_midas,
}


def _rate_fields(times: list[float], case: _Case) -> dict:
    r = _rate(times, per_step=case.per_step)
    return {case.unit: r["per_s"], "s_per_step": r["median_s"], "s_per_step_min": r["min_s"], "s_per_step_max": r["max_s"]}


def case_alone(p: dict) -> dict:
    """One case on its own (its peak memory is this process's): rates, memory, the builder's extras."""
    case = BUILDERS[p["builder"]](p["params"])
    mem = _Memory(case.device)
    mem.start()
    times = _timed(case.step, p["params"]["steps"], case.device)
    res = {**_rate_fields(times, case), **mem.stop(), **case.extra()}
    case.cleanup()
    return res


def case_interleaved(p: dict) -> dict:
    """Several cases built in one process and timed step by step in alternating order (ABBA...).

    A ratio of two rates measured minutes apart on a shared machine mostly measures the neighbours;
    interleaved, both cases see the same load, so their ratio is what the ratios come from."""
    cases = {name: BUILDERS[b](params) for name, (b, params) in p["cases"].items()}
    names = list(cases)
    for _ in range(WARMUP):
        for n in names:
            cases[n].step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(p["steps"]):
        for n in (names if r % 2 == 0 else names[::-1]):
            c = cases[n]
            if c.device.type == "cuda":
                import torch

                torch.cuda.synchronize(c.device)
            t0 = time.perf_counter()
            c.step()
            if c.device.type == "cuda":
                import torch

                torch.cuda.synchronize(c.device)
            times[n].append(time.perf_counter() - t0)
    out = {n: _rate_fields(times[n], cases[n]) for n in names}
    for c in cases.values():
        c.cleanup()
    return out


CASE_FNS: dict[str, Callable[[dict], dict]] = {
    "alone": case_alone,
    "interleaved": case_interleaved,
}


def run_case(fn: str, params: dict, *, isolate: bool = True, timeout: float = 3600) -> dict:
    """Run one case, in a fresh ``python -m pipeline.bench`` process when ``isolate``."""
    if not isolate:
        return CASE_FNS[fn](params)
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-m", "pipeline.bench", fn, json.dumps(params)], capture_output=True,
                       text=True, env=env, timeout=timeout)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        hint = "; try a smaller --batch or --size" if "out of memory" in r.stderr.lower() or r.returncode < 0 else ""
        raise BenchError(f"bench case {fn} {params} failed (exit {r.returncode}): {tail}{hint}")
    return json.loads(lines[-1])


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a is not None and b not in (None, 0) else None


# --------------------------------------------------------------------------------------------------
# benches


def _compare(specs: dict[str, tuple[str, dict]], *, steps: int, isolate: bool) -> dict[str, dict]:
    """Each case alone (its memory and rates), then all of them interleaved in one process (the rates
    that ratios use, under ``"interleaved"``)."""
    cases = {n: run_case("alone", {"builder": b, "params": prm}, isolate=isolate) for n, (b, prm) in specs.items()}
    inter = run_case("interleaved", {"cases": {n: list(v) for n, v in specs.items()}, "steps": steps},
                     isolate=isolate)
    for n in cases:
        cases[n]["interleaved"] = inter[n]
    return cases


def _speed(case: dict) -> float:
    r = case["interleaved"]
    return r["steps_per_s"] if "steps_per_s" in r else r["frames_per_s"]


def bench_teach(*, batch: int, size: int, steps: int, device, isolate: bool = True) -> dict:
    base = {"device": str(device), "batch": batch, "size": size, "steps": steps}
    b_name, w_name = f"width{BASELINE_WIDTH}", f"width{WIDTH}"
    specs = {b_name: ("autolink_step", base | {"width": BASELINE_WIDTH}),
             w_name: ("autolink_step", base | {"width": WIDTH})}
    if device.type == "cuda":
        specs[f"{w_name}_amp"] = ("autolink_step", base | {"width": WIDTH, "amp": True})
    cases = _compare(specs, steps=steps, isolate=isolate)
    b, w = cases[b_name], cases[w_name]
    ratios = {f"steps_per_s {w_name}/{b_name}": _ratio(_speed(w), _speed(b)),
              f"peak_mem_growth {w_name}/{b_name}": _ratio(w["peak_mem_growth_mib"], b["peak_mem_growth_mib"])}
    if device.type == "cuda":
        a = cases[f"{w_name}_amp"]
        ratios[f"steps_per_s {w_name} amp/fp32"] = _ratio(_speed(a), _speed(w))
        ratios[f"peak_mem_growth {w_name} amp/fp32"] = _ratio(a["peak_mem_growth_mib"], w["peak_mem_growth_mib"])
    return {"baseline": b_name, "cases": cases, "ratios": ratios,
            "setup": {"n_keypoints": N_KEYPOINTS, "heatmap_size": size // 4, "recon_loss": "l1ssim",
                      "optimizer": "AdamW"}}


def bench_teacher_cache(*, batch: int, size: int, steps: int, device, isolate: bool = True) -> dict:
    base = {"device": str(device), "batch": batch, "size": size, "steps": steps}
    cases = _compare({"live_teacher": ("distill_step", base | {"mode": "live"}),
                      "cached_embeddings": ("distill_step", base | {"mode": "cached"})}, steps=steps, isolate=isolate)
    live, cached = cases["live_teacher"], cases["cached_embeddings"]
    return {"baseline": "live_teacher", "cases": cases,
            "ratios": {"speedup cached/live": _ratio(_speed(cached), _speed(live)),
                       "target_s cached/live": _ratio(cached["target_s"], live["target_s"]),
                       "target share of a live step": _ratio(live["target_s"], live["s_per_step"]),
                       "peak_mem_growth cached/live": _ratio(cached["peak_mem_growth_mib"],
                                                             live["peak_mem_growth_mib"])},
            "setup": {"width": WIDTH, "n_keypoints": N_KEYPOINTS, "layer": "logits", "recon_loss": "l1ssim"}}


def bench_depth(*, batch: int, size: int, steps: int, device, isolate: bool = True,
                models: tuple[str, ...] = DEPTH_MODELS) -> dict:
    specs = {}
    for name in models:
        p = {"device": str(device), "model_type": name, "steps": steps}
        specs[f"{name}_b1"] = ("midas", p | {"batch": 1})
        specs[f"{name}_b{batch}"] = ("midas", p | {"batch": batch})
    cases = _compare(specs, steps=steps, isolate=isolate)
    ratios = {f"{name} frames_per_s b{batch}/b1": _ratio(_speed(cases[f"{name}_b{batch}"]),
                                                         _speed(cases[f"{name}_b1"])) for name in models}
    return {"baseline": "batch 1", "cases": cases, "ratios": ratios,
            "setup": {"weights": "random init", "input": "model net size (--size unused)", "precision": "fp32"}}


def bench_cache(*, batch: int, size: int, steps: int, device=None, isolate: bool = True) -> dict:
    """Depth cache write/read (shards of ``batch`` frames) vs one ``np.save`` file per frame."""
    import cv2
    import numpy as np

    from pipeline.depth_cache import CacheWriter, DepthCacheReader, finalize

    n = batch * steps
    rng = np.random.default_rng(0)
    # Smooth maps like MiDaS output (compression depends on it): upsampled 8x8 noise plus a ramp.
    maps = [cv2.resize(rng.random((8, 8), dtype=np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
            + np.linspace(0, 1, size, dtype=np.float32)[None, :] + 1.0 for _ in range(n)]

    def du(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    with tempfile.TemporaryDirectory(prefix="dkp-bench-cache-") as tmp:
        root = Path(tmp)
        npy = root / "npy"
        npy.mkdir()
        t0 = time.perf_counter()
        for i, d in enumerate(maps):
            np.save(npy / f"{i:06d}.npy", d)
        t_npy_w = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = [np.load(npy / f"{i:06d}.npy") for i in range(n)]
        t_npy_r = time.perf_counter() - t0
        assert len(back) == n

        cdir = root / "cache"
        t0 = time.perf_counter()
        w = CacheWriter(cdir, spec={"bench": True}, n_frames=n, shard_size=batch)
        for plan in w.shards_todo():
            ids = [f"f{i:06d}" for i in range(plan.start, plan.stop)]
            w.write_shard(plan, ids, ["xxh3:0"] * plan.n, maps[plan.start:plan.stop], [True] * plan.n)
        finalize(cdir)
        t_c_w = time.perf_counter() - t0
        t0 = time.perf_counter()
        reader = DepthCacheReader(cdir)
        got = [reader.read(i) for i in range(n)]
        t_c_r = time.perf_counter() - t0
        err = max(float(np.abs(g - m).max() / m.max()) for g, m in zip(got, maps))
        cases = {
            "npy_write": {"frames_per_s": n / t_npy_w, "bytes": du(npy)},
            "npy_read": {"frames_per_s": n / t_npy_r},
            "cache_write": {"frames_per_s": n / t_c_w, "bytes": du(cdir / "shards"), "storage_dtype": "float16"},
            "cache_read": {"frames_per_s": n / t_c_r, "max_rel_error": err},
        }
    return {"baseline": "one np.save file per frame (float32)", "cases": cases,
            "ratios": {"write frames_per_s cache/npy": _ratio(cases["cache_write"]["frames_per_s"],
                                                              cases["npy_write"]["frames_per_s"]),
                       "read frames_per_s cache/npy": _ratio(cases["cache_read"]["frames_per_s"],
                                                             cases["npy_read"]["frames_per_s"]),
                       "bytes cache/npy": _ratio(cases["cache_write"]["bytes"], cases["npy_write"]["bytes"])},
            "setup": {"n_frames": n, "shard_size": batch, "map": f"{size}x{size} float32",
                      "page_cache": "warm (reads follow writes)"}}


BENCHES: dict[str, Callable[..., dict]] = {
    "teach": bench_teach,
    "teacher-cache": bench_teacher_cache,
    "depth": bench_depth,
    "cache": bench_cache,
}


def run_bench(what: str, *, batch: int, size: int, steps: int, device: str = "auto", isolate: bool = True,
              **kw) -> dict:
    """Run bench ``what``; returns the JSON record (see module docstring) without printing."""
    import platform

    import torch

    if what not in BENCHES:
        raise ConfigError(f"unknown bench {what!r}; valid: {', '.join(WHATS)}")
    for name, v, lo in (("batch", batch, 1), ("steps", steps, 1), ("size", size, 16)):
        if not isinstance(v, int) or v < lo:
            raise ConfigError(f"bench --{name} {v!r}: must be an integer >= {lo}")
    if what in ("teach", "teacher-cache") and size % 16:
        raise ConfigError(f"bench {what} --size {size}: AutoLink needs a multiple of 16 (e.g. {size // 16 * 16 or 16})")
    if what in ("teach", "teacher-cache") and batch == 1 and size == 16:
        raise ConfigError(f"bench {what} --batch 1 --size 16: the detector's 1x1 bottleneck leaves BatchNorm one value "
                          "per channel in training; use --batch 2 or --size 32")
    dev = _device(device)
    t0 = time.time()
    body = BENCHES[what](batch=batch, size=size, steps=steps, device=dev, isolate=isolate, **kw)
    return {
        "bench": what,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "wall_s": round(time.time() - t0, 2),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or
                                                                                    platform.machine()),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": str(torch.__version__),
        "batch": batch, "size": size, "steps": steps, "warmup_steps": WARMUP, "isolated": isolate,
        **body,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "-" if v is None else str(v)


def bench_command(what: str, *, batch: int, size: int, steps: int, device: str, output: Optional[str],
                  console, isolate: bool = True, **kw) -> dict:
    """The CLI's `bench`: run, print the cases and ratios, append the JSON record as one line to ``output``.

    ``isolate=False`` runs model cases in this process (tests: faster, but CPU peak RSS is then the
    process's, not the case's); ``kw`` goes to the bench (``models=`` for depth)."""
    rec = run_bench(what, batch=batch, size=size, steps=steps, device=device, isolate=isolate, **kw)
    console.print(f"bench {what} on {rec['device']} ({rec['device_name']}, {rec['cpus']} CPUs, torch threads "
                  f"{rec['torch_threads']}, load {rec['loadavg_1m']}): batch {batch}, size {size}, steps {steps} "
                  f"after {rec['warmup_steps']} warm-up, {rec['wall_s']} s", markup=False)
    for name, c in rec["cases"].items():
        flat = {k: v for k, v in c.items() if k != "interleaved"}
        flat.update({f"interleaved.{k}": v for k, v in c.get("interleaved", {}).items()})
        console.print(f"  {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(flat.items())), markup=False)
    for k, v in rec["ratios"].items():
        console.print(f"  ratio {k} = {_fmt(v)}  (baseline: {rec['baseline']})", markup=False)
    if output:
        p = Path(output)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        console.print(f"appended to {p}", markup=False)
    return rec


def _main(argv: list[str]) -> None:
    """``python -m pipeline.bench CASE PARAMS_JSON``: run one case, print its JSON result."""
    fn, params = argv[0], json.loads(argv[1])
    print(json.dumps(CASE_FNS[fn](params)), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
