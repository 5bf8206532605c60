import re

from tests.conftest import REPO


def _ci_command() -> str:
    lines = [l for l in (REPO / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert len(lines) == 1, lines
    return lines[0].strip()


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    commands = [l.strip() for b in blocks for l in b.splitlines()]
    assert _ci_command() in commands


def test_readme_first_command_runs_the_synthetic_preset():
    readme = (REPO / "README.md").read_text()
    first = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)[0]
    assert "dkp-pipeline run synthetic" in first and "pip install" in first
