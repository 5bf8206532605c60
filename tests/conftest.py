import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (fixtures live there)")
    return SHARED


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    # Fingerprint memos and stores never touch the user's home during tests.
    monkeypatch.setenv("DKP_CACHE_DIR", str(tmp_path_factory.mktemp("dkp-cache")))
    monkeypatch.delenv("DKP_STORE", raising=False)


def run_cli(args, cwd=None, env=None, timeout=600):
    """Run `python -m pipeline.cli ARGS` in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("COLUMNS", "200")
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


TINY_YAML = """\
base: synthetic
name: tiny
# 32-frame clips: what `dkp-pipeline synth` and write_synthetic make by default, so fixtures that prebuild the
# data with them match (the preset's 1 is checked against data.root by `run`)
data: {{root: {root}, synth_frames: 48, synth_seed: 0, synth_image_size: 32, synth_clip_length: 32}}
depth: {{shard_size: 16}}
teach:
  model: {{n_keypoints: 4, image_size: 32, heatmap_size: 8, width: 8}}
  steps: 6
  batch_size: 4
  checkpoint_every: 2
  log_every: 2
  eval_every: 3
distill:
  model: {{n_keypoints: 4, image_size: 32, heatmap_size: 8, width: 8}}
  steps: 6
  batch_size: 4
  checkpoint_every: 2
  log_every: 2
  eval_every: 3
eval: {{baseline: false}}  # the preset also trains the gamma = 0 baseline; tests that want it ask for it
"""


@pytest.fixture
def tiny_experiment(tmp_path):
    """A tiny experiment YAML over a 48-frame 32-px synthetic dataset (generated on first `run`).

    Returns a dict with ``yaml`` (path), ``store`` (path) and ``cwd``. Every stage runs in seconds.
    """
    root = tmp_path / "data"
    y = tmp_path / "tiny.yaml"
    y.write_text(TINY_YAML.format(root=root))
    return {"yaml": str(y), "store": str(tmp_path / "store"), "cwd": tmp_path, "root": root}
