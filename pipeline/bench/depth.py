"""The depth cases: a MiDaS 3.1 model with random weights in the official layout, on generated frames.

``bench depth`` (:func:`case_depth_abc`) times (a) the stage's own model bundle and inference call
(:func:`~pipeline.stages.depth.compute.load_model`, :func:`~pipeline.stages.depth.compute.forward`) on batches preprocessed
beforehand, (b) the whole ``depth`` stage through ``run_pipeline``, (c) MiDaS run.py's per-frame loop; ``bench
gpu`` reuses the pieces (weights, frames, stage run, run.py loop). The random checkpoint is
:func:`dkp_core.midas.official_layout_state_dict` of a fresh model with a calibrated head, so the stage loads it
exactly as it loads a downloaded file.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from pipeline.bench.harness import BenchError, EnvVar, bench_device, sync

DEPTH_MODEL = "dpt_levit_224"  # the smallest MiDaS 3.1 model
DEPTH_FRAMES = 256
# Goals of issue 4 for the depth stage: stage/bare >= 0.9 (CPU) / 0.95 (GPU), stage/run.py >= 1.3 / 4.
DEPTH_GOALS = {"cpu": {"frames_per_s stage/bare_model": 0.9, "frames_per_s stage/run_py_loop": 1.3},
               "cuda": {"frames_per_s stage/bare_model": 0.95, "frames_per_s stage/run_py_loop": 4.0}}


def stage_precision(device) -> str:
    """The precision the depth benches run the stage at on ``device``: fp32 on a CPU, bf16 (fp16 without bf16) on CUDA."""
    import torch

    if device.type == "cpu":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _calibrate_head(model, x) -> None:
    """Random init makes MiDaS output all zeros (the last conv's output sits below its ReLU), which would
    make the cache compress to nothing. Rescale that conv so its pre-ReLU output on ``x`` (B, 3, h, w) has
    mean 2 and std 1, as the shared fixtures' weights do: depth maps that vary (values meaningless)."""
    import torch

    conv = [m for m in model.scratch.output_conv if isinstance(m, torch.nn.Conv2d)][-1]
    got = {}
    hook = conv.register_forward_hook(lambda mod, inp, out: got.update(out=out))
    with torch.no_grad():
        model.eval()(x)
        hook.remove()
        mean, std = float(got["out"].mean()), float(got["out"].std())
        conv.weight.div_(max(std, 1e-12))
        conv.bias.copy_(2.0 - (mean - conv.bias) / max(std, 1e-12))


def write_frames(folder: Path, n: int, size: int, ext: str = ".png", noise: int = 256) -> list[Path]:
    """``n`` distinct ``size`` x ``size`` RGB frames (gradients plus uniform noise of amplitude ``noise`` in one
    channel), like a small video folder; ``ext`` .png or .jpg (OpenCV's default quality 95)."""
    from concurrent.futures import ThreadPoolExecutor

    import cv2
    import numpy as np

    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size]
    paths = [folder / f"frame{k:06d}{ext}" for k in range(n)]

    def write(k: int) -> None:
        rng = np.random.default_rng(k)
        img = np.stack([(xx + k) % size * 255 // size, yy * 255 // size,
                        rng.integers(0, noise, (size, size)) + (256 - noise) // 2], -1)
        cv2.imwrite(str(paths[k]), img.astype(np.uint8))

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:  # cv2 encodes without the GIL
        list(pool.map(write, range(n)))
    return paths


def random_midas_weights(model_type: str, x, path: Path, device=None):
    """Random-init ``model_type`` (built on ``device``: fast on a GPU) with a calibrated head (on ``x``, (B, 3, h, w)),
    saved in the official layout at ``path``. Returns the model (eval mode, on ``device``)."""
    import torch

    from dkp_core.midas import create_model, official_layout_state_dict

    torch.manual_seed(0)
    model = create_model(model_type, device=device)
    _calibrate_head(model, x.to(next(model.parameters()).device))
    torch.save({k: v.cpu() for k, v in official_layout_state_dict(model, model_type).items()}, path)
    return model


def depth_config(root: Path, name: str, data_root: Path, model_type: str, weights: Path, **depth):
    """An experiment config over the folder dataset ``data_root`` with provider midas and ``depth`` settings."""
    from pipeline.config import load_config

    exp = root / f"{name}.yaml"
    exp.write_text(json.dumps({"name": name, "data": {"manifest": "folder", "root": str(data_root)},
                               "depth": {"provider": "midas", "model_type": model_type, "weights": str(weights),
                                         **depth}}))
    return load_config(str(exp))


def run_depth_stage(cfg, store: Path, n: int) -> tuple[dict, Path, float]:
    """``run_pipeline(only="depth")`` as `dkp-pipeline depth` runs it: (artifact.json, cache dir, wall seconds)."""
    import io as _io

    from rich.console import Console

    from pipeline.runner import run_pipeline

    t0 = time.perf_counter()
    run_pipeline(cfg, str(store), only="depth", until="depth", console=Console(file=_io.StringIO(), width=200))
    wall = time.perf_counter() - t0
    (cache,) = list((store / "depth").iterdir())
    rec = json.loads((cache / "artifact.json").read_text())
    if rec.get("n_valid") != n or rec["compute"]["frames"] != n:
        raise BenchError(f"bench depth: the stage wrote {rec.get('n_valid')} valid frames of {n}")
    return rec, cache, wall


def run_py_loop(model, spec, frames: list[Path], out: Path, device) -> float:
    """Seconds for MiDaS run.py's loop over ``frames``: cv2.imread, RGB / 255 (float64), resize + normalise,
    forward at batch 1 under ``no_grad`` in fp32, bicubic back to the frame size, ``np.save`` per frame."""
    import cv2
    import numpy as np
    import torch

    from dkp_core.midas.transforms import postprocess, preprocess

    sync(device)
    t0 = time.perf_counter()
    for q in frames:
        img = cv2.imread(str(q))
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB) / 255.0  # (H, W, 3) float64 in [0, 1]
        sample = torch.from_numpy(preprocess(img, spec)).to(device).unsqueeze(0)  # (1, 3, h, w)
        with torch.no_grad():
            pred = postprocess(model.forward(sample), img.shape[:2]).squeeze().cpu().numpy()  # (H, W)
        np.save(out / f"{q.stem}.npy", pred)
    sync(device)
    return time.perf_counter() - t0


def case_depth_abc(p: dict) -> dict:
    """The three depth cases on the same generated frames, in one process, in the order
    a1 c1 b c2 a2 (a, c: first and second half of the frames), so that a and c bracket b in time.

    (a) ``bare_model``: the stage's own forward (:func:`~pipeline.stages.depth.compute.forward`: same precision,
        memory format, device) on batches preprocessed beforehand and already on the device;
    (b) ``stage``: ``run_pipeline(only="depth")`` with provider midas on a folder manifest of the frames
        (DataLoader workers decode and preprocess, the background writer fills the HDF5 cache); rate from
        the stage's own frame loop (``compute.seconds`` in artifact.json), wall time kept too;
    (c) ``run_py_loop``: MiDaS run.py's loop: cv2.imread, RGB / 255, resize + normalise, forward at batch 1
        under ``no_grad`` in fp32, bicubic back to the frame size, ``np.save`` per frame.
    One untimed warm-up batch (a) and frame (c) first; kernels are then warm for all three cases.
    """
    import cv2
    import numpy as np
    import torch

    from dkp_core.midas import get_spec
    from dkp_core.midas.transforms import preprocess
    from pipeline.weights.midas import load_midas
    from pipeline.stages.depth import compute as D
    from pipeline.stages.depth.identity import resolve_auto

    device = bench_device(p["device"])
    mt, n, size, batch = p["model_type"], p["frames"], p["size"], p["batch"]
    spec = get_spec(mt)
    precision = stage_precision(device)

    with tempfile.TemporaryDirectory(prefix="dkp-bench-depth-") as tmp, EnvVar("DKP_CACHE_DIR", f"{tmp}/dkp-cache"):
        root = Path(tmp)
        paths = write_frames(root / "data" / "images", n, size)
        xs = np.stack([preprocess(cv2.cvtColor(cv2.imread(str(q)), cv2.COLOR_BGR2RGB) / 255.0, spec) for q in paths])
        weights = root / f"{mt}.pt"
        random_midas_weights(mt, torch.from_numpy(xs[:batch]), weights)
        cfg = depth_config(root, "bench-depth", root / "data", mt, weights, batch_size_inference=batch,
                           precision=precision, device=device.type)

        # (a): the stage's model bundle and forward, inputs preprocessed and on the device beforehand
        bundle = D.load_model(resolve_auto(cfg.depth), None)
        batches = [torch.from_numpy(xs[i:i + batch]).to(bundle[1]) for i in range(0, n, batch)]  # (B, 3, h, w)
        del xs
        D.forward(bundle, batches[0], bundle[2])  # warm-up
        # (c): run.py's model: fp32, default memory format (run.py's --optimize is off by default)
        model_c, _ = load_midas(mt, weights, device=device)
        out_c = root / "run_py_out"
        out_c.mkdir()

        def run_py(frames: list[Path]) -> float:
            return run_py_loop(model_c, spec, frames, out_c, device)

        def bare(bs: list) -> float:
            sync(device)
            t0 = time.perf_counter()
            for x in bs:  # queued back to back, one wait at the end: the model's own pace
                D.forward(bundle, x, bundle[2])
            sync(device)
            return time.perf_counter() - t0

        run_py(paths[:1])  # warm-up
        half_b, half_f = len(batches) // 2, n // 2
        a1, c1 = bare(batches[:half_b]), run_py(paths[:half_f])
        frames_a1 = sum(len(x) for x in batches[:half_b])

        # (b): the stage, as `dkp-pipeline depth` runs it
        rec, cache, b_wall = run_depth_stage(cfg, root / "store", n)
        comp = rec["compute"]
        cache_bytes = sum(f.stat().st_size for f in (cache / "shards").glob("*.h5"))

        c2, a2 = run_py(paths[half_f:]), bare(batches[half_b:])
        # the stage's values equal the run.py loop's (same weights; fp32 on CPU)
        from pipeline.depth_cache import DepthCacheReader

        with DepthCacheReader(cache) as r:
            k = n - 1
            got, want = r.read(k), np.load(out_c / f"{paths[k].stem}.npy")
            max_rel = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
            depth_std = float(want.std())

    fa = (frames_a1, n - frames_a1)
    fc = (half_f, n - half_f)
    return {
        "cases": {
            "bare_model": {"frames_per_s": n / (a1 + a2), "seconds": round(a1 + a2, 3), "frames": n,
                           "halves_frames_per_s": [round(fa[0] / a1, 3), round(fa[1] / a2, 3)],
                           "batch": batch, "precision": precision},
            "stage": {"frames_per_s": n / comp["seconds"], "seconds": comp["seconds"], "frames": n,
                      "frames_per_s_wall": n / b_wall, "wall_s": round(b_wall, 3),
                      "seconds_model": comp["seconds_model"],
                      "seconds_waiting_for_writer": comp["seconds_waiting_for_writer"],
                      "seconds_writing": comp["seconds_writing"], "fp32_fallbacks": comp["fp32_fallbacks"],
                      "num_workers": comp["num_workers"], "batch": batch, "precision": precision,
                      "cache_bytes": cache_bytes, "storage_dtype": cfg.depth.storage_dtype},
            "run_py_loop": {"frames_per_s": n / (c1 + c2), "seconds": round(c1 + c2, 3), "frames": n,
                            "halves_frames_per_s": [round(fc[0] / c1, 3), round(fc[1] / c2, 3)], "batch": 1,
                            "precision": "fp32"},
        },
        "setup": {"weights": "random init, official layout (torch.save of create_model's state dict, keys mapped)",
                  "order": "a1 c1 b c2 a2 (halves of the frames), after one warm-up batch (a) and frame (c)",
                  "stage_rate": "frames / compute.seconds (the stage's frame loop: DataLoader start to last shard "
                                "committed); wall_s also counts manifest, weights hash, model load, preview",
                  "stage_vs_run_py_max_rel_diff": max_rel, "depth_std_last_frame": depth_std},
    }
