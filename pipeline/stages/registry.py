"""The stage registry: the tuple of stages in the order data flows, and the lookups.

Each stage declares itself once, in its own folder (:class:`~.declaration.Stage` in
``pipeline/stages/<name>/__init__.py``; the manifest's in ``manifest.py``): name, schema version, upstream, typed
settings, key, what it reads, progress and help, beside the code that runs it. :data:`ENTRIES` adds the plan
entries that are another artifact of a registered stage (the gamma = 0 baseline). The plan
(:func:`pipeline.graph.build_plan`), the runner, ``status``, the report and the CLI's stage commands all iterate
these two tuples: a new stage is one folder plus one line in :data:`STAGES`.

Import-light on purpose (the declarations import config and dataclasses only; stage code, torch and the data
readers are imported when a stage runs or a key is derived), so ``dkp-pipeline --help`` stays instant.
"""
from __future__ import annotations

from pipeline import config as C
from pipeline.stages.declaration import Entry, Stage
from pipeline.stages.depth import DEPTH
from pipeline.stages.distill import BASELINE, DISTILL
from pipeline.stages.eval import EVAL
from pipeline.stages.manifest import MANIFEST
from pipeline.stages.teach import TEACH

STAGES: tuple[Stage, ...] = (MANIFEST, DEPTH, TEACH, DISTILL, EVAL)
ENTRIES: tuple[Entry, ...] = (BASELINE,)

_BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    """The registered stage ``name`` (KeyError naming the valid ones)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; registered: {', '.join(_BY_NAME)}") from None


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def label(entry: str) -> str:
    """What the report and status call plan entry ``entry`` (a stage's or an entry's label)."""
    for e in ENTRIES:
        if e.name == entry:
            return e.label or e.name
    return _BY_NAME[entry].title if entry in _BY_NAME else entry


def plan_entries(cfg: C.ExperimentConfig) -> list[tuple[str, Stage, C.ExperimentConfig]]:
    """(entry name, stage, config it runs with) of every plan entry of ``cfg``, in build order."""
    out = []
    for s in STAGES:
        out.append((s.name, s, cfg))
        out += [(e.name, stage(e.stage), e.config(cfg)) for e in ENTRIES if e.after == s.name and e.when(cfg)]
    return out
