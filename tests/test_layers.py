"""The house's layers, read from the source (every import, lazy ones too, as the AST has them):
- no import circle between modules;
- ``pipeline/store/`` imports only itself and ``pipeline/errors.py``; ``dkp_core/`` only itself (pure torch);
- no module imports another module's private (``_name``) name;
- only ``pipeline/process.py`` reads torchrun's rank and world variables from the environment.
"""
import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOPS = ("pipeline", "dkp_core", "data_manifests")


def _modules() -> dict[str, Path]:
    mods = {}
    for top in TOPS:
        for p in (REPO / top).rglob("*.py"):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


MODULES = _modules()


def _imports(module: str, path: Path):
    """(line, imported module or module.name, the name or None) for each import of ``module``'s source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                yield node.lineno, f"{base}.{a.name}", a.name


def _owner(name: str):
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    g = defaultdict(set)
    for m, p in MODULES.items():
        for _, target, _ in _imports(m, p):
            owner = _owner(target)
            # a module's own package (its __init__) is where it lives, not a layer it depends on
            if owner and owner != m and not m.startswith(owner + "."):
                g[m].add(owner)
    return g


def _circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(set(g) | {w for ws in g.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert "pipeline.stages.depth.compute" in MODULES and len(MODULES) > 100
    g = _graph()
    assert "pipeline.store.artifacts" in g["pipeline.graph"]  # the reader sees imports (not vacuous)
    assert _circles(g) == []
    g["pipeline.store.io"].add("pipeline.graph")  # one arrow back up makes a circle the test would see
    assert _circles(g)


def test_the_circle_finder_finds_one():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_store_and_core_import_nothing_above_them():
    g = _graph()
    for m, targets in g.items():
        if m.startswith("pipeline.store"):
            above = sorted(t for t in targets if not t.startswith("pipeline.store") and t != "pipeline.errors")
            assert not above, f"{m} imports {above}: the store is the bottom floor (pipeline/errors.py beside it)"
        if m.startswith("dkp_core"):
            above = sorted(t for t in targets if not t.startswith("dkp_core"))
            assert not above, f"{m} imports {above}: dkp_core is pure torch, below the pipeline"


def test_no_module_imports_another_modules_private_name():
    bad = []
    for m, p in MODULES.items():
        for line, target, name in _imports(m, p):
            if name and name.startswith("_") and not name.startswith("__") and _owner(target):
                bad.append(f"{p.relative_to(REPO)}:{line} imports {name}")
    assert not bad, bad


def test_only_the_process_module_reads_rank_and_world_from_the_environment():
    env_read = re.compile(r"environ[^\n]*\b(LOCAL_RANK|RANK|WORLD_SIZE|LOCAL_WORLD_SIZE)\b"
                          r"|getenv\([\"'](LOCAL_)?(RANK|WORLD_SIZE)")
    readers = sorted(str(p.relative_to(REPO)) for p in MODULES.values() if env_read.search(p.read_text()))
    assert readers == [], readers  # process.py reads them through a name (env.get), which this pattern allows
    assert 'env.get("RANK"' in (REPO / "pipeline" / "process.py").read_text()
