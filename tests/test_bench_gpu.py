"""`dkp-pipeline bench gpu` on CPU at tiny sizes: every case runs and lands in the record and the tables; the
budget skips (and records) what would overrun; bad options are named errors.

On CPU the suite runs fp32 only and without torch.compile by default (inductor compiles take minutes here); the
compile case is checked with the eager backend, as tests/test_depth_stage.py checks the stage's.
"""
from __future__ import annotations

import io
import json
import time

import pytest

from tests.conftest import run_cli
from tests.test_bench import ENV, _check_record, _console, _one_thread  # noqa: F401 - an autouse fixture


TINY = dict(batch=2, size=16, steps=1, device="cpu", models="dpt_levit_224", batches="1,2", frames=4, frame_sizes="32,40",
            workers=1, train_width=16, train_workers=1, vgg_size=32, data_frames=12)
SIZES = (32, 40)
PER_SIZE = {"data_side", "writer", "loader", "stage/{}/best", "stage/{}/defaults"}
MODEL_CASES = {"bare/fp32/b1", "bare/fp32/b2", "run_py_loop", "bare/fp32/b2/channels_last", "bare/fp32/b2/compile"} | {
    (c.format(fs) if "{}" in c else f"{c}/{fs}") for c in PER_SIZE for fs in SIZES}
TRAIN_CASES = {"teach/fp32", "teach/amp", "paper/fp32", "paper/fp16", "distill/live/fp32", "distill/live/amp",
               "distill/cached/fp32", "distill/cached/amp"}


def test_bench_gpu_suite_on_cpu(tmp_path, monkeypatch):
    import torch

    from pipeline.bench import bench_command

    compiled = []
    real_compile = torch.compile

    def eager_compile(model, **kw):
        compiled.append(type(model).__name__)
        return real_compile(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager_compile)
    out = tmp_path / "gpu.jsonl"
    console = _console()
    rec = bench_command("gpu", output=str(out), console=console, isolate=False, budget_s=600, compile=True, **TINY)
    m = "dpt_levit_224"
    ratios = {f"{m}/{fs} frames_per_s {r}" for fs in SIZES for r in (
        "stage_best/bare_model", "stage_defaults/bare_model", "stage_defaults/stage_best", "data_side/bare_model",
        "writer/bare_model")}
    ratios |= {f"{m}/40 frames_per_s stage_best/run_py_loop", f"{m} workers needed for the bare model",
               "teach steps_per_s amp/fp32", "paper steps_per_s fp16/fp32", "distill live steps_per_s amp/fp32",
               "distill cached steps_per_s amp/fp32", "distill fp32 steps_per_s cached/live",
               "distill amp steps_per_s cached/live", "data samples_per_s / paper fp16 samples_per_s",
               "trainer host reads per log interval (project code)"}
    _check_record(rec, "gpu", {f"{m}/{c}" for c in MODEL_CASES} | TRAIN_CASES | {"syncs", "data"}, ratios)
    assert compiled == ["MidasDpt"] and rec["budget"]["skipped"] == []
    c = rec["cases"]
    for name in MODEL_CASES - {f"data_side/{fs}" for fs in SIZES}:
        assert c[f"{m}/{name}"]["frames_per_s"] > 0, name
    bare = c[f"{m}/bare/fp32/b2"]
    assert bare["batch"] == 2 and bare["precision"] == "fp32" and bare["memory_format"] == "nchw" and bare["finite"]
    assert bare["tflops_per_s"] == pytest.approx(rec["setup"]["flops_per_frame"][m] * bare["frames_per_s"] / 1e12,
                                                 rel=1e-2)
    assert c[f"{m}/bare/fp32/b2/channels_last"]["memory_format"] == "channels_last"
    assert c[f"{m}/bare/fp32/b2/compile"]["compile"] is True and c[f"{m}/bare/fp32/b2/compile"]["compile_s"] > 0
    for fs in SIZES:
        # the data side: one worker's decode + preprocessing, the old and the new CPU path give the same bits
        ds = c[f"{m}/data_side/{fs}"]
        assert ds["cpu_new_equals_old"] is True and ds["frames"] == 4 and ds["frame_size"] == [fs, fs]
        assert ds["cpu_frames_per_s_per_worker"] > 0 and ds["device_frames_per_s"] > 0
        assert 0 < ds["device_vs_cpu_depth_fp32"]["max_rel"] < 1e-3 and ds["device_vs_cpu_depth_fp32"]["mean_rel"] < 1e-4
        # the ceilings: the stage's DataLoader alone, the writer alone
        assert c[f"{m}/loader/{fs}"]["frames"] == 4 and c[f"{m}/loader/{fs}"]["num_workers"] == 1
        assert c[f"{m}/writer/{fs}"]["frame_size"] == fs and c[f"{m}/writer/{fs}"]["bytes_per_frame"] > 0
        # the stage at its best settings and at the user's defaults (on a CPU: fp32, cpu preprocessing, batch 8,
        # 2 workers), each with what held it back, its waits per batch and why there is no GPU utilisation
        sb, sd = c[f"{m}/stage/{fs}/best"], c[f"{m}/stage/{fs}/defaults"]
        assert (sb["batch"], sb["num_workers"], sb["preprocess"]) == (2, 1, "cpu") and sb["frames"] == 4
        assert (sd["batch"], sd["num_workers"], sd["precision"], sd["preprocess"]) == (8, 2, "fp32", "cpu")
        assert sb["limit"] and sb["fetches_per_batch"] == 1 and 0 < sb["seconds_model"] <= sb["seconds"]
        assert sb["gpu_utilisation"] == {"unavailable": "not a CUDA device"} and sb["lane"] == "host"
        assert rec["ratios"][f"{m}/{fs} frames_per_s stage_best/bare_model"] == pytest.approx(
            sb["frames_per_s"] / bare["frames_per_s"], rel=1e-2)
        lim = rec["limits"][f"{m}/{fs}"]
        assert set(lim["ceilings_frames_per_s"]) == {"model", "data side", "writer"}
        assert lim["lowest"] in lim["ceilings_frames_per_s"] and lim["stage_best_says"] == sb["limit"]
    assert c[f"{m}/run_py_loop"]["batch"] == 1 and c[f"{m}/run_py_loop"]["frames"] == 2
    assert c[f"{m}/run_py_loop"]["frame_size"] == 40
    # training (at width 16 here for time; the CLI always runs AutoLink's 64); AMP on CPU = bf16 autocast, the
    # paper's step fp16 + GradScaler (emulated on a CPU, hence VGG at 32 px here instead of 224)
    for name in TRAIN_CASES:
        t = c[name]
        assert t["interleaved"]["steps_per_s"] > 0 and t["channels_last"] is True
        want = "fp16" if name == "paper/fp16" else "bf16" if name.endswith("amp") else "off"
        assert t["amp"] == want, name
        assert t["host_reads_project"] == 0, name  # the stages' step functions read nothing back
    assert c["paper/fp16"]["recon_loss"] == "perceptual" and 7 < c["paper/fp16"]["loss_params_m"] < 8  # VGG16 to relu4_3
    assert 1 < c["teach/fp32"]["params_m"] < 2 and rec["setup"]["train"]["width"] == 16
    assert all(c[f"distill/{mode}/fp32"]["target_s"] > 0 for mode in ("live", "cached"))
    assert c["distill/cached/fp32"]["workers"] == 0
    # the trainer's loop: one host read per log interval; the data side through the trainer's DataLoader
    sy = c["syncs"]
    assert sy["steps"] == 8 and sy["log_every"] == 4 and sy["host_reads_project"] == 2
    assert sy["host_reads_project_per_step"] == {"3": 1, "7": 1} and sy["host_reads_per_log_interval"] == 1.0
    assert c["data"]["samples_per_s"] > 0 and c["data"]["workers"] == 1 and c["data"]["batch"] == 2
    assert rec["ratios"]["data samples_per_s / paper fp16 samples_per_s"] > 0
    # goals on CPU: the depth ratios of issue 4 and the trainer's host reads (issue 23), met or not
    assert set(rec["goals"]) == {f"{m}/{fs} frames_per_s stage/bare_model" for fs in SIZES} | {
        f"{m}/40 frames_per_s stage/run_py_loop", "trainer host reads per log interval (project code)"}
    assert rec["goals"]["trainer host reads per log interval (project code)"]["met"] is True
    # the budget log: every case with its estimate (None for a part's first case of a kind) and its time
    log = rec["budget"]["log"]
    assert {(r["part"], r["case"]) for r in log} == {(m, n) for n in MODEL_CASES} | {
        ("train", n) for n in ("teach", "paper", "distill", "syncs", "data")}
    assert all(r["actual_s"] >= 0 for r in log) and any(r["estimate_s"] for r in log)
    assert 0 < rec["budget"]["estimate_lower_bound_s"] and rec["budget"]["actual_s"] <= rec["wall_s"] + 1
    # one JSON line, and the tables beside it
    assert json.loads(out.read_text()) == json.loads(json.dumps(rec, sort_keys=True))
    md = (tmp_path / "gpu.md").read_text()
    for title in ("bare model", "depth stage: ceilings", "depth stage vs MiDaS run.py's loop", "data side alone",
                  "training steps/s",
                  "ratios and goals", "budget: estimate vs actual"):
        assert title in md, title
    assert "| bare/fp32/b2/compile | fp32 | 2 |" in md and "| teach/amp | bf16 |" in md
    assert "| paper/fp16 | fp16 | perceptual |" in md and "the trainer's loop and its data side" in md
    text = console.file.getvalue()
    assert "bench gpu: 1 model(s)" in text and "estimated >= " in text and "tables written to" in text


def test_budget_skips_and_records_what_would_overrun():
    from pipeline.bench.gpu import Budget

    b = Budget(time.time() + 5)
    assert b.run("first", None, lambda: {"x": 1}) == {"x": 1}  # no estimate yet: runs while time is left
    assert b.run("too long", 60.0, lambda: pytest.fail("must not run")) is None
    assert b.run("fits", 0.5, lambda: {"y": 2}) == {"y": 2}
    err = b.run("fails", 0.1, lambda: (_ for _ in ()).throw(RuntimeError("CUDA out of memory. Tried ...")))
    assert err == {"error": "RuntimeError: CUDA out of memory. Tried ..."}
    assert [r["case"] for r in b.log] == ["first", "too long", "fits", "fails"]
    assert b.log[1]["skipped"] == "budget" and b.log[1]["estimate_s"] == 60.0 and "actual_s" not in b.log[1]
    assert b.log[3]["error"].startswith("RuntimeError") and b.log[2]["actual_s"] >= 0
    late = Budget(time.time() - 1)
    assert late.run("any", None, lambda: pytest.fail("must not run")) is None and late.log[0]["skipped"] == "budget"


def test_a_killed_part_hands_back_what_it_finished(tmp_path):
    """Every row and result goes to the progress file as it happens; _recover reads it (a half-written last line
    included) and adds the error, so a part killed past its deadline loses only its running case."""
    import subprocess

    from pipeline.bench.gpu import Budget, _recover

    progress = tmp_path / "part.jsonl"
    b = Budget(time.time() + 60, str(progress))
    b.keep({"bare/fp32/b1": b.run("bare/fp32/b1", None, lambda: {"frames_per_s": 3.0})})
    b.run("stage/cpu", 600.0, lambda: pytest.fail("must not run"))
    with open(progress, "a") as f:
        f.write('{"cases": {"bare/fp32/b8": {"frames_')  # killed while writing
    got = _recover(progress, subprocess.TimeoutExpired(["python"], 61))
    assert got["cases"] == {"bare/fp32/b1": {"frames_per_s": 3.0}}
    assert [r["case"] for r in got["log"]] == ["bare/fp32/b1", "stage/cpu", "(part)"]
    assert got["log"][1]["skipped"] == "budget" and got["log"][2]["error"].startswith("TimeoutExpired")
    assert _recover(tmp_path / "never-started.jsonl", RuntimeError("x"))["cases"] == {}


def test_tiny_budget_skips_the_parts_and_says_so():
    """Isolated, as the CLI runs it (a fresh process per part): with no time left each part skips everything."""
    from pipeline.bench import run_bench

    rec = run_bench("gpu", isolate=True, budget_s=0.01, **TINY)
    assert rec["cases"] == {} and rec["ratios"]["teach steps_per_s amp/fp32"] is None
    assert rec["budget"]["skipped"] == ["train: teach", "train: paper", "train: distill", "train: syncs", "train: data",
                                        "dpt_levit_224: (all cases)"]
    assert all(not g["met"] for g in rec["goals"].values())


@pytest.mark.parametrize("kw, msg", [
    ({"models": "dpt_tiny"}, "--models: 'dpt_tiny' is not a MiDaS 3.1 model; valid: "),
    ({"models": ""}, "--models '': expected a comma-separated list"),
    ({"batches": "8,x"}, "--batches '8,x': expected a comma-separated list"),
    ({"batches": "0,8"}, "--batches 0,8: batch sizes must be >= 1"),
    ({"frames": 1}, "--frames 1: must be an integer >= 2"),
    ({"frame_sizes": "128,8"}, "--frame-sizes 8: must be an integer >= 16"),
    ({"budget_s": 0}, "--budget-s 0: must be a number of seconds > 0"),
    ({"size": 40}, "multiple of 16"),
])
def test_bad_gpu_bench_arguments_are_config_errors(kw, msg):
    from pipeline.bench import run_bench
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
        run_bench("gpu", isolate=False, **(TINY | kw))


def test_cli_gpu_defaults_and_options(monkeypatch):
    """Without --batch / --frames the suite trains at AutoLink's batch 64 and runs 512 frames; the gpu-only
    options reach the suite; a bad one exits 2 with the message, no traceback."""
    from click.testing import CliRunner

    from pipeline.cli import main

    calls = []
    monkeypatch.setattr("pipeline.bench.bench_command", lambda what, **kw: calls.append((what, kw)))
    for args in (["gpu"], ["gpu", "--batch", "8", "--frames", "16", "--models", "dpt_levit_224", "--batches", "1,4",
                           "--frame-sizes", "64", "--budget-s", "30"]):
        r = CliRunner().invoke(main, ["bench", *args, "--device", "cpu"])
        assert r.exit_code == 0, r.output
    (_, d), (_, g) = calls
    assert (d["batch"], d["size"], d["frames"], d["budget_s"], d["frame_sizes"]) == (64, 128, 512, 300.0,
                                                                                      "128,256,1000")
    assert d["models"] == "dpt_levit_224,dpt_swin2_tiny_256,dpt_beit_base_384,dpt_beit_large_512"
    assert d["batches"] == "1,8,32,64"
    assert (g["batch"], g["frames"], g["models"], g["batches"], g["frame_sizes"], g["budget_s"]) == (
        8, 16, "dpt_levit_224", "1,4", "64", 30.0)
    r = run_cli(["bench", "gpu", "--device", "cpu", "--models", "nope", "--budget-s", "5"], env=ENV)
    assert r.returncode == 2 and "'nope' is not a MiDaS 3.1 model" in r.stderr and "Traceback" not in r.stderr
