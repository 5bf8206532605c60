"""`dkp-pipeline bench depth-precision`: what bf16 (and fp16) autocast costs in depth values against fp32.

Per model (random weights in the official layout with a calibrated head, as every depth bench: see
:func:`pipeline.bench.depth.random_midas_weights`), the same preprocessed frames (``--frames`` generated
``--size``-px JPEG-like frames) through the stage's own forward at fp32 and under autocast, then resized back
to the frame size as the stage stores them. Reported per precision:

- ``max_rel`` / ``mean_rel``: max |a - b| / max |b| and mean |a - b| / mean |b| of the stored depth (b: fp32);
- ``teacher_input_max_abs`` / ``teacher_input_mean_abs``: the same two maps after the teacher's per-frame
  min-max normalisation to [-1, 1] (``data.datasets.normalise_inverse_depth``), i.e. what the teacher trains on,
  in its units (the [-1, 1] range is 2 wide);
- ``finite``: whether every value under autocast was finite (the stage redoes a non-finite batch in fp32).

Random weights are not the released ones: their activations' ranges differ, so these numbers bound the
rounding of the architecture, not the released checkpoints' exact behaviour (docs/benchmarks.md says which
was run). On a CPU, bf16 autocast uses the CPU's bf16 kernels; fp16 is emulated (slow) and off by default.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

MODELS = ("dpt_levit_224", "dpt_swin2_tiny_256", "dpt_beit_base_384")


def case_depth_precision(p: dict) -> dict:
    import numpy as np
    import torch

    from dkp_core.midas import get_spec
    from dkp_core.midas.transforms import postprocess, preprocess_u8
    from pipeline.bench.depth import random_midas_weights, write_frames
    from pipeline.bench.harness import bench_device
    from pipeline.data.datasets import normalise_inverse_depth
    from pipeline.data.images import read_rgb
    from pipeline.stages.depth.compute import forward

    device = bench_device(p["device"])
    out = {}
    with tempfile.TemporaryDirectory(prefix="dkp-bench-precision-") as tmp:
        frames = write_frames(Path(tmp) / "images", p["frames"], p["size"], ext=".jpg", noise=32)
        imgs = [read_rgb(f) for f in frames]
        for mt in p["models"]:
            spec = get_spec(mt)
            x = torch.from_numpy(np.stack([preprocess_u8(im, spec) for im in imgs])).to(device)  # (n, 3, h, w)
            model = random_midas_weights(mt, x[:2].cpu(), Path(tmp) / f"{mt}.pt", device=device).eval()
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            bundle = (model, device, None)
            ref = postprocess(forward(bundle, x, None), imgs[0].shape[:2]).cpu()  # (n, H, W) float32
            for prec in p["precisions"]:
                got = postprocess(forward(bundle, x, getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[prec])),
                                  imgs[0].shape[:2]).cpu()
                d = (got - ref).abs()
                na = np.stack([normalise_inverse_depth(a) for a in got.numpy()])
                nb = np.stack([normalise_inverse_depth(b) for b in ref.numpy()])
                out[f"{mt}/{prec}"] = {
                    "max_rel": float(d.max() / ref.abs().max().clamp_min(1e-12)),
                    "mean_rel": float(d.mean() / ref.abs().mean().clamp_min(1e-12)),
                    "teacher_input_max_abs": float(np.abs(na - nb).max()),
                    "teacher_input_mean_abs": float(np.abs(na - nb).mean()),
                    "finite": bool(torch.isfinite(got).all()), "frames": len(imgs), "frame_size": p["size"]}
            del model
    return {"cases": out}


def bench_depth_precision(*, batch: int, size: int, steps: int, device, isolate: bool = True, models=MODELS,
                          frames: int = 4, precisions=None) -> dict:
    """The bench (module docstring); ``size``: the frames' side; ``batch``/``steps`` are unused."""
    from pipeline.bench.gpu import parse_list
    from pipeline.bench.harness import run_case

    models = parse_list(models, "models", str)
    precisions = list(precisions or (("bf16", "fp16") if device.type == "cuda" else ("bf16",)))
    res = run_case("depth_precision", {"device": str(device), "models": list(models), "frames": frames,
                                       "size": size, "precisions": precisions}, isolate=isolate, timeout=3600)
    return {"baseline": "fp32 forward of the same frames and weights", "cases": res["cases"], "ratios": {},
            "setup": {"models": list(models), "precisions": precisions, "frames": frames, "frame_size": size,
                      "weights": "random init, official layout, calibrated head (not the released checkpoints)"}}
