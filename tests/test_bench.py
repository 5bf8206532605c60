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
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


def _check_record(rec, what, cases, ratios):
    assert TOP <= set(rec), TOP - set(rec)
    assert rec["bench"] == what and rec["device"] == "cpu"
    assert set(rec["cases"]) == set(cases), rec["cases"].keys()
    assert set(rec["ratios"]) == set(ratios), rec["ratios"].keys()
    for name, r in rec["ratios"].items():
        assert r is None or (isinstance(r, float) and math.isfinite(r) and r > 0), (name, r)


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


def test_bench_depth_one_model():
    from pipeline.bench import bench_command

    console = _console()
    rec = bench_command("depth", batch=2, size=16, steps=1, device="cpu", output=None, console=console,
                        isolate=False, models=("dpt_levit_224",))
    _check_record(rec, "depth", {"dpt_levit_224_b1", "dpt_levit_224_b2"}, {"dpt_levit_224 frames_per_s b2/b1"})
    assert rec["cases"]["dpt_levit_224_b1"]["net_size"] == [224, 224]
    assert all(c["frames_per_s"] > 0 and c["interleaved"]["frames_per_s"] > 0 for c in rec["cases"].values())
    assert "ratio dpt_levit_224 frames_per_s b2/b1" in console.file.getvalue()


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
    ({"what": "nope"}, "valid: teach, depth, cache, teacher-cache"),
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
