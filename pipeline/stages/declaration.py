"""What a stage declares about itself: :class:`Stage` (and :class:`Entry`, another artifact of a stage), with the
two small types its key derivation speaks in (:class:`KeyParts`, :class:`KeyEnv`).

Each stage's folder declares one ``Stage`` in its ``__init__`` (``pipeline/stages/<name>/__init__.py``, or
``manifest.py``), beside the code that runs it; :mod:`.registry` is only the tuple of them. Import-light on purpose
(config and dataclasses only): the declarations are read by ``status`` and ``--help``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline import config as C


@dataclass(frozen=True)
class KeyParts:
    """What a stage's artifact key hashes besides its name and schema (:func:`pipeline.store.artifacts.artifact_key`)."""

    config: dict  # the semantic settings: every field that changes the output (config.semantic_dict)
    upstream: dict  # plan entry -> key of the artifact read
    fingerprint: Any  # "xxh3:..." or a dict of named parts (Stage.reads): the data read


@dataclass(frozen=True)
class KeyEnv:
    """What a key derivation may look at besides the stage's settings."""

    manifest: Any  # pipeline.data.manifest.Manifest
    synthetic: Optional[dict]  # the `synthetic` block of ROOT/dataset.yaml (pipeline.data.reads.synthetic_block)
    keys: dict  # plan entry -> key, for the entries planned before this one
    settings: dict  # plan entry -> typed settings, for the same entries

    def upstream(self, names: tuple[str, ...]) -> dict:
        """{entry: key} of ``names`` that are in the plan (an optional entry, the baseline, may be absent)."""
        return {n: self.keys[n] for n in names if n in self.keys}


@dataclass(frozen=True)
class Stage:
    name: str  # CLI command, store directory STORE/<name>/, plan entry
    schema: int  # bumped by hand when the meaning of the output changes (never derived from the git SHA)
    upstream: tuple[str, ...]  # plan entries whose artifacts it reads (and whose keys enter its key)
    section: str  # the config section saved beside the artifact (artifact.json "config")
    settings: Callable[[C.ExperimentConfig, Any], Any]  # (config, manifest) -> the typed settings it runs with
    key: Callable[[Any, KeyEnv], KeyParts]  # (settings, env) -> what its key hashes
    run: Callable[[Any], Any]  # (pipeline.execute.StageContext) -> extra artifact.json fields (or, if managed, bool)
    label: str = ""  # what the report and status call its artifact ("depth teacher"); default: the name
    trains: bool = False  # a training: its steps, curves and checkpoints are what the report shows
    # (manifest, synthetic block) -> the named parts of the data it reads, its key's fingerprint; `status` says which
    # part changed (pipeline.data.reads.describe). None: a stage whose key reads the data another way (depth).
    reads: Optional[Callable[[Any, Optional[dict]], dict]] = None
    help: Optional[str] = None  # docstring of its CLI command; None: no command of its own
    managed: bool = False  # True: writes and publishes its artifact itself (depth's multi-process protocol)
    followers_join: bool = True  # torchrun ranks > 0 run it too (in rank 0's directory); False: rank 0 only
    progress: Optional[Callable[[Path], Optional[str]]] = None  # "step 300/20001" of an interrupted artifact
    notes: Optional[Callable[[dict], Optional[str]]] = None  # what a finished artifact lacks, from its record
    # True: entries of it that do not read each other may be built side by side, one process each
    # (pipeline.jobs: a training's small convolutions use a CPU's cores better so than with all threads in one).
    side_by_side: bool = False
    # Damaged finished artifacts (issue 24). outputs: files every finished artifact has, checked for artifacts
    # published before artifact.json listed its files. integrity: (path, deep) -> [{"file", "problem"}], the
    # stage's own check beyond the file list (deep: checksums). repair: (path, damage) -> None, prepares a damaged
    # artifact for `run` to rebuild by resuming in it (default: delete the damaged files).
    outputs: tuple[str, ...] = ()
    integrity: Optional[Callable[[Path, bool], list]] = None
    repair: Optional[Callable[[Path, list], None]] = None

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Entry:
    """A plan entry that is another artifact of a registered stage, run with a derived config."""

    name: str
    stage: str
    after: str  # planned right after this entry
    when: Callable[[C.ExperimentConfig], bool]
    config: Callable[[C.ExperimentConfig], C.ExperimentConfig]
    label: str = ""  # what the report calls it ("RGB baseline (gamma = 0)")
