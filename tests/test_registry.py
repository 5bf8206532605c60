"""The stage registry (pipeline/stages/registry.py): one declaration per stage, iterated by plan, runner and CLI."""
from pipeline.stages import registry


def test_the_store_keys_each_stage_with_its_declared_schema():
    from pipeline.store import artifacts

    assert artifacts.SCHEMA_VERSIONS is registry.SCHEMA_VERSIONS  # one table, declared in the registry
    for s in registry.STAGES:
        assert artifacts.key_inputs(s.name, {}, {}, None)["schema"] == s.schema, s.name
        before = artifacts.artifact_key(s.name, {}, {}, None)
        # the schema is part of the key: the same inputs under another version give another key
        try:
            registry.SCHEMA_VERSIONS[s.name] = s.schema + 1
            assert artifacts.artifact_key(s.name, {}, {}, None) != before, s.name
        finally:
            registry.SCHEMA_VERSIONS[s.name] = s.schema


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
    assert stage is registry.DISTILL and bcfg.distill.gamma == 0.0 and not bcfg.eval.baseline


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
