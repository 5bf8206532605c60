import re

from tests.conftest import REPO


def _ci_command() -> str:
    """The last line of .ci/run: the tests, after whatever it installs first (the browser)."""
    lines = [l for l in (REPO / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    return lines[-1].strip()


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    commands = [l.strip() for b in blocks for l in b.splitlines()]
    assert _ci_command() in commands


def test_readme_first_command_runs_the_synthetic_preset():
    readme = (REPO / "README.md").read_text()
    first = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)[0]
    assert "dkp-pipeline run synthetic" in first and "pip install" in first


def test_shipped_files_name_no_absolute_path_outside_the_repository():
    # A user's checkout has no /work/...: point at the research notes or ../shared by a relative name.
    files = [p for d in ("pipeline", "dkp_core", "data_manifests", "docs") for p in (REPO / d).rglob("*")
             if p.suffix in (".py", ".md", ".yaml")] + [REPO / "README.md"]
    offenders = [str(p.relative_to(REPO)) for p in files if "/work/" in p.read_text()]
    assert offenders == []
