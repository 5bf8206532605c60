"""``bench gpu``: every depth case of one model (``case_gpu_model``, one part of the suite in :mod:`pipeline.bench.gpu`).

In priority order until the part's deadline: the bare model per precision and batch; per frame size the data side
alone, the writer's and the DataLoader's ceilings, the whole stage at its best settings and at the user's
defaults; MiDaS run.py's loop, the other memory format and ``torch.compile`` (the table in gpu.py's docstring
says what each measures).
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from pipeline.bench.depth import depth_config, random_midas_weights, run_depth_stage, run_py_loop
from pipeline.bench.gpu import AMP_DTYPES, COMPILE_PRIOR_S, Budget
from pipeline.bench.harness import (WARMUP, BenchError, EnvVar, Memory, Utilisation, autocast, bench_device, rate,
                                    sync, timed)


def _rel_diff(a, b) -> dict:
    """max |a - b| / max |b| and mean |a - b| / mean |b| (b the reference), as floats."""
    d = (a - b).abs()
    return {"max_rel": float(d.max() / b.abs().max().clamp_min(1e-12)),
            "mean_rel": float(d.mean() / b.abs().mean().clamp_min(1e-12))}


def _nearest(table: dict, precision: str, batch: int) -> Optional[float]:
    """Seconds per frame measured at ``precision`` (else any precision) and the nearest batch; None if none."""
    for pool in ([k for k in table if k[0] == precision], list(table)):
        if pool:
            return table[min(pool, key=lambda k: abs(k[1] - batch))]
    return None


def case_gpu_model(p: dict) -> dict:
    """Every depth case of one model, in priority order until ``p["deadline"]``; ``{"cases", "log"}``."""
    import cv2
    import numpy as np
    import torch

    from dkp_core.midas import get_spec
    from dkp_core.midas.transforms import postprocess, preprocess, preprocess_u8, target_size
    from pipeline.data.images import decode_rgb, read_frame_bytes, read_rgb
    from pipeline.stages.depth.frames import device_batch

    budget = Budget(p["deadline"], p.get("progress"))
    if time.time() >= p["deadline"]:  # no time left for this part: not even its setup
        budget.run("(all cases)", None, dict)
        return budget.result()
    device = bench_device(p["device"])
    mt, steps, workers = p["model_type"], p["steps"], p["workers"]
    spec = get_spec(mt)
    p_stage, b_stage, flops = p["stage_precision"], p["stage_batch"], p["flops_per_frame"]
    sizes = [int(v) for v in p["frame_sizes"]]
    frames_of = {s_: sorted(Path(p["data_roots"][str(s_)], "images").glob("*.jpg")) for s_ in sizes}
    frames = frames_of[sizes[0]]  # the weights' calibration frames
    n = len(frames)
    cuda = device.type == "cuda"
    spf: dict[tuple[str, int], float] = {}  # (precision, batch) -> measured model seconds per frame
    data: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="dkp-bench-gpu-") as tmp, EnvVar("DKP_CACHE_DIR", f"{tmp}/dkp-cache"):
        root = Path(tmp)
        t0 = time.perf_counter()
        xs = torch.from_numpy(np.stack([preprocess_u8(read_rgb(q), spec) for q in frames[:4]]))  # (r, 3, h, w)
        weights = root / f"{mt}.pt"
        base = random_midas_weights(mt, xs, weights, device=device)  # = what load_midas(weights) builds
        setup_s = time.perf_counter() - t0
        # the stage's memory format (channels_last on CUDA, as stages/depth/compute.py) and the other one (lazily)
        fmt = {"default": torch.channels_last if cuda else torch.contiguous_format}
        fmt["other"] = torch.contiguous_format if cuda else torch.channels_last
        models: dict[str, Any] = {"default": base.to(memory_format=fmt["default"])}
        xs_dev = xs.to(device)
        with torch.inference_mode():
            y_ref = models["default"](xs_dev.contiguous(memory_format=fmt["default"])).float()  # (r, h, w) fp32

        def model(variant: str):
            if variant not in models:
                if variant == "other":
                    models["other"] = copy.deepcopy(models["default"]).to(memory_format=fmt["other"])
                else:  # compile
                    models["compile"] = torch.compile(models["default"])
            return models[variant]

        def bare(prec: str, b: int, variant: str = "default") -> dict:
            m = model(variant)
            amp = getattr(torch, AMP_DTYPES[prec]) if AMP_DTYPES[prec] else None
            memory_format = fmt["other" if variant == "other" else "default"]
            x = xs_dev[torch.arange(b) % len(xs_dev)].contiguous(memory_format=memory_format)  # (b, 3, h, w)

            def forward(inp):
                with torch.inference_mode(), autocast(device, amp):
                    return m(inp)

            res: dict[str, Any] = {}
            if variant == "compile":
                sync(device)
                t_c = time.perf_counter()
                forward(x)
                sync(device)
                res["compile_s"] = round(time.perf_counter() - t_c, 2)
            mem = Memory(device)
            mem.start()
            r = rate(timed(lambda: forward(x), steps, device), per_step=b)
            res.update(mem.stop())
            fps = r["per_s"]
            if variant == "default":  # depth against fp32 on the reference frames (one more forward)
                spf[(prec, b)] = 1.0 / fps
                y = forward(xs_dev.contiguous(memory_format=memory_format)).float()
                if prec != "fp32":
                    res["vs_fp32"] = _rel_diff(y, y_ref)
            else:  # the timed shape: a compiled model would recompile for another
                y = forward(x).float()
            return {"frames_per_s": fps, "s_per_batch": r["median_s"], "s_per_batch_min": r["min_s"],
                    "s_per_batch_max": r["max_s"], "tflops_per_s": float(f"{flops * fps / 1e12:.4g}"), "batch": b,
                    "precision": prec, "memory_format": "channels_last" if memory_format == torch.channels_last
                    else "nchw", "compile": variant == "compile", "finite": bool(torch.isfinite(y).all()), **res}

        def bare_estimate(prec: str, b: int) -> Optional[float]:
            s = _nearest(spf, prec, b)
            return None if s is None else (WARMUP + steps) * b * s + len(xs) * s

        def run_bare(prec: str, variant: str = "default", only: Optional[int] = None) -> None:
            suffix = {"default": "", "other": "/nchw" if cuda else "/channels_last", "compile": "/compile"}[variant]
            for b in ([only] if only else p["batches"]):
                name = f"bare/{prec}/b{b}{suffix}"
                est = bare_estimate(prec, b)
                if variant == "compile" and est is not None:
                    est += COMPILE_PRIOR_S
                res = budget.run(name, est, lambda: bare(prec, b, variant))
                if res is not None:
                    budget.keep({name: res})
                    if "error" in res:  # out of memory: larger batches of this precision fail too
                        break

        def data_side(size: int) -> dict:
            frames = frames_of[size]
            k = min(n, p["data_frames"])
            old_threads = cv2.getNumThreads()
            cv2.setNumThreads(1)
            try:
                t = time.perf_counter()
                raws = [read_frame_bytes(q) for q in frames[:k]]
                t_read = time.perf_counter() - t
                t = time.perf_counter()
                imgs = [decode_rgb(q, r) for q, r in zip(frames, raws)]
                t_decode = time.perf_counter() - t
                t = time.perf_counter()
                old = [preprocess(im.astype(np.float32) / 255.0, spec) for im in imgs]
                t_old = time.perf_counter() - t
                t = time.perf_counter()
                new = [preprocess_u8(im, spec) for im in imgs]
                t_new = time.perf_counter() - t
            finally:
                cv2.setNumThreads(old_threads)
            exact = all(np.array_equal(a, b) for a, b in zip(old, new))
            items = [{"jpeg": torch.from_numpy(r), "path": str(q)} for q, r in zip(frames, raws)]
            hws = [im.shape[:2] for im in imgs]

            def device_path(j):
                x, kept, bad = device_batch(items[j:j + b_stage], hws[j:j + b_stage], spec, device)
                if bad:
                    raise BenchError(f"bench gpu: frame {frames[j + bad[0][0]]} failed on the device path: {bad[0][1]}")
                return x

            device_path(0)  # warm-up (decoder initialisation)
            sync(device)
            t = time.perf_counter()
            x_dev = torch.cat([device_path(j) for j in range(0, k, b_stage)])  # (k, 3, h, w)
            sync(device)
            t_dev = time.perf_counter() - t
            # depth of the two paths, fp32 model, first frames (what the device path changes, without the cache's
            # float16 rounding)
            r = min(4, k)
            with torch.inference_mode():
                m = models["default"]
                ya = m(torch.from_numpy(np.stack(new[:r])).to(device).contiguous(memory_format=fmt["default"]))
                yb = m(x_dev[:r].contiguous(memory_format=fmt["default"]))
                hw = imgs[0].shape[:2]
                da, db = postprocess(ya.float(), hw), postprocess(yb.float(), hw)
            per_worker = k / (t_read + t_decode + t_new)
            data[size] = {"per_worker": per_worker, "per_worker_old": k / (t_read + t_decode + t_old),
                          "device": k / t_dev}
            return {"frames": k, "frame_size": list(imgs[0].shape[:2]), "jpeg_kib": round(sum(map(len, raws)) / k
                                                                                          / 1024, 1),
                    "read_ms": round(1e3 * t_read / k, 3), "decode_ms": round(1e3 * t_decode / k, 3),
                    "cpu_preprocess_old_ms": round(1e3 * t_old / k, 3), "cpu_preprocess_ms": round(1e3 * t_new / k, 3),
                    "cpu_new_equals_old": exact, "cpu_frames_per_s_per_worker": per_worker,
                    "cpu_old_frames_per_s_per_worker": data[size]["per_worker_old"],
                    "device_frames_per_s": data[size]["device"],
                    "device_batch": b_stage, "device_vs_cpu_input": _rel_diff(x_dev[:r].cpu(),
                                                                              torch.from_numpy(np.stack(new[:r]))),
                    "device_vs_cpu_depth_fp32": _rel_diff(db.cpu(), da.cpu())}

        def manifest_of(size: int):
            from pipeline.data.build import build_manifest

            return build_manifest("folder", p["data_roots"][str(size)], progress=False)

        def loader(size: int, pre: str) -> dict:
            """The data side's ceiling: the stage's DataLoader (its batches, its workers) with nothing to feed."""
            from torch.utils.data import DataLoader

            from pipeline.depth_cache.writer import ShardPlan
            from pipeline.data.workers import dies_with_this_process
            from pipeline.stages.depth.frames import BatchedFrames, keep_batch, plan_batches

            m = manifest_of(size)
            plans = [ShardPlan(0, 0, len(m))]
            batches = plan_batches(m, plans, b_stage, lambda h, w: (3, *target_size(h, w, spec)))
            ds = BatchedFrames(m, batches, midas_spec=spec, preprocess=pre)
            dl = DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=keep_batch,
                            prefetch_factor=2 if workers else None, pin_memory=cuda,
                            worker_init_fn=dies_with_this_process() if workers else None)
            t0 = t1 = time.perf_counter()
            got = first = 0
            for b, item in enumerate(dl):
                k = sum(len(g["i"]) for g in item["groups"])
                if b == 0:
                    t1, first = time.perf_counter(), k
                got += k
            sec = time.perf_counter() - t1
            return {"frames_per_s": (got - first) / max(sec, 1e-9) if len(batches) > 1 else got / (sec + t1 - t0),
                    "frames": got, "batch": b_stage, "num_workers": workers, "preprocess": pre,
                    "pinned": cuda, "frame_size": size}

        def writer(size: int) -> dict:
            """The writer's ceiling: frames/s the background HDF5 writer stores (float16 + scale, gzip, checksums),
            smooth maps of the frame size, nothing else running."""
            from pipeline.depth_cache import CacheWriter
            from pipeline.stages.depth.writer import BackgroundWriter

            k = max(8, min(n, 64 if size >= 512 else 256))
            yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
            rng = np.random.default_rng(0)
            maps = [(np.sin(xx / 17 + j) + np.cos(yy / 23) + 3 + 0.01 * rng.standard_normal((size, size)))
                    .astype(np.float32) for j in range(4)]
            cw = CacheWriter(root / f"writer-{size}", spec={"bench": "writer"}, n_frames=k, shard_size=k,
                             storage_dtype="float16")
            (plan,) = cw.shards_todo()
            w = BackgroundWriter(cw)
            t0 = time.perf_counter()
            w.open(plan, (size, size))
            for j in range(k):
                w.add([(j, f"f{j}", "h", maps[j % 4], True)])
            w.commit()
            w.close(abort=False)
            sec = time.perf_counter() - t0
            return {"frames_per_s": k / sec, "frames": k, "frame_size": size, "storage_dtype": "float16",
                    "seconds_writing": round(w.seconds_writing, 3),
                    "bytes_per_frame": round(sum(f.stat().st_size for f in (root / f"writer-{size}").rglob("*.h5")) / k)}

        def stage(size: int, setting: str) -> dict:
            """The stage at the user's defaults (nothing set: auto precision, preprocessing, batch, workers) or at
            its best settings (the suite's stage precision and batch, device preprocessing on CUDA, W workers)."""
            depth = {"device": device.type} if setting == "defaults" else {
                "precision": p_stage, "batch_size_inference": b_stage, "num_workers": workers,
                "preprocess": "device" if cuda else "cpu", "device": device.type}
            cfg = depth_config(root, f"gpu-{size}-{setting}", Path(p["data_roots"][str(size)]), mt, weights, **depth)
            mem = Memory(device)
            util = Utilisation(device)
            mem.start()
            util.start()
            rec, cache, wall = run_depth_stage(cfg, root / f"store-{size}-{setting}", n)
            u = util.stop()
            c = rec["compute"]
            fps = c["frames_after_first_batch"] / c["seconds_after_first_batch"] if c.get(
                "seconds_after_first_batch") else n / c["seconds"]
            return {"frames_per_s": fps, "frames_per_s_with_startup": n / c["seconds"], "seconds": c["seconds"],
                    "frames_per_s_wall": n / wall, "wall_s": round(wall, 3), "frames": n, "frame_size": size,
                    "setting": setting, "batch": c["batch_size"], "num_workers": c["num_workers"],
                    "precision": rec["cache_spec"]["precision"], "preprocess": rec["cache_spec"].get("preprocess", "cpu"),
                    "storage_dtype": cfg.depth.storage_dtype, "lane": c["lane"], "limit": c["limit"],
                    "fetches_per_batch": round(c["fetches"] / max(1, c["batches"]), 3), "gpu_utilisation": u,
                    **mem.stop(), **{k: c[k] for k in ("seconds_model", "seconds_waiting_for_data",
                                                       "seconds_waiting_for_device", "seconds_waiting_for_writer",
                                                       "seconds_writing", "fp32_fallbacks")}}

        def stage_estimate(size: int) -> Optional[float]:
            s = _nearest(spf, p_stage, b_stage)
            feed = (data.get(size) or {}).get("device" if cuda else "per_worker")
            if s is None or not feed:
                return None
            return setup_s + n * max(s, 1.0 / (feed * (1 if cuda else workers)))

        def run_py() -> dict:
            m = models["default"] if not cuda else model("other")  # run.py: NCHW, fp32
            k = p["run_py_frames"]
            out = root / "run_py"
            out.mkdir(exist_ok=True)
            fr = frames_of[sizes[-1]]
            run_py_loop(m, spec, fr[:1], out, device)  # warm-up
            sec = run_py_loop(m, spec, fr[:k], out, device)
            return {"frames_per_s": k / sec, "seconds": round(sec, 3), "frames": k, "batch": 1, "precision": "fp32",
                    "memory_format": "nchw", "frame_size": sizes[-1]}

        def add(name: str, est: Optional[float], fn) -> None:
            res = budget.run(name, est, fn)
            if res is not None:
                budget.keep({name: res})

        # priority order: what the goals need first
        run_bare(p_stage)
        for size in sizes:
            add(f"data_side/{size}", None, lambda size=size: data_side(size))
            add(f"writer/{size}", None, lambda size=size: writer(size))
            add(f"loader/{size}", None, lambda size=size: loader(size, "device" if cuda else "cpu"))
            for setting in ("best", "defaults"):
                add(f"stage/{size}/{setting}", stage_estimate(size), lambda size=size, st=setting: stage(size, st))
        s1 = _nearest(spf, "fp32", 1)
        old = (data.get(sizes[-1]) or {}).get("per_worker_old")
        add("run_py_loop", None if s1 is None or not old else (p["run_py_frames"] + 1) * (s1 + 1.0 / old), run_py)
        for prec in p["precisions"]:
            if prec != p_stage:
                run_bare(prec)
        run_bare(p_stage, "other", only=b_stage)
        if p["compile"]:
            run_bare(p_stage, "compile", only=b_stage)
    return budget.result()
