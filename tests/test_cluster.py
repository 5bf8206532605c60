"""Jobs through submitit (issue 26): a sweep and an array of depth shards as real processes (submitit's local
executor), what is done staying done on re-submission, and the Slurm parameters a job asks for."""
import json
import os
import stat
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from pipeline.cluster import JobOptions, make_executor  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from tests.conftest import TINY_YAML, quiet_console, torch_threads  # noqa: E402

LOCAL = JobOptions(executor="local", time_min=10)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    from pipeline.data.synth import write_synthetic

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs' torch threads: they run side by side on 2 cores
    write_synthetic(tmp_path / "data", n=48, seed=0, image_size=32, progress=False)
    y = tmp_path / "tiny.yaml"
    y.write_text(TINY_YAML.format(root=tmp_path / "data"))
    return {"yaml": str(y), "store": str(tmp_path / "store"), "dir": tmp_path}


def test_sweep_through_submitit_local_jobs_then_resubmit_skips_fresh(tiny):
    from pipeline.sweep import parse_axis, run_sweep

    axes = [parse_axis("distill.gamma=0.1,0.3")]
    c = quiet_console(width=200)
    res = run_sweep(tiny["yaml"], (), axes, None, tiny["store"], c, executor=LOCAL, output=str(tiny["dir"] / "t.md"))
    out = c.file.getvalue()
    assert out.count("submitted as job") == 2, out
    assert len(res["runs"]) == 2
    store = Path(tiny["store"])
    for row in res["runs"]:  # the table is what each job's eval wrote
        metrics = json.loads((store / "eval" / row["eval_key"][:16] / "metrics.json").read_text())
        assert row["student_value"] == metrics["student"]["value"]
    assert len(list((store / "teach").iterdir())) == 1  # the two jobs shared one teacher (one waited for it)
    logs = list((store / "jobs").glob("*_log.out"))
    assert len(logs) == 2
    c2 = quiet_console(width=200)
    again = run_sweep(tiny["yaml"], (), axes, None, tiny["store"], c2, executor=LOCAL)
    assert c2.file.getvalue().count("fresh, not submitted") == 2 and "submitted as job" not in c2.file.getvalue()
    assert [r["student_value"] for r in again["runs"]] == [r["student_value"] for r in res["runs"]]
    assert (tiny["dir"] / "t.md").read_text().startswith("| distill.gamma | runs |")


def test_depth_shard_array_equals_one_run_and_resumes(tiny, tmp_path):
    from pipeline.cluster import submit_depth_shards
    from pipeline.config import load_config
    from pipeline.depth_cache import DepthCacheReader
    from pipeline.runner import run_pipeline

    with torch_threads(1):  # the reference: one process, no shards
        ref = run_pipeline(load_config(tiny["yaml"]), str(tmp_path / "ref"), until="depth", console=quiet_console())
    # part 0 of 3 done here first: the submitted array resumes it (its shards are skipped), parts 1 and 2 run
    with torch_threads(1):
        run_pipeline(load_config(tiny["yaml"]), tiny["store"], until="depth", only="depth", console=quiet_console(),
                     stage_options={"shard": "0/3"})
    c = quiet_console(width=200)
    submit_depth_shards(tiny["yaml"], (), tiny["store"], 3, LOCAL, False, c)
    assert "3 shard jobs submitted" in c.file.getvalue() and "depth published" in c.file.getvalue()
    a, b = ref.stages["depth"].path, Path(tiny["store"]) / "depth" / ref.stages["depth"].key[:16]
    assert (b / "COMPLETE").exists()
    with DepthCacheReader(a) as ra, DepthCacheReader(b) as rb:
        assert len(ra) == len(rb) == 48
        for i in range(48):
            assert (ra.read(i) == rb.read(i)).all()
    c2 = quiet_console(width=200)
    submit_depth_shards(tiny["yaml"], (), tiny["store"], 3, LOCAL, False, c2)
    assert "nothing to submit" in c2.file.getvalue()


def test_slurm_parameters_and_no_slurm_here(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="--executor slurm: .*srun.*--executor local"):
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        make_executor(JobOptions(executor="slurm"), tmp_path, "x")
    bin_dir = tmp_path / "bin"  # a stand-in `srun` makes submitit build its Slurm executor (nothing is submitted)
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ.get("PATH", "/usr/bin"))
    ex = make_executor(JobOptions(executor="slurm", partition="gpu", time_min=90, gpus=2, cpus=8, mem_gb=32),
                       tmp_path, "dkp-sweep")
    p = ex._executor.parameters
    assert p["partition"] == "gpu" and p["time"] == 90 and p["gpus_per_node"] == 2 and p["cpus_per_task"] == 8
    assert p["job_name"] == "dkp-sweep" and p["mem"] == "32GB"
    assert (tmp_path / "jobs").is_dir()


def test_cli_wiring_and_no_slurm_exit_2(tiny, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import main

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no srun: not a Slurm login node
    r = CliRunner().invoke(main, ["depth", tiny["yaml"], "--store", tiny["store"], "--executor", "slurm",
                                  "--shards", "4", "--partition", "gpu", "--gpus", "1"])
    assert r.exit_code == 2 and "--executor local" in r.output + (r.stderr or ""), r.output
    r = CliRunner().invoke(main, ["depth", tiny["yaml"], "--store", tiny["store"], "--executor", "local",
                                  "--shard", "0/2"])
    assert r.exit_code == 2 and "drop --dry-run / --shard" in r.output
    r = CliRunner().invoke(main, ["sweep", tiny["yaml"], "--store", tiny["store"], "--seeds", "0", "--executor",
                                  "slurm"])
    assert r.exit_code == 2 and "srun" in r.output + (r.stderr or "")
