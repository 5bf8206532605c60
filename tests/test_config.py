import dataclasses

import pytest

from pipeline.config import (ExperimentConfig, NON_SEMANTIC, list_presets, load_config, parse_override,
                             semantic_dict)
from pipeline.errors import ConfigError
from tests.conftest import run_cli

PAPER_PRESETS = ("human36m", "human36m_wobg", "taichi", "deepfashion")


def test_presets_ship_and_load():
    assert {"synthetic", *PAPER_PRESETS} <= set(list_presets())
    for name in list_presets():
        cfg = load_config(name)
        assert cfg.name == name
    assert load_config("taichi").distill.gamma == 0.4
    assert load_config("human36m").distill.gamma == 0.1
    assert load_config("taichi").teach.model.n_keypoints == 10


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_pin_autolinks_fp16_and_the_default_stays_auto(name):
    from pipeline.stages.common import train_settings

    cfg = load_config(name)
    for section in (cfg.teach, cfg.distill):
        assert section.amp == "fp16" and train_settings(section).amp == "fp16"  # fp16 -> GradScaler (test_train)
    assert ExperimentConfig().teach.amp == ExperimentConfig().distill.amp == "auto"
    synthetic = load_config("synthetic")  # the CPU demo's validated recipe trains under bf16 (docs/results.md)
    assert synthetic.teach.amp == synthetic.distill.amp == "bf16"
    assert (synthetic.distill.layer, synthetic.distill.flatten) == ("heatmaps", "keypoint")  # validated likewise


def test_amp_off_as_the_docs_write_it(tmp_path):
    """`--set teach.amp=off` (README, the synthetic preset's comment) and `amp: off` in a YAML file: YAML 1.1
    reads the word as False, which is the choice "off" for a field that has it; elsewhere a named error."""
    cfg = load_config("synthetic", ["teach.amp=off", "distill.amp=off"])
    assert cfg.teach.amp == cfg.distill.amp == "off"
    y = tmp_path / "e.yaml"
    y.write_text("base: synthetic\nteach: {amp: off}\n")
    assert load_config(str(y)).teach.amp == "off"
    with pytest.raises(ConfigError, match=r"teach.recon_loss: expected str, got True .*quote the word"):
        load_config("synthetic", ["teach.recon_loss=yes"])


def test_the_background_removed_preset_reads_the_masked_variant():
    wobg, plain = load_config("human36m_wobg"), load_config("human36m")
    assert wobg.data.manifest == "human36m_wobg" and plain.data.manifest == "human36m"
    assert dataclasses.replace(wobg, name="x", data=plain.data) == dataclasses.replace(plain, name="x")


def test_layers_defaults_then_yaml_then_set(tmp_path):
    y = tmp_path / "exp.yaml"
    y.write_text("base: taichi\nteach:\n  lr: 2e-4\n  model: {thick: 1e-3}\n")
    cfg = load_config(str(y), ["teach.lr=3e-4", "distill.gamma=0"])
    assert cfg.name == "exp"
    assert cfg.teach.lr == 3e-4  # --set beats the YAML
    assert cfg.teach.model.thick == 1e-3  # YAML beats the preset
    assert cfg.teach.model.n_keypoints == 10  # preset beats the defaults
    assert cfg.teach.weight_decay == 1e-3  # package default
    assert cfg.distill.gamma == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.teach.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("teach.lrr=1", "unknown config key teach.lrr"),
        ("teach.lr=abc", "teach.lr: expected float"),
        ("teach.steps=1.5", "teach.steps: expected int"),
        ("nosuch.x=1", "unknown config key nosuch"),
        ("teach", "expected KEY=VALUE"),
        ("teach..lr=1", "dotted names"),
        ("distill.layer=foo", "not one of logits"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("synthetic", [override])
    assert fragment in str(e.value)


def test_unknown_key_lists_valid_keys(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("teach:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(y))
    msg = str(e.value)
    assert "bad.yaml" in msg and "teach.learning_rate" in msg and "lr" in msg and "weight_decay" in msg


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="valid presets: .*synthetic"):
        load_config("nope")


def test_parse_override_types():
    assert parse_override("teach.lr=3e-4") == (["teach", "lr"], 3e-4)
    assert parse_override("teach.hflip=true") == (["teach", "hflip"], True)
    assert parse_override("depth.weights=/a/b.pt") == (["depth", "weights"], "/a/b.pt")


def test_semantic_dict_drops_non_semantic_fields_only():
    s = semantic_dict(ExperimentConfig().teach)
    assert "num_workers" not in s and "log_every" not in s and "device" not in s
    assert s["lr"] == 1e-4 and s["model"]["n_keypoints"] == 16
    assert "workers" not in str(sorted(s))
    assert "teach.num_workers" in NON_SEMANTIC and "depth.num_workers" in NON_SEMANTIC


def test_each_field_is_described_once_by_its_full_path():
    """CHOICES, RANGES and NON_SEMANTIC come from the fields' metadata, by dotted path: a new field named like an
    old one (``seed``, ``weights``) gets no rule it did not declare."""
    import dataclasses

    from pipeline import config as C

    assert C.CHOICES["teach.recon_loss"] == C.CHOICES["distill.recon_loss"] == ("perceptual", "l1ssim", "l1", "mse")
    assert "recon_loss" not in C.CHOICES and "seed" not in C.RANGES and "weights" not in C.NON_SEMANTIC
    assert C.RANGES["distill.gamma"].ok(0) and not C.RANGES["distill.gamma"].ok(-0.1)
    assert "teach.gamma" not in C.RANGES  # teach has no gamma
    assert {"name", "depth.weights", "teach.vgg_weights", "eval.device"} <= C.NON_SEMANTIC
    assert "data.synth_seed" not in C.NON_SEMANTIC and "distill.teacher_cache" not in C.NON_SEMANTIC

    @dataclasses.dataclass(frozen=True)
    class Section:  # a section some later issue adds: its own field named seed has only the rules it declares
        seed: str = C.opt("a")
        weights: int = C.opt(3, valid=C.Range(1))

    assert C.semantic_dict(Section()) == {"seed": "a", "weights": 3}


def test_the_baseline_resets_what_its_fields_declare():
    """baseline_of resets exactly the fields that declare a baseline value: the student's recipe options, gamma and
    eval.baseline; the rest of the student's section (its schedule, its model) is the baseline's too."""
    from pipeline import config as C

    cfg = load_config("synthetic", ["distill.gamma=0.4", "distill.init=teacher", "distill.keypoint_weight=2",
                                    "distill.adapter=true", "distill.layer=heatmaps", "distill.steps=77",
                                    "eval.baseline=true"])
    b = C.baseline_of(cfg)
    assert (b.distill.gamma, b.distill.init, b.distill.keypoint_weight, b.distill.adapter) == (0.0, "scratch", 0.0,
                                                                                           False)
    assert (b.distill.steps, b.distill.layer, b.eval.baseline, b.teach) == (77, "heatmaps", False, cfg.teach)
    resets = {p for p, f in C.leaves() if "baseline" in f.metadata}
    assert resets == {"distill.gamma", "distill.init", "distill.keypoint_weight", "distill.adapter", "eval.baseline"}


def test_fields_added_later_stay_out_of_the_key_at_their_old_value():
    from pipeline import config as C

    t = C.TrainConfig()
    assert "deterministic" not in C.key_dict(t) and "rerun" not in C.key_dict(t)
    assert "extra_blocks" not in C.key_dict(t)["model"] and "extra_blocks" in C.semantic_dict(t)["model"]
    changed = C.key_dict(dataclasses.replace(t, deterministic=True, rerun=2))
    assert changed["deterministic"] is True and changed["rerun"] == 2
    unkeyed = {p for p, f in C.leaves() if "unkeyed_at" in f.metadata}
    assert {"teach.rerun", "distill.init", "distill.adapter", "distill.model.extra_blocks", "depth.tf32"} <= unkeyed


@pytest.mark.parametrize("path, module, registry, extra", [
    ("teach.recon_loss", "dkp_core.losses", "RECONSTRUCTION_LOSSES", ()),
    ("distill.layer", "dkp_core.keypoints", "FEATURE_NAMES", ()),
    ("distill.flatten", "dkp_core.losses", "DISTILLATION_FLATTENS", ()),
    ("eval.protocol", "pipeline.data.spec", "PROTOCOLS", ("auto",)),
])
def test_the_configs_choices_are_the_registries_names(path, module, registry, extra):
    """A name added to a registry (a loss, a detector layer, a flatten, a protocol) and not to the config's field,
    or the reverse, fails here (``extra``: the config's own choices, like the protocol's ``auto``)."""
    import importlib

    from pipeline import config as C

    assert sorted(C.CHOICES[path]) == sorted([*extra, *getattr(importlib.import_module(module), registry)])


def test_the_protocols_and_layouts_are_the_registries_names():
    from dkp_core.metrics import PROTOCOL_ALIASES, PROTOCOLS
    from pipeline.data.layouts import WALKERS
    from pipeline.data.spec import LAYOUTS
    from pipeline.data.spec import PROTOCOLS as MANIFEST_PROTOCOLS

    assert sorted(PROTOCOL_ALIASES) == sorted(MANIFEST_PROTOCOLS)
    assert set(PROTOCOL_ALIASES.values()) <= set(PROTOCOLS)
    assert sorted(WALKERS) == sorted(LAYOUTS)


def test_the_presets_name_only_known_midas_types():
    """depth.model_type has no fixed choices in the config (the files and transformers providers do not read it);
    the midas provider checks it against the MiDaS registry, the one list, which the presets must use."""
    from dkp_core.midas import list_models
    from pipeline import config as C

    for preset in C.list_presets():
        d = load_config(preset).depth
        assert d.provider != "midas" or d.model_type in list_models(), preset


@pytest.mark.parametrize("args", [["--set", "teach.lrr=1"], ["--set", "teach.lr=abc"], ["--set", "oops"]])
def test_cli_config_errors_exit_2(args, tmp_path):
    r = run_cli(["status", "synthetic", *args, "--store", str(tmp_path / "s")], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "error:" in r.stderr and "Traceback" not in r.stderr
