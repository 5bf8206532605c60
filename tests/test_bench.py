"""`dkp-pipeline bench` at tiny sizes (JSON record fields, ratios, -o appends) and docs/cli.md coverage.

Regenerate docs/cli.md from the CLI's --help texts with:  python -m tests.test_bench
"""
import io
import json
import math
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

ENV = {"OMP_NUM_THREADS": "1"}  # 2 shared cores: one intra-op thread is far faster under contention
TOP = {"bench", "time", "wall_s", "device", "device_name", "cpus", "torch_threads", "loadavg_1m", "torch", "batch",
       "size", "steps", "warmup_steps", "isolated", "baseline", "cases", "ratios", "setup"}


@pytest.fixture(autouse=True)
def _one_thread():
    from tests.conftest import torch_threads

    with torch_threads(1):
        yield


def _console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


def _check_record(rec, what, cases, ratios):
    assert TOP <= set(rec), TOP - set(rec)
    assert rec["bench"] == what and rec["device"] == "cpu"
    assert set(rec["cases"]) == set(cases), rec["cases"].keys()
    assert set(rec["ratios"]) == set(ratios), rec["ratios"].keys()
    for name, r in rec["ratios"].items():
        # a case may grow the process's peak memory by nothing at all (0 MiB): a memory ratio may be 0, a time never
        low_ok = name.startswith("peak_mem")
        assert r is None or (isinstance(r, float) and math.isfinite(r) and (r >= 0 if low_ok else r > 0)), (name, r)


def test_bench_teach_through_the_cli_appends_a_json_line(tmp_path):
    out = tmp_path / "bench.jsonl"
    out.write_text('{"earlier": 1}\n')
    r = run_cli(["bench", "teach", "--batch", "2", "--size", "16", "--steps", "1", "--device", "cpu", "-o", str(out)],
                env=ENV)
    assert r.returncode == 0, r.stderr + r.stdout
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"earlier": 1}  # appended, not overwritten
    rec = json.loads(lines[1])
    _check_record(rec, "teach", {"width16", "width64"},
                  {"steps_per_s width64/width16", "peak_mem_growth width64/width16"})
    assert rec["isolated"] is True and rec["batch"] == 2 and rec["size"] == 16 and rec["steps"] == 1
    w16, w64 = rec["cases"]["width16"], rec["cases"]["width64"]
    for c in (w16, w64):
        assert c["steps_per_s"] > 0 and c["mem_kind"] == "peak_rss" and c["peak_mem_mib"] >= c["peak_mem_growth_mib"]
    # the model really is AutoLink's width at K=16: ~7.7 M detector + ~18 M decoder
    assert 25 < w64["params_m"] < 26.5 and w16["params_m"] < w64["params_m"] / 8
    # speed ratios come from the interleaved run (both cases timed alternately in one process)
    for c in (w16, w64):
        i = c["interleaved"]
        assert i["steps_per_s"] > 0 and i["s_per_step_min"] <= i["s_per_step"] <= i["s_per_step_max"]
    assert rec["ratios"]["steps_per_s width64/width16"] == pytest.approx(
        w64["interleaved"]["steps_per_s"] / w16["interleaved"]["steps_per_s"], rel=1e-2)
    assert "ratio steps_per_s width64/width16" in r.stdout


def test_bench_teacher_cache(tmp_path):
    from pipeline.bench import bench_command

    out = tmp_path / "b.jsonl"
    rec = bench_command("teacher-cache", batch=2, size=16, steps=1, device="cpu", output=str(out), console=_console(),
                        isolate=False)
    _check_record(rec, "teacher-cache", {"live_teacher", "cached_embeddings"},
                  {"speedup cached/live", "target_s cached/live", "target share of a live step",
                   "peak_mem_growth cached/live"})
    assert all(c["target_s"] > 0 and c["s_per_step_min"] <= c["s_per_step"] <= c["s_per_step_max"]
               for c in rec["cases"].values())
    assert json.loads(out.read_text()) == json.loads(json.dumps(rec, sort_keys=True))
    assert rec["isolated"] is False and rec["setup"]["width"] == 64


def test_bench_train_step():
    """NCHW vs channels_last vs channels_last + bf16, the preset's model; the ratios are of the interleaved rates."""
    from pipeline.bench import bench_command

    rec = bench_command("train-step", batch=2, size=16, steps=1, device="cpu", output=None, console=_console(),
                        isolate=False)
    ratios = {f"{k} {a}" for a in ("channels_last/nchw", "channels_last_bf16/channels_last")
              for k in ("steps_per_s", "peak_mem_growth")}
    _check_record(rec, "train-step", {"nchw", "channels_last", "channels_last_bf16"}, ratios)
    c = rec["cases"]
    assert [c[n]["channels_last"] for n in ("nchw", "channels_last", "channels_last_bf16")] == [False, True, True]
    assert [c[n]["amp"] for n in ("nchw", "channels_last", "channels_last_bf16")] == ["off", "off", "bf16"]
    assert rec["setup"]["n_keypoints"] == 10 and rec["setup"]["width"] == 16
    assert rec["ratios"]["steps_per_s channels_last/nchw"] == pytest.approx(
        c["channels_last"]["interleaved"]["steps_per_s"] / c["nchw"]["interleaved"]["steps_per_s"], rel=1e-2)


def test_bench_side_by_side():
    """One process on 2 threads against 2 processes of 1 thread, timed over a common window, alternated; the
    ratio is of the medians of the rounds' total rates."""
    from pipeline.bench import bench_command
    from tests.conftest import torch_threads

    with torch_threads(2):  # one round here (the CLI's default: 2), each a fresh process per case
        rec = bench_command("side-by-side", batch=2, size=16, steps=2, device="cpu", output=None, console=_console(),
                            rounds=1)
    _check_record(rec, "side-by-side", {"one_process", "side_by_side"}, {"steps_per_s side_by_side/one_process"})
    one, two = rec["cases"]["one_process"], rec["cases"]["side_by_side"]
    assert (one["processes"], one["threads_each"], two["processes"], two["threads_each"]) == (1, 2, 2, 1)
    assert len(one["rounds_steps_per_s"]) == len(two["rounds_steps_per_s"]) == rec["setup"]["rounds"] == 1
    assert rec["ratios"]["steps_per_s side_by_side/one_process"] == pytest.approx(
        two["steps_per_s"] / one["steps_per_s"], rel=1e-3)
    assert rec["setup"]["amp"] == "bf16" and rec["setup"]["width"] == 16


def test_bench_recon_loss():
    """Every reconstruction loss in one training step; the perceptual case really runs VGG16 (random weights)."""
    from pipeline.bench import RECON_LOSSES, bench_command

    rec = bench_command("recon-loss", batch=2, size=16, steps=1, device="cpu", output=None, console=_console(),
                        isolate=False)
    ratios = {f"{k} {n}/l1ssim" for n in ("l1", "mse", "perceptual") for k in ("steps_per_s", "peak_mem_growth")}
    _check_record(rec, "recon-loss", set(RECON_LOSSES), ratios)
    assert rec["baseline"] == "l1ssim" and rec["setup"]["width"] == 16
    for name, c in rec["cases"].items():
        assert c["recon_loss"] == name and c["steps_per_s"] > 0 and c["interleaved"]["steps_per_s"] > 0
        # VGG16 up to relu4_3: 7,635,264 frozen parameters; the pixel losses have none
        assert c["loss_params_m"] == (7.635 if name == "perceptual" else 0.0)
    assert len({c["params_m"] for c in rec["cases"].values()}) == 1  # the same AutoLink in every case
    assert rec["ratios"]["steps_per_s perceptual/l1ssim"] == pytest.approx(
        rec["cases"]["perceptual"]["interleaved"]["steps_per_s"] / rec["cases"]["l1ssim"]["interleaved"]["steps_per_s"],
        rel=1e-2)


def test_bench_depth_bare_model_vs_stage_vs_run_py_loop():
    """(a) bare model, (b) the whole depth stage, (c) run.py's loop, on 4 tiny frames of the smallest model."""
    from pipeline.bench import DEPTH_GOALS, bench_command

    console = _console()
    rec = bench_command("depth", batch=2, size=24, steps=1, device="cpu", output=None, console=console,
                        isolate=False, model="dpt_levit_224", frames=4)
    ratios = {"frames_per_s stage/bare_model", "frames_per_s stage/run_py_loop", "frames_per_s stage_wall/bare_model"}
    _check_record(rec, "depth", {"bare_model", "stage", "run_py_loop"}, ratios)
    a, b, c = (rec["cases"][n] for n in ("bare_model", "stage", "run_py_loop"))
    assert a["frames"] == b["frames"] == c["frames"] == 4 and a["batch"] == b["batch"] == 2 and c["batch"] == 1
    assert all(x["frames_per_s"] > 0 and x["precision"] == "fp32" for x in (a, b, c))
    assert len(a["halves_frames_per_s"]) == len(c["halves_frames_per_s"]) == 2
    # the stage's rate is its own frame loop; its wall time also counts planning and loading, so is longer
    assert 0 < b["seconds_model"] <= b["seconds"] < b["wall_s"] and b["num_workers"] == 2 and b["cache_bytes"] > 0
    assert rec["ratios"]["frames_per_s stage/bare_model"] == pytest.approx(b["frames_per_s"] / a["frames_per_s"],
                                                                           rel=1e-2)
    assert rec["ratios"]["frames_per_s stage/run_py_loop"] == pytest.approx(b["frames_per_s"] / c["frames_per_s"],
                                                                            rel=1e-2)
    assert set(rec["goals"]) == set(DEPTH_GOALS["cpu"])
    for k, g in rec["goals"].items():
        assert g["goal"] == DEPTH_GOALS["cpu"][k] and g["met"] == (g["value"] >= g["goal"])
    setup = rec["setup"]
    assert setup["model_type"] == "dpt_levit_224" and setup["net_size"] == [224, 224]
    assert setup["frame_size"] == [24, 24]
    # the stage and the run.py loop computed the same depth (cache: float16 with a per-frame scale)
    assert setup["depth_std_last_frame"] > 0.1 and setup["stage_vs_run_py_max_rel_diff"] < 2e-3
    out = console.file.getvalue()
    assert "ratio frames_per_s stage/run_py_loop" in out and "goal frames_per_s stage/bare_model >= 0.9" in out


def test_bench_cli_passes_model_and_frames_to_depth_only(monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import main

    calls = []
    monkeypatch.setattr("pipeline.bench.bench_command", lambda what, **kw: calls.append((what, kw)))
    for args in (["depth", "--model", "dpt_swin2_tiny_256", "--frames", "12"], ["depth"], ["cache", "--frames", "3"]):
        r = CliRunner().invoke(main, ["bench", *args, "--device", "cpu"])
        assert r.exit_code == 0, r.output
    (w1, kw1), (w2, kw2), (w3, kw3) = calls
    assert (w1, kw1["model"], kw1["frames"], kw1["batch"]) == ("depth", "dpt_swin2_tiny_256", 12, 16)
    assert (kw2["model"], kw2["frames"]) == ("dpt_levit_224", 256)  # defaults: the smallest model
    assert w3 == "cache" and "model" not in kw3 and "frames" not in kw3 and kw3["size"] == 128


@pytest.mark.parametrize("model_type", ["dpt_levit_224", "dpt_swin2_tiny_256"])
def test_depth_bench_weights_are_in_the_official_layout(model_type):
    """The bench's random checkpoint has exactly the official file's keys and shapes (fixture specs), less
    the derived buffers and unused heads, and loads through the strict official-checkpoint loader."""
    from tests.conftest import SHARED

    spec_file = SHARED / "fixtures" / "midas" / f"{model_type}.spec.json"
    if not spec_file.is_file():
        pytest.skip(f"MiDaS fixtures absent: {spec_file}")
    import re

    import torch

    from dkp_core.midas import create_model, load_official_state_dict
    from dkp_core.midas.checkpoint import ignored_patterns
    from dkp_core.midas import official_layout_state_dict

    torch.manual_seed(0)
    model = create_model(model_type)
    sd = official_layout_state_dict(model, model_type)
    ignored = [re.compile(p) for p in ignored_patterns(model_type)]
    want = {k: tuple(shape) for k, shape, _, role in json.loads(spec_file.read_text())["keys"]
            if role == "generated" and not any(r.match(k) for r in ignored)}
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    other = create_model(model_type)
    load_official_state_dict(other, sd, model_type)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=0)


def test_bench_cache():
    from pipeline.bench import run_bench

    rec = run_bench("cache", batch=4, size=32, steps=2, device="cpu")
    _check_record(rec, "cache", {"npy_write", "npy_read", "cache_write", "cache_read"},
                  {"write frames_per_s cache/npy", "read frames_per_s cache/npy", "bytes cache/npy"})
    assert rec["setup"]["n_frames"] == 8
    assert rec["cases"]["npy_write"]["bytes"] > 8 * 32 * 32 * 4  # float32 payload + headers
    assert rec["cases"]["cache_read"]["max_rel_error"] < 1e-3  # float16 storage with per-frame scale


@pytest.mark.parametrize("kw, msg", [
    ({"what": "teach", "size": 40}, "multiple of 16"),
    ({"what": "teach", "batch": 0}, "--batch 0"),
    ({"what": "teacher-cache", "batch": 1, "size": 16}, "use --batch 2 or --size 32"),
    ({"what": "cache", "device": "tpu"}, "--device 'tpu'"),
    ({"what": "nope"}, "valid: teach, train-step, side-by-side, depth, depth-overlap, depth-precision, depth-writer, "
                       "cache, teacher-cache, recon-loss, gpu, precision, video"),
    ({"what": "side-by-side", "batch": 2}, "torch has 1 thread here"),  # the autouse fixture's one thread
    ({"what": "depth", "model": "dpt_tiny"}, "--model 'dpt_tiny': not a MiDaS 3.1 model; valid: "),
    ({"what": "depth", "batch": 4, "frames": 7}, "--frames 7: must be an integer >= 2 x --batch"),
])
def test_bad_bench_arguments_are_config_errors(kw, msg):
    from pipeline.bench import run_bench
    from pipeline.errors import ConfigError

    args = {"batch": 1, "size": 16, "steps": 1, "device": "cpu"} | kw
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
        run_bench(args.pop("what"), **args)


# --------------------------------------------------------------------------------------------------
# docs/cli.md


def _commands():
    """(path, click command) for every command of the CLI, groups included, depth first."""
    import click

    from pipeline.cli import main

    out = []

    def walk(cmd, path):
        out.append((path, cmd))
        if isinstance(cmd, click.Group):
            for name in sorted(cmd.commands):
                walk(cmd.commands[name], f"{path} {name}")

    walk(main, "dkp-pipeline")
    return out


def render_cli_doc() -> str:
    """docs/cli.md: each command's --help text, in a fixed order."""
    import click

    parts = ["# Command-line reference\n",
             "Generated from `dkp-pipeline ... --help` by `python -m tests.test_bench` (which rewrites this file);\n"
             "`tests/test_bench.py::test_cli_doc_lists_every_command_and_option` fails when a command or an option\n"
             "is missing here. Exit codes: 0 done, 2 a user error (the message names the file/field and the fix),\n"
             "130/143 training stopped by SIGINT/SIGTERM after a checkpoint (re-run to resume).\n"]
    for path, cmd in _commands():
        ctx = click.Context(cmd, info_name=path, terminal_width=100, max_content_width=100)
        parts.append(f"## {path}\n\n```\n{cmd.get_help(ctx)}\n```\n")
    return "\n".join(parts)


def test_cli_doc_lists_every_command_and_option():
    doc = (REPO / "docs" / "cli.md").read_text()
    sections = {}
    for chunk in doc.split("\n## ")[1:]:
        title, _, body = chunk.partition("\n")
        sections[title.strip()] = body
    fix = "regenerate docs/cli.md with `python -m tests.test_bench`"
    import click

    for path, cmd in _commands():
        assert path in sections, f"docs/cli.md has no section '## {path}'; {fix}"
        ctx = click.Context(cmd, info_name=path, terminal_width=100, max_content_width=100)
        assert cmd.get_usage(ctx) in sections[path], f"docs/cli.md: the usage line of {path!r} changed; {fix}"
        for param in cmd.params:
            for opt in (o for o in param.opts if o.startswith("--")):
                assert opt in sections[path], f"docs/cli.md section {path!r} does not mention {opt}; {fix}"


if __name__ == "__main__":
    (Path(REPO) / "docs" / "cli.md").write_text(render_cli_doc())
    print("wrote docs/cli.md")
