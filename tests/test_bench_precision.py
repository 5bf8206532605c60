"""`dkp-pipeline bench precision` on CPU at tiny sizes: every preset gets a verdict (its precision runs here, or is
refused before training) and a goal (no CPU run slower than its fp32 step); presets sharing a step are timed once."""
from __future__ import annotations

from tests.test_bench import _one_thread  # noqa: F401 - an autouse fixture


def _run(monkeypatch, bf16_units: bool, presets: tuple) -> dict:
    from pipeline.bench import run_bench
    from pipeline.training import runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: bf16_units)
    return run_bench("precision", batch=2, size=16, steps=1, device="cpu", isolate=False, presets=presets,
                     vgg_size=32)


def _goal(rec: dict, preset: str) -> dict:
    return rec["goals"][f"{preset}: the step this device runs / its fp32 step"]


def test_fp16_presets_are_refused_and_timed_once(monkeypatch):
    """On a CPU without bf16 units every preset is refused (fp16, bf16 emulated): the goal is met by refusing."""
    rec = _run(monkeypatch, False, ("human36m", "taichi", "synthetic"))
    verdicts = rec["setup"]["presets"]
    assert {p: v["runs"] for p, v in verdicts.items()} == dict.fromkeys(("human36m", "taichi", "synthetic"), "refused")
    assert set(rec["setup"]["groups"]) == {"w64-perceptual", "w16-l1ssim"}  # the paper presets share one step
    assert rec["setup"]["groups"]["w64-perceptual"]["presets"] == ["human36m", "taichi"]
    assert rec["setup"]["groups"]["w64-perceptual"]["batch"] == 2  # a refused dtype is timed at batch 2 at most
    assert set(rec["cases"]) == {"w64-perceptual/fp32", "w64-perceptual/fp16", "w16-l1ssim/fp32", "w16-l1ssim/bf16"}
    assert rec["cases"]["w64-perceptual/fp16"]["amp"] == "fp16" and rec["ratios"]["w64-perceptual steps_per_s fp16/fp32"] > 0
    assert set(rec["goals"]) == {f"{p}: the step this device runs / its fp32 step" for p in verdicts}
    for preset in verdicts:
        g = _goal(rec, preset)
        assert g["met"] is True and g["value"] is None and g["via"].startswith("refused before training"), preset
    assert "no bf16 units" in _goal(rec, "synthetic")["via"] and "emulated" in _goal(rec, "human36m")["via"]


def test_a_preset_that_runs_is_measured_against_fp32(monkeypatch):
    rec = _run(monkeypatch, True, ("synthetic",))
    assert rec["setup"]["presets"]["synthetic"]["runs"] == "bf16" and rec["cases"]["w16-l1ssim/bf16"]["amp"] == "bf16"
    g = _goal(rec, "synthetic")  # measured, met or not (a tiny step here says nothing about the preset's)
    assert g["value"] == rec["ratios"]["w16-l1ssim steps_per_s bf16/fp32"] > 0 and g["via"] == "runs bf16"
    assert g["met"] == (g["value"] >= 1.0)
