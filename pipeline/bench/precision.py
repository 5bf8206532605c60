"""`dkp-pipeline bench precision`: each preset's training precision against fp32 on this device (issue 23).

Built from the AutoLink step case of ``training.py`` and the trainer's rule for emulated dtypes
(:func:`pipeline.training.runtime.slow_amp_reason`).
"""
from __future__ import annotations

import contextlib
from typing import Optional

from pipeline.bench.harness import EnvVar, amp_name, compare, ratio, speed

# The ISA limits that make this CPU compute bf16 the way a CPU without bf16 units does (oneDNN's kernels and
# ATen's vectorised ones both capped at AVX2): how `bench precision` measures what the synthetic preset's bf16
# would cost on such a CPU. Effective only in a fresh process (isolate), read when torch loads.
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def bench_precision(*, batch: int, size: int, steps: int, device, isolate: bool = True,
                    presets: Optional[tuple] = None, vgg_size: Optional[int] = None) -> dict:
    """Each preset's training precision on this device against fp32 (issue 23's target: no CPU run of a preset
    slower than its fp32 step). Presets that share a step (width, reconstruction loss, amp) are timed once, at the
    preset's own batch and model size (at most ``batch`` and ``size``): the step in fp32 and in the preset's dtype,
    interleaved. What the trainer does with the preset here (:func:`pipeline.training.runtime.slow_amp_reason`):
    run it, or refuse it before any work; a refused dtype is still timed, at batch 2 at most (it is slow), to show
    what the refusal avoids. On a CPU with isolated cases the bf16
    steps are also timed with the ISA capped at AVX2 (:data:`AVX2_ONLY`), the cost on a CPU without bf16
    units, where the trainer refuses bf16. ``vgg_size``: the perceptual loss's input side (tests only)."""
    from pipeline.config import list_presets, load_config
    from pipeline.training.runtime import cpu_has_bf16, resolve_amp, slow_amp_reason

    groups: dict[tuple, dict] = {}
    verdicts: dict[str, dict] = {}
    for name in presets or tuple(list_presets()):
        t = load_config(name).teach
        amp = t.amp if t.amp != "auto" else amp_name(resolve_amp("auto", device))
        amp = {"off": "fp32"}.get(amp, amp)
        key = (t.model.width, t.recon_loss, amp)
        reason = slow_amp_reason(amp, device) if amp in ("bf16", "fp16") else None
        b, sz = min(batch, t.batch_size), min(size, t.model.image_size)
        g = groups.setdefault(key, {"label": f"w{t.model.width}-{t.recon_loss}", "presets": [], "amp": amp,
                                    "n_keypoints": t.model.n_keypoints, "batch": min(b, 2) if reason else b,
                                    "size": sz})
        g["presets"].append(name)
        verdicts[name] = {"amp": amp, "group": g["label"], "runs": "refused" if reason else amp,
                          **({"reason": reason} if reason else {})}
    cases: dict[str, dict] = {}
    ratios: dict[str, Optional[float]] = {}
    for (width, loss, amp), g in groups.items():
        base = {"device": str(device), "batch": g["batch"], "size": g["size"], "steps": steps, "width": width,
                "n_keypoints": g["n_keypoints"], "recon_loss": loss, "channels_last": True,
                **({"vgg_size": vgg_size} if vgg_size else {})}
        specs = {f"{g['label']}/fp32": ("autolink_step", base)}
        if amp != "fp32":
            specs[f"{g['label']}/{amp}"] = ("autolink_step", base | {"amp": amp})
        cases.update(compare(specs, steps=steps, isolate=isolate))
        if amp != "fp32":
            ratios[f"{g['label']} steps_per_s {amp}/fp32"] = ratio(speed(cases[f"{g['label']}/{amp}"]),
                                                                   speed(cases[f"{g['label']}/fp32"]))
        if device.type == "cpu" and amp == "bf16" and isolate:
            with contextlib.ExitStack() as env:
                for k, v in AVX2_ONLY.items():
                    env.enter_context(EnvVar(k, v))
                avx2 = compare({f"{n}/avx2": s for n, s in specs.items()}, steps=steps, isolate=True)
            cases.update(avx2)
            ratios[f"{g['label']} steps_per_s bf16/fp32 (ISA capped at AVX2)"] = ratio(
                speed(avx2[f"{g['label']}/bf16/avx2"]), speed(avx2[f"{g['label']}/fp32/avx2"]))
    goals = {}
    for name, v in verdicts.items():
        r = 1.0 if v["amp"] == "fp32" else ratios.get(f"{v['group']} steps_per_s {v['amp']}/fp32")
        value = None if v["runs"] == "refused" else r
        goals[f"{name}: the step this device runs / its fp32 step"] = {
            "goal": 1.0, "value": value, "met": v["runs"] == "refused" or (value is not None and value >= 1.0),
            "via": ("refused before training: " + v["reason"]) if v["runs"] == "refused" else f"runs {v['runs']}"}
    return {"baseline": "the same step in fp32", "cases": cases, "ratios": ratios, "goals": goals,
            "setup": {"presets": verdicts, "groups": {g.pop("label"): g for g in groups.values()},
                      "cpu_has_bf16": cpu_has_bf16(), "channels_last": True, "vgg_size": vgg_size or 224,
                      "avx2_env": AVX2_ONLY if device.type == "cpu" and isolate else None}}
