"""docs/architecture.md's map matches the tree: every package is on the map and every path on it exists."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _map_paths() -> set[str]:
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("## The map", 1)[1].split("```", 2)[1]
    paths, stack = set(), []  # (indent, path) of the enclosing folders
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m or not (m.group(2).endswith("/") or m.group(2).endswith(".py")):
            continue
        indent, name = len(m.group(1)), m.group(2).rstrip(",")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (stack[-1][1] if stack else "") + name
        paths.add(path.rstrip("/"))
        if name.endswith("/"):
            stack.append((indent, path))
    return paths


def test_every_package_is_on_the_map_and_every_mapped_path_exists():
    mapped = _map_paths()
    assert "pipeline/stages" in mapped and "dkp_core/midas/families" in mapped  # the parser reads nesting
    for p in mapped:
        assert (REPO / p).exists(), f"docs/architecture.md names {p}, which does not exist"
    packages = {str(d.parent.relative_to(REPO)) for top in ("pipeline", "dkp_core") for d in (REPO / top).rglob("__init__.py")}
    missing = sorted(p for p in packages if p not in mapped)
    assert not missing, f"packages not on docs/architecture.md's map: {missing}"
