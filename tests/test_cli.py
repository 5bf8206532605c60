import subprocess
import sys

from tests.conftest import REPO, run_cli


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch','timm','h5py','cv2','numpy'))\n"
        "print('HEAVY', heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout


def test_help_lists_every_command():
    r = run_cli(["--help"])
    assert r.returncode == 0
    for cmd in ("depth", "teach", "distill", "eval", "run", "status", "cache", "manifest", "synth", "bench",
                "predict"):
        assert f"  {cmd} " in r.stdout, cmd


def test_every_subcommand_has_help():
    for cmd in ("depth", "teach", "distill", "eval", "run", "status", "synth", "bench", "predict"):
        r = run_cli([cmd, "--help"])
        assert r.returncode == 0 and "Usage:" in r.stdout, (cmd, r.stderr)
