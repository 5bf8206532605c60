"""Shared fixtures and helpers: the tiny experiment (TINY_YAML, `tiny_experiment`, the module-scoped `tiny_store`
factory, `tiny_folder`), `run_cli`, `quiet_console`, `torch_threads` and `fingerprint_reads`."""
import contextlib
import io
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
# fp32 and the manifest's flips (none), not the preset's bf16 + distill flips: tests that want them ask for them
teach:
  model: {{n_keypoints: 4, image_size: 32, heatmap_size: 8, width: 8}}
  amp: auto
  steps: 6
  batch_size: 4
  checkpoint_every: 2
  log_every: 2
  eval_every: 3
distill:
  model: {{n_keypoints: 4, image_size: 32, heatmap_size: 8, width: 8}}
  amp: auto
  hflip: null
  layer: logits  # not the preset's heatmaps per keypoint map (tests that want them ask for them)
  flatten: sample
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


def quiet_console(width=None):
    """A rich Console writing into a StringIO (read it back with ``console.file.getvalue()``)."""
    from rich.console import Console

    return Console(file=io.StringIO(), width=width)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch uses ``n`` intra-op threads inside the block (the old count is restored after it)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def tiny_folder(tmp_path_factory, name: str, yaml: str = TINY_YAML, *, data: bool = False):
    """A new folder NAME holding ``tiny.yaml`` (``yaml`` with the data root ``NAME/data``, written first when
    ``data``: the 48 frames `dkp-pipeline synth ROOT --n 48 --size 32` writes), with DKP_CACHE_DIR in
    ``NAME/dkp-cache`` inside the block. Yields the folder."""
    from pipeline.data.synth import write_synthetic

    d = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DKP_CACHE_DIR", str(d / "dkp-cache"))
        if data:
            write_synthetic(d / "data", n=48, seed=0, image_size=32)
        (d / "tiny.yaml").write_text(yaml.format(root=d / "data"))
        yield d


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, request):
    """Factory for a module's tiny experiment, built in-process once per test module:
    ``tiny_store(overrides=(), *, yaml=TINY_YAML, build=True, **run_options)``.

    Makes a `tiny_folder` and (when ``build``) runs the pipeline on it in-process with ``overrides`` and
    ``run_options`` (those of ``run_pipeline``, e.g. ``until="teach"``). Returns a dict with ``dir``, ``yaml``
    (path), ``store`` (path) and ``plan`` (None when not built). From the first call to the end of the module
    torch uses one intra-op thread (2 shared cores: several times faster here) and DKP_CACHE_DIR stays in the
    folder.
    """
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    name = "tiny-" + request.module.__name__.rpartition(".")[2].removeprefix("test_")
    with contextlib.ExitStack() as module_lifetime:
        def make(overrides=(), *, yaml=TINY_YAML, build=True, **run_options):
            module_lifetime.enter_context(torch_threads(1))
            d = module_lifetime.enter_context(tiny_folder(tmp_path_factory, name, yaml))
            t = {"dir": d, "yaml": str(d / "tiny.yaml"), "store": str(d / "store"), "plan": None}
            if build:
                t["plan"] = run_pipeline(load_config(t["yaml"], list(overrides)), t["store"],
                                         console=quiet_console(), **run_options)
            return t

        yield make


@pytest.fixture
def fingerprint_reads(monkeypatch):
    """Base names of the files whose content pipeline.store.fingerprint reads, in order."""
    from pipeline.store import fingerprint as F

    seen = []
    real = F._read_and_digest

    def spy(path, **kw):
        seen.append(os.path.basename(path))
        return real(path, **kw)

    monkeypatch.setattr(F, "_read_and_digest", spy)
    return seen


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped, with the reason, where torch sees none (CI, the CPU VMs)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu): run in the device script on a GPU machine")
    for item in gpu_items:
        item.add_marker(skip)
