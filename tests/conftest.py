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
