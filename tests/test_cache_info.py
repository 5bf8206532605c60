import json
from pathlib import Path

from tests.conftest import run_cli


def test_cache_info_reports_frames_spec_and_size(tiny_experiment):
    exp = tiny_experiment
    r = run_cli(["run", exp["yaml"], "--store", exp["store"], "--until", "depth"], cwd=exp["cwd"])
    assert r.returncode == 0, r.stderr
    cache = next(Path(exp["store"], "depth").iterdir())
    r = run_cli(["cache", "info", str(cache), "--json"], cwd=exp["cwd"])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["frames"] == info["valid"] == 48 and info["shards"] == 3
    assert info["spec"]["provider"] == "files" and info["values"].startswith("relative inverse depth")
    assert info["key"].startswith(cache.name) and info["bytes"] > 0
    r = run_cli(["cache", "info", str(cache)], cwd=exp["cwd"])
    assert r.returncode == 0 and "spec.manifest_fingerprint" in r.stdout
    r = run_cli(["cache", "info", str(exp["cwd"])], cwd=exp["cwd"])
    assert r.returncode == 2 and "is not a depth cache" in r.stderr
