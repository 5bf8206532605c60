"""The stage registry (pipeline/stages/registry.py): one declaration per stage (in its own folder), iterated by
plan, runner, report and CLI."""
import pytest

from pipeline.stages import registry


def test_the_store_keys_each_stage_with_its_declared_schema():
    from pipeline.graph import build_plan  # noqa: F401 - the plan is what passes Stage.schema to the store
    from pipeline.store import artifacts

    for s in registry.STAGES:
        assert artifacts.key_inputs(s.name, {}, {}, None, schema=s.schema)["schema"] == s.schema, s.name
        before = artifacts.artifact_key(s.name, {}, {}, None, schema=s.schema)
        # the schema is part of the key: the same inputs under another version give another key
        assert artifacts.artifact_key(s.name, {}, {}, None, schema=s.schema + 1) != before, s.name
    with pytest.raises(TypeError, match="declared int version"):
        artifacts.artifact_key("teach", {}, {}, None, schema="2")


def test_each_stage_is_declared_in_its_own_folder():
    """A stage is one folder (its declaration in the folder's __init__, beside its run): the registry only lists
    them. The store below imports nothing from the stages."""
    import importlib
    import inspect

    for s in registry.STAGES:
        module = inspect.getmodule(s.run)
        assert module.__name__ in (f"pipeline.stages.{s.name}", "pipeline.stages.manifest"), (s.name, module.__name__)
        assert getattr(importlib.import_module(module.__name__), s.name.upper()) is s
    for name in ("artifacts", "io", "fingerprint", "memo", "checkpoint"):
        src = inspect.getsource(importlib.import_module(f"pipeline.store.{name}"))
        assert "pipeline.stages" not in src and "pipeline.data" not in src, name


def test_report_labels_and_trainings_come_from_the_declarations():
    assert [registry.label(n) for n in ("depth", "teach", "distill", "baseline", "eval")] == [
        "depth cache", "teacher (depth)", "student (RGB)", "baseline (RGB, gamma 0)", "eval"]
    assert [s.name for s in registry.STAGES if s.trains] == ["teach", "distill"]


def test_upstream_names_are_planned_before_their_readers():
    from pipeline.config import load_config

    cfg = load_config(None, ["eval.baseline=true"])
    order = [name for name, _, _ in registry.plan_entries(cfg)]
    assert order == ["manifest", "depth", "teach", "distill", "baseline", "eval"]
    for name, stage, _ in registry.plan_entries(cfg):
        for up in stage.upstream:
            assert order.index(up) < order.index(name), (name, up)
    no_baseline = [name for name, _, _ in registry.plan_entries(load_config(None))]
    assert "baseline" not in no_baseline


def test_baseline_entry_runs_distill_with_gamma_zero():
    from pipeline.config import load_config

    cfg = load_config(None, ["eval.baseline=true", "distill.gamma=0.3"])
    (_, stage, bcfg), = [e for e in registry.plan_entries(cfg) if e[0] == "baseline"]
    from pipeline.stages.distill import DISTILL

    assert stage is DISTILL and bcfg.distill.gamma == 0.0 and not bcfg.eval.baseline


def test_cli_has_one_command_per_stage_with_help():
    from pipeline.cli import main

    for s in registry.STAGES:
        if s.help is not None:
            assert main.commands[s.name].help.split("\n")[0] == s.help.split("\n")[0]
            assert "--dry-run" in [o for p in main.commands[s.name].params for o in p.opts]
    assert main.commands["manifest"].help.startswith("Dataset manifests")  # a group of its own, no stage command


def test_unknown_stage_names_the_registered_ones():
    import pytest

    with pytest.raises(KeyError, match="registered: manifest, depth, teach, distill, eval"):
        registry.stage("train")
