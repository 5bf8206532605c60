"""Experiment configuration: frozen dataclasses, layered.

Layers, later wins: package defaults (the dataclass defaults below, AutoLink's published values) ->
a named preset shipped in ``pipeline/presets/`` or an experiment YAML holding only the differences
(which may itself start from a preset with ``base: <preset>``) -> ``--set a.b=value`` overrides.
Unknown keys and type mismatches are :class:`~pipeline.errors.ConfigError` naming the key and the valid ones.

Which fields change results is decided in one place, :data:`NON_SEMANTIC`: everything else is part of
the artifact key of its stage.

One module a little over 450 lines on purpose: the sections, their valid values (CHOICES, RANGES) and the
layering that checks them are read together when a field is added.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.errors import ConfigError

# Fields that cannot change a stage's output bytes (or whose content enters the key another way,
# like weight files, which are keyed by their sha256). Matched by field name at any depth.
NON_SEMANTIC = frozenset(
    {
        "name",  # experiment label for humans
        "num_workers",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "device",
        "progress",
        "compile",  # torch.compile: same maths, different kernels
        "channels_last",  # memory format: same maths, different kernels
        "batch_size_inference",
        "weights",  # keyed by the file's sha256 instead of its path
        "vgg_weights",  # idem
        "shard_size",  # how frames are grouped into files, not their values
        "frame_cache",  # training frames pre-resized once: bit-identical samples (pipeline/data/framecache.py)
    }
)


@dataclass(frozen=True)
class DataConfig:
    manifest: str = "synthetic"  # data_manifests/<name>.yaml, or a path to a manifest YAML
    root: str = "data/synthetic"  # dataset root; relative paths resolve against the working directory
    # Built-in synthetic data: generated into `root` by `run` when it is missing.
    synth_frames: int = 600
    synth_seed: int = 0
    synth_image_size: int = 128
    # Consecutive frames sharing figure, clothes and walls (a "video clip"; 1 = every frame a new scene).
    synth_clip_length: int = 32
    # Videos (the folder layout's videos/): keep frames 0, k, 2k, ... of each video. Not in any key by itself: the
    # frames it keeps are (their ids and fingerprints), so a changed stride rebuilds exactly what reads frames.
    frame_stride: int = 1
    # The scene family drawn (docs/synthetic.md): figures (H36M-like humans, what the presets were tuned on) |
    # puppets (another figure model, joint set, clutter and lighting: the family recipes are validated on).
    synth_family: str = "figures"


@dataclass(frozen=True)
class DegradeConfig:
    """Worse depth for the teacher (the depth-quality study, docs/studies.md): applied to each map as the teacher
    reads it from the cache (teach, distill's teacher targets, eval's teacher), never to the cache itself, so it is
    in the teach key (only when set) and not the depth key. A pure function of (map, frame): a frame's noise and
    holes are the same every epoch, as a poor depth estimator's errors are. In order: downscale, blur, noise,
    quantise, holes. All zero (downscale 1) = the cache as it is."""

    downscale: float = 1.0  # >= 1: shrink the map by this factor (area) and enlarge it back (bilinear)
    blur: float = 0.0  # Gaussian blur, sigma as a fraction of the map's shorter side (0.02 = ~1 px at 48 px)
    noise: float = 0.0  # Gaussian noise, sd as a fraction of the frame's inverse-depth range (max - min)
    quantise: int = 0  # >= 2: round to this many levels over the frame's range; 0 = off
    holes: float = 0.0  # fraction of the map dropped (NaN: no reading) in square cells of 1/8 of its shorter side


@dataclass(frozen=True)
class DepthConfig:
    # midas: run MiDaS 3.1 | files: import depth maps named by the manifest | transformers: a local Hugging Face
    # depth-estimation folder in depth.weights (DPT, Depth Anything; the hf extra; pipeline/stages/depth/hf.py)
    provider: str = "midas"
    model_type: str = "dpt_beit_large_512"  # MiDaS 3.1 model (MiDaS README's highest-quality choice)
    weights: Optional[str] = None  # midas: the official .pt checkpoint for model_type; transformers: the model folder
    # auto: bf16 on CUDA (fp16 where the GPU has no bf16), fp32 on a CPU | fp32 | bf16 | fp16 (autocast). In the key:
    # auto is resolved first (pipeline/stages/depth/identity.py), so a CPU run keys as fp32, as before auto existed.
    precision: str = "auto"
    # auto: device on CUDA where nvJPEG decodes, cpu otherwise | cpu: decode + resize + normalise in the DataLoader
    # workers, run.py-identical (float64 cv2) | device: decode JPEGs on the model's device (nvJPEG on CUDA; other
    # formats on the CPU), resize + normalise there in float32 torch ops. device changes the values slightly
    # (docs/midas.md), so it is in the key; cpu is not (as before).
    preprocess: str = "auto"
    storage_dtype: str = "float16"  # float16 (+ per-frame scale) | float32
    shard_size: int = 1024  # frames per HDF5 shard: the unit of atomic writes and resume
    # frames per forward; None = auto: chosen from the GPU's free memory (at most 64) on CUDA, 8 on a CPU
    batch_size_inference: Optional[int] = None
    # DataLoader workers that read, decode and batch frames; None = auto: the cores but one (at most 16) on CUDA,
    # 2 on a CPU (whose cores the model needs)
    num_workers: Optional[int] = None
    compile: bool = False
    # fp32 on CUDA only: TF32 matmuls (torch.backends.cuda.matmul.allow_tf32; cuDNN convolutions use TF32 by
    # default). Faster on Ampere+, ~1e-3 relative error per matmul: in the key when true (midas, fp32).
    tf32: bool = False
    device: str = "auto"
    degrade: DegradeConfig = field(default_factory=DegradeConfig)


@dataclass(frozen=True)
class ModelConfig:
    n_keypoints: int = 16
    image_size: int = 128  # model resolution (AutoLink: 128)
    heatmap_size: int = 32  # soft-argmax grid; image_size / 4 in AutoLink's detector
    thick: float = 5e-4  # link Gaussian width in squared normalised units (sigma ~ 1 px at 128)
    sklr: float = 512.0  # learning-rate multiplier of the link weights
    mask_ratio: float = 0.8  # fraction of mask cells removed
    mask_blocks: int = 16  # mask grid is mask_blocks x mask_blocks
    width: int = 64  # base channel count of detector and decoder (AutoLink: 64); CPU presets use less
    # residual blocks added at the detector's S/16 bottleneck: a deeper detector (0 = AutoLink's; in the key only
    # when > 0). With width, what the architecture-pairs study varies (docs/studies.md).
    extra_blocks: int = 0


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 20001
    batch_size: int = 64  # global batch (split across DDP ranks)
    lr: float = 1e-4
    weight_decay: float = 1e-3
    seed: int = 0
    recon_loss: str = "perceptual"  # perceptual (VGG16, AutoLink) | l1ssim | l1 | mse (no weights needed)
    vgg_weights: Optional[str] = None  # VGG16 ImageNet weights; default: torchvision's cache
    hflip: Optional[bool] = None  # None = what the dataset manifest says AutoLink does
    depth_norm: str = "minmax"  # teacher input: per-frame min-max of inverse depth to [-1, 1]
    amp: str = "auto"  # auto | off | bf16 | fp16
    lr_schedule: str = "constant"  # constant (AutoLink) | cosine (to 0 at the last step)
    warmup_steps: int = 0  # linear warm-up before the schedule
    channels_last: bool = True  # NHWC memory format: same maths, faster convolutions
    # true: train on one CPU thread (and torch's deterministic algorithms on CUDA), so that a key gives the same
    # weights bit for bit whatever OMP_NUM_THREADS or the core count; false: torch's threads, whose float
    # reductions change order with the thread count (two two-thread runs of one key differ). In the key when true.
    deterministic: bool = False
    # a repeat of the same training (the run-to-run spread, `sweep --reruns`): changes nothing computed, only the
    # key (when > 0), so that a rerun really trains again instead of finding the first run's artifact fresh
    rerun: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    eval_every: int = 1000
    # DataLoader processes per rank; None = from the cores (training.settings.default_num_workers)
    num_workers: Optional[int] = None
    device: str = "auto"
    # decode, resize and normalise each training frame once into STORE/frame-cache/ (when a run draws at least an
    # epoch of samples); the same samples bit for bit, ~0.1 ms each instead of 1-2.5 ms (docs/training.md)
    frame_cache: bool = True


@dataclass(frozen=True)
class TeachConfig(TrainConfig):
    pass


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    gamma: float = 0.1  # weight of (1 - cos) between teacher and student embeddings
    layer: str = "logits"  # detector tensor distilled: logits (pre-softmax output layer) | heatmaps | down1..4 | up1..2
    # cosine over: sample (whole tensor) | keypoint (per map) | location (per pixel, over channels) | attention
    # (attention transfer: 1 - cos of the maps of channel-mean squared activations; any widths)
    flatten: str = "sample"
    # a learned 1x1 convolution from the student's layer channels to the teacher's, trained with the student and
    # stored in its model.pt: distils an intermediate layer between models of different widths (in the key when
    # true)
    adapter: bool = False
    teacher_cache: bool = True  # precompute teacher embeddings once when the teacher input is deterministic
    # the student's starting weights: scratch (random, the paper) | teacher_detector (the trained teacher's detector,
    # decoder and links random) | teacher (the whole trained teacher). Needs distill.model = teach.model; the
    # gamma = 0 baseline always starts from scratch (it must not see depth).
    init: str = "scratch"
    # + keypoint_weight * mean squared distance between the student's and the teacher's soft-argmax keypoints
    # (normalised [-1, 1] units), beside the gamma term and only with it (layer logits or heatmaps: the teacher's
    # keypoints are computed from that tensor). 0 = the paper's loss.
    keypoint_weight: float = 0.0


@dataclass(frozen=True)
class EvalConfig:
    protocol: str = "auto"  # auto = the manifest's protocol | h36m | taichi | deepfashion | l2
    # l2 only: none | dataset = score each frame against its closer left/right orientation, with the pairs of
    # ROOT/dataset.yaml left_right_pairs (or synthetic.left_right_pairs, where `synth` writes them: the synthetic
    # figures turn through 360 degrees, so the image's left arm is the figure's right one half of the time and
    # no linear map can tell them apart).
    flip_pairs: str = "none"
    # Also train the gamma = 0 RGB-only baseline (a second distill artifact, sharing depth and teach) and score it
    # beside the student and the teacher: the comparison the paper makes, in one `run`.
    baseline: bool = False
    batch_size_inference: int = 64
    device: str = "auto"


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    teach: TeachConfig = field(default_factory=TeachConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "depth.provider": ("midas", "files", "transformers"),
    "depth.precision": ("auto", "fp32", "bf16", "fp16"),
    "depth.preprocess": ("auto", "cpu", "device"),
    "depth.storage_dtype": ("float16", "float32"),
    "recon_loss": ("perceptual", "l1ssim", "l1", "mse"),
    "depth_norm": ("minmax",),
    "amp": ("auto", "off", "bf16", "fp16"),
    "lr_schedule": ("constant", "cosine"),
    "layer": ("logits", "heatmaps", "down1", "down2", "down3", "down4", "up1", "up2"),
    "flatten": ("sample", "keypoint", "location", "attention"),
    "data.synth_family": ("figures", "puppets"),
    "init": ("scratch", "teacher_detector", "teacher"),
    "eval.protocol": ("auto", "h36m", "taichi", "deepfashion", "l2"),
    "eval.flip_pairs": ("none", "dataset"),
}



@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field: ``low``/``high`` bounds (None = open), ``multiple_of``."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # True: low itself is not allowed
    multiple_of: Optional[int] = None
    why: str = ""

    def ok(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        if self.high is not None and v > self.high:
            return False
        return self.multiple_of is None or v % self.multiple_of == 0

    def text(self) -> str:
        parts = []
        if self.low is not None and self.high is not None:
            parts.append(f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]")
        elif self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.multiple_of:
            parts.append(f"a multiple of {self.multiple_of}")
        return " and ".join(parts) + (f" ({self.why})" if self.why else "")


# Valid values of numeric fields, matched like CHOICES (the dotted path, else the last name). Checked once
# the config is resolved (all layers applied), so that a bad value is a message naming the field, never
# a traceback deep in a stage or, worse, a silently different run (gamma < 0 used to train the baseline).
RANGES: dict[str, Range] = {
    "data.synth_frames": Range(2, why="at least one train and one test frame"),
    "data.synth_seed": Range(0),
    "data.synth_image_size": Range(16),
    "data.synth_clip_length": Range(1, why="1 = every frame a new scene"),
    "data.frame_stride": Range(1, why="1 = every frame of each video"),
    "shard_size": Range(1),
    "batch_size_inference": Range(1),
    "num_workers": Range(0),
    "n_keypoints": Range(2, why="the link map joins pairs of keypoints"),
    "image_size": Range(16, multiple_of=16, why="the detector halves it four times"),
    "heatmap_size": Range(4, why="must be image_size / 4"),
    "thick": Range(0, low_open=True),
    "sklr": Range(0, low_open=True),
    "mask_ratio": Range(0, 1, why="the fraction of mask cells removed"),
    "mask_blocks": Range(1, why="and at most image_size"),
    "width": Range(1),
    "steps": Range(1),
    "batch_size": Range(1),
    "lr": Range(0, low_open=True),
    "weight_decay": Range(0),
    "seed": Range(0),
    "checkpoint_every": Range(1),
    "log_every": Range(1),
    "eval_every": Range(0, why="0 = only at the end"),
    "warmup_steps": Range(0),
    "gamma": Range(0, why="0 = the AutoLink baseline"),
    "extra_blocks": Range(0),
    "rerun": Range(0, why="0 = the first run"),
    "depth.degrade.downscale": Range(1, why="1 = full resolution"),
    "depth.degrade.blur": Range(0),
    "depth.degrade.noise": Range(0),
    "depth.degrade.quantise": Range(0, why="0 = off; >= 2 levels"),
    "depth.degrade.holes": Range(0, 1, why="a fraction of the map"),
    "keypoint_weight": Range(0, why="0 = the paper's loss"),
}

# Experiment names become file names in the store (experiments/<name>.json): a safe character set only.
NAME_CHARS = "A-Za-z0-9._+=-"
NAME_RE = re.compile(f"[A-Za-z0-9_][{NAME_CHARS}]{{0,127}}")


def safe_name(text: str) -> str:
    """``text`` made a valid experiment name (default names come from YAML file names, which may hold spaces)."""
    out = re.sub(f"[^{NAME_CHARS}]", "_", text)[:128]
    return ("_" + out[1:]) if out[:1] in (".", "-", "+", "=", "") else out


def _walk_values(obj, prefix: str = ""):
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            yield from _walk_values(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", v


def validate(cfg: "ExperimentConfig") -> "ExperimentConfig":
    """Refuse values no stage can run with (ConfigError naming the field, its value and the valid range)."""
    import math

    if not NAME_RE.fullmatch(cfg.name):
        raise ConfigError(f"config field name: {cfg.name!r} is not a valid experiment name; use letters, digits "
                          f"and . _ + = - (at most 128, not starting with . - + =), e.g. --set name=my-run")
    for dotted, v in _walk_values(cfg):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config field {dotted}: {v!r} is not a finite number")
        rng = RANGES.get(dotted) or RANGES.get(dotted.split(".")[-1])
        if rng is not None and not rng.ok(v):
            raise ConfigError(f"config field {dotted}: {v!r} is out of range; valid: {rng.text()}")
    for section in ("teach", "distill"):
        m = getattr(cfg, section).model
        if m.heatmap_size != m.image_size // 4:
            raise ConfigError(f"config field {section}.model.heatmap_size: {m.heatmap_size} does not fit "
                              f"{section}.model.image_size={m.image_size}; valid: image_size / 4 = {m.image_size // 4}")
        if m.mask_blocks > m.image_size:
            raise ConfigError(f"config field {section}.model.mask_blocks: {m.mask_blocks} is out of range; valid: "
                              f"1 to image_size ({m.image_size})")
    if cfg.depth.degrade.quantise == 1:
        raise ConfigError("config field depth.degrade.quantise: 1 level would erase the map; valid: 0 (off) or >= 2")
    d = cfg.distill
    if d.keypoint_weight > 0 and d.layer not in ("logits", "heatmaps"):
        raise ConfigError(f"config field distill.keypoint_weight: {d.keypoint_weight} needs the teacher's keypoints, "
                          f"computed from distill.layer logits or heatmaps (got {d.layer}); set distill.layer: "
                          "heatmaps or distill.keypoint_weight: 0")
    return cfg


# ---------------------------------------------------------------------------------------------------
# presets


def list_presets() -> list[str]:
    files = resources.files("pipeline") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in files.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path: Path | str, what: str) -> dict:
    try:
        text = Path(path).read_text() if not hasattr(path, "read_text") else path.read_text()
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _preset_dict(name: str) -> dict:
    if name not in list_presets():
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(list_presets())}")
    return _read_yaml(resources.files("pipeline") / "presets" / f"{name}.yaml", "preset")


# ---------------------------------------------------------------------------------------------------
# merging and type checking


def _field_map(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(cls)}


def _resolve_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _coerce(value: Any, tp, dotted: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], dotted)
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif tp is str:
        word = "on" if value is True else "off" if value is False else None
        if word in _choices(dotted):  # YAML 1.1 reads off/on/no/yes as booleans: `amp: off` means the choice "off"
            value = word
        ok = isinstance(value, str)
    if not ok:
        name = getattr(tp, "__name__", str(tp))
        hint = " (YAML reads off/on/yes/no as booleans: quote the word)" if isinstance(value, bool) and tp is str else ""
        raise ConfigError(f"config field {dotted}: expected {name}, got {value!r} ({type(value).__name__}){hint}")
    return value


def _choices(dotted: str) -> tuple:
    return CHOICES.get(dotted) or CHOICES.get(dotted.split(".")[-1]) or ()


def _check_choice(dotted: str, value: Any) -> None:
    choices = _choices(dotted)
    if choices and value not in choices:
        raise ConfigError(f"config field {dotted}: {value!r} is not one of {', '.join(choices)}")


def _build(cls, data: dict, prefix: str, base):
    """Return ``cls`` built from ``base`` (an instance) updated with the mapping ``data``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<top>'}: expected a mapping, got {data!r}")
    fmap = _field_map(cls)
    unknown = sorted(set(data) - set(fmap))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (in {where}); valid keys: {', '.join(sorted(fmap))}"
        )
    kwargs = {}
    for name, f in fmap.items():
        current = getattr(base, name)
        if name not in data:
            kwargs[name] = current
            continue
        tp = _resolve_type(cls, f)
        if is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{prefix}{name}.", current)
        else:
            value = _coerce(data[name], tp, f"{prefix}{name}")
            if value is not None:
                _check_choice(f"{prefix}{name}", value)
            kwargs[name] = value
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"teach.lr=3e-4"`` -> (["teach", "lr"], 3e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"bad --set {text!r}: expected KEY=VALUE, e.g. --set teach.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"bad --set {text!r}: the key must be dotted names, e.g. teach.model.n_keypoints")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"bad --set {text!r}: value is not valid YAML ({e})") from None
    # YAML reads 3e-4 as a string (it wants 3.0e-4); users write floats the Python way.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and value.strip() not in ("", ".") else value
        except ValueError:
            pass
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict:
    out: dict = value
    for part in reversed(path):
        out = {part: out}
    return out


def _fix_yaml_floats(obj):
    """PyYAML reads ``1e-4`` (no dot) as a string; accept it as a float like Python does."""
    if isinstance(obj, dict):
        return {k: _fix_yaml_floats(v) for k, v in obj.items()}
    if isinstance(obj, str):
        try:
            if any(c in obj for c in "eE") and obj.strip()[0] in "0123456789.-+":
                return float(obj)
        except (ValueError, IndexError):
            pass
    return obj


def load_config(source: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> ExperimentConfig:
    """Resolve the layered config.

    ``source`` is a preset name (see :func:`list_presets`), a path to an experiment YAML, or None for the
    package defaults. An experiment YAML may start from a preset with a top-level ``base: <preset>``.
    """
    cfg = ExperimentConfig()
    default_name = "defaults"
    if source is not None:
        p = Path(source)
        if p.suffix in (".yaml", ".yml") or p.exists():
            data = _fix_yaml_floats(_read_yaml(p, "experiment config"))
            base = data.pop("base", None)
            if base is not None:
                cfg = _build(ExperimentConfig, _fix_yaml_floats(_preset_dict(base)), "", cfg)
            default_name = safe_name(p.stem)
            try:
                cfg = _build(ExperimentConfig, data, "", cfg)
            except ConfigError as e:
                raise ConfigError(f"{p}: {e}") from None
        else:
            data = _fix_yaml_floats(_preset_dict(source))
            base = data.pop("base", None)  # a preset may be another preset's variant (synthetic-puppets)
            if base is not None:
                cfg = _build(ExperimentConfig, _fix_yaml_floats(_preset_dict(base)), "", cfg)
            cfg = _build(ExperimentConfig, data, "", cfg)
            default_name = source
        if cfg.name == "experiment":
            cfg = dataclasses.replace(cfg, name=default_name)
    for text in overrides:
        path, value = parse_override(text)
        try:
            cfg = _build(ExperimentConfig, _nest(path, value), "", cfg)
        except ConfigError as e:
            raise ConfigError(f"--set {text}: {e}") from None
    return validate(cfg)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def semantic_dict(obj) -> dict:
    """The fields of a config section that change results (NON_SEMANTIC removed at every depth)."""

    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k not in NON_SEMANTIC}
        return d

    return strip(dataclasses.asdict(obj))


def to_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
