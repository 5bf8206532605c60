"""Experiment configuration: frozen dataclasses, layered.

Layers, later wins: package defaults (the dataclass defaults below, AutoLink's published values) ->
a named preset shipped in ``pipeline/presets/`` or an experiment YAML holding only the differences
(which may itself start from a preset with ``base: <preset>``) -> ``--set a.b=value`` overrides.
Unknown keys and type mismatches are :class:`~pipeline.errors.ConfigError` naming the key and the valid ones.

Each field is described once, where it is declared (:func:`opt`): its valid strings or numeric range, whether it
can change an output (a non-semantic field is in no artifact key), the value the gamma = 0 baseline resets it to,
and the value at which it stays out of its stage's key (a field added after artifacts existed, so that they keep
their keys). :data:`CHOICES`, :data:`RANGES`, :data:`NON_SEMANTIC`, :func:`semantic_dict`, :func:`key_dict` and
:func:`baseline_of` are derived from that, by each field's full dotted path.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from pipeline.errors import ConfigError


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


_UNSET = object()


def opt(default: Any, *, choices: tuple = (), valid: Optional[Range] = None, semantic: bool = True,
        baseline: Any = _UNSET, unkeyed_at: Any = _UNSET) -> Any:
    """A config field and the facts about it, in its metadata.

    - ``choices``: the valid strings (checked as each layer is applied);
    - ``valid``: the numeric :class:`Range` (checked once all layers are applied, so a bad value is a message
      naming the field, never a traceback deep in a stage or a silently different run);
    - ``semantic=False``: it cannot change a stage's output bytes (or its content enters the key another way, as
      weight files do, by their sha256): in no artifact key;
    - ``baseline``: the value the gamma = 0 baseline resets it to (a student-only option must not reach the
      baseline, which must not learn from the depth teacher);
    - ``unkeyed_at``: the value that was the only behaviour before the field existed: left out of the key there,
      so that artifacts built before it keep their keys.
    """
    meta = {"choices": tuple(choices), "valid": valid, "semantic": semantic}
    if baseline is not _UNSET:
        meta["baseline"] = baseline
    if unkeyed_at is not _UNSET:
        meta["unkeyed_at"] = unkeyed_at
    return field(default=default, metadata=meta)


def section(cls) -> Any:
    """A nested section (its fields describe themselves)."""
    return field(default_factory=cls)


@dataclass(frozen=True)
class DataConfig:
    manifest: str = opt("synthetic")  # data_manifests/<name>.yaml, or a path to a manifest YAML
    root: str = opt("data/synthetic")  # dataset root; relative paths resolve against the working directory
    # Built-in synthetic data: generated into `root` by `run` when it is missing.
    synth_frames: int = opt(600, valid=Range(2, why="at least one train and one test frame"))
    synth_seed: int = opt(0, valid=Range(0))
    synth_image_size: int = opt(128, valid=Range(16))
    # Consecutive frames sharing figure, clothes and walls (a "video clip"; 1 = every frame a new scene).
    synth_clip_length: int = opt(32, valid=Range(1, why="1 = every frame a new scene"))
    # Videos (the folder layout's videos/): keep frames 0, k, 2k, ... of each video. Not in any key by itself: the
    # frames it keeps are (their ids and fingerprints), so a changed stride rebuilds exactly what reads frames.
    frame_stride: int = opt(1, valid=Range(1, why="1 = every frame of each video"))
    # The scene family drawn (docs/synthetic.md): figures (H36M-like humans, what the presets were tuned on) |
    # puppets (another figure model, joint set, clutter and lighting: the family recipes are validated on).
    synth_family: str = opt("figures", choices=("figures", "puppets"))


@dataclass(frozen=True)
class DegradeConfig:
    """Worse depth for the teacher (the depth-quality study, docs/studies.md): applied to each map as the teacher
    reads it from the cache (teach, distill's teacher targets, eval's teacher), never to the cache itself, so it is
    in the teach key (only when set) and not the depth key. A pure function of (map, frame): a frame's noise and
    holes are the same every epoch, as a poor depth estimator's errors are. In order: downscale, blur, noise,
    quantise, holes. All zero (downscale 1) = the cache as it is."""

    # >= 1: shrink the map by this factor (area) and enlarge it back (bilinear)
    downscale: float = opt(1.0, valid=Range(1, why="1 = full resolution"))
    # Gaussian blur, sigma as a fraction of the map's shorter side (0.02 = ~1 px at 48 px)
    blur: float = opt(0.0, valid=Range(0))
    # Gaussian noise, sd as a fraction of the frame's inverse-depth range (max - min)
    noise: float = opt(0.0, valid=Range(0))
    # >= 2: round to this many levels over the frame's range; 0 = off (1 is refused: it would erase the map)
    quantise: int = opt(0, valid=Range(0, why="0 = off; >= 2 levels"))
    # fraction of the map dropped (NaN: no reading) in square cells of 1/8 of its shorter side
    holes: float = opt(0.0, valid=Range(0, 1, why="a fraction of the map"))


@dataclass(frozen=True)
class DepthConfig:
    # midas: run MiDaS 3.1 | files: import depth maps named by the manifest | transformers: a local Hugging Face
    # depth-estimation folder in depth.weights (DPT, Depth Anything; the hf extra; pipeline/stages/depth/hf.py)
    provider: str = opt("midas", choices=("midas", "files", "transformers"))
    # MiDaS 3.1 model (MiDaS README's highest-quality choice); the midas provider checks it against the MiDaS
    # registry (dkp_core.midas.list_models), the others do not read it
    model_type: str = opt("dpt_beit_large_512")
    # midas: the official .pt checkpoint for model_type; transformers: the model folder. Keyed by content.
    weights: Optional[str] = opt(None, semantic=False)
    # auto: bf16 on CUDA (fp16 where the GPU has no bf16), fp32 on a CPU | fp32 | bf16 | fp16 (autocast). In the key:
    # auto is resolved first (pipeline/stages/depth/identity.py), so a CPU run keys as fp32, as before auto existed.
    precision: str = opt("auto", choices=("auto", "fp32", "bf16", "fp16"))
    # auto: device on CUDA where nvJPEG decodes, cpu otherwise | cpu: decode + resize + normalise in the DataLoader
    # workers, run.py-identical (float64 cv2) | device: decode JPEGs on the model's device (nvJPEG on CUDA; other
    # formats on the CPU), resize + normalise there in float32 torch ops. device changes the values slightly
    # (docs/midas.md), so it is in the key; cpu is not (as before; the files provider never reads it).
    preprocess: str = opt("auto", choices=("auto", "cpu", "device"), unkeyed_at="cpu")
    storage_dtype: str = opt("float16", choices=("float16", "float32"))  # float16 (+ per-frame scale) | float32
    # frames per HDF5 shard: the unit of atomic writes and resume (how frames are grouped, not their values)
    shard_size: int = opt(1024, valid=Range(1), semantic=False)
    # frames per forward; None = auto: chosen from the GPU's free memory (at most 64) on CUDA, 8 on a CPU
    batch_size_inference: Optional[int] = opt(None, valid=Range(1), semantic=False)
    # DataLoader workers that read, decode and batch frames; None = auto: the cores but one (at most 16) on CUDA,
    # 2 on a CPU (whose cores the model needs)
    num_workers: Optional[int] = opt(None, valid=Range(0), semantic=False)
    compile: bool = opt(False, semantic=False)  # torch.compile: same maths, different kernels
    # fp32 on CUDA only: TF32 matmuls (torch.backends.cuda.matmul.allow_tf32; cuDNN convolutions use TF32 by
    # default). Faster on Ampere+, ~1e-3 relative error per matmul: in the key when true (midas, fp32).
    tf32: bool = opt(False, unkeyed_at=False)
    device: str = opt("auto", semantic=False)
    degrade: DegradeConfig = section(DegradeConfig)


@dataclass(frozen=True)
class ModelConfig:
    n_keypoints: int = opt(16, valid=Range(2, why="the link map joins pairs of keypoints"))
    # model resolution (AutoLink: 128)
    image_size: int = opt(128, valid=Range(16, multiple_of=16, why="the detector halves it four times"))
    # soft-argmax grid; image_size / 4 in AutoLink's detector
    heatmap_size: int = opt(32, valid=Range(4, why="must be image_size / 4"))
    # link Gaussian width in squared normalised units (sigma ~ 1 px at 128)
    thick: float = opt(5e-4, valid=Range(0, low_open=True))
    sklr: float = opt(512.0, valid=Range(0, low_open=True))  # learning-rate multiplier of the link weights
    mask_ratio: float = opt(0.8, valid=Range(0, 1, why="the fraction of mask cells removed"))
    mask_blocks: int = opt(16, valid=Range(1, why="and at most image_size"))  # mask grid is mask_blocks x mask_blocks
    # base channel count of detector and decoder (AutoLink: 64); CPU presets use less
    width: int = opt(64, valid=Range(1))
    # residual blocks added at the detector's S/16 bottleneck: a deeper detector (0 = AutoLink's). With width, what
    # the architecture-pairs study varies (docs/studies.md).
    extra_blocks: int = opt(0, valid=Range(0), unkeyed_at=0)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = section(ModelConfig)
    steps: int = opt(20001, valid=Range(1))
    batch_size: int = opt(64, valid=Range(1))  # global batch (split across DDP ranks)
    lr: float = opt(1e-4, valid=Range(0, low_open=True))
    weight_decay: float = opt(1e-3, valid=Range(0))
    seed: int = opt(0, valid=Range(0))
    # perceptual (VGG16, AutoLink) | l1ssim | l1 | mse (no weights needed): dkp_core.losses.RECONSTRUCTION_LOSSES
    recon_loss: str = opt("perceptual", choices=("perceptual", "l1ssim", "l1", "mse"))
    # VGG16 ImageNet weights; default: torchvision's cache. Keyed by content (stages/trained.py).
    vgg_weights: Optional[str] = opt(None, semantic=False)
    hflip: Optional[bool] = opt(None)  # None = what the dataset manifest says AutoLink does
    depth_norm: str = opt("minmax", choices=("minmax",))  # teacher input: per-frame min-max of inverse depth to [-1, 1]
    amp: str = opt("auto", choices=("auto", "off", "bf16", "fp16"))
    # constant (AutoLink) | cosine (to 0 at the last step)
    lr_schedule: str = opt("constant", choices=("constant", "cosine"))
    warmup_steps: int = opt(0, valid=Range(0))  # linear warm-up before the schedule
    channels_last: bool = opt(True, semantic=False)  # NHWC memory format: same maths, faster convolutions
    # true: train on one CPU thread (and torch's deterministic algorithms on CUDA), so that a key gives the same
    # weights bit for bit whatever OMP_NUM_THREADS or the core count; false: torch's threads, whose float
    # reductions change order with the thread count (two two-thread runs of one key differ).
    deterministic: bool = opt(False, unkeyed_at=False)
    # a repeat of the same training (the run-to-run spread, `sweep --reruns`): changes nothing computed, only the
    # key (when > 0), so that a rerun really trains again instead of finding the first run's artifact fresh
    rerun: int = opt(0, valid=Range(0, why="0 = the first run"), unkeyed_at=0)
    checkpoint_every: int = opt(500, valid=Range(1), semantic=False)
    log_every: int = opt(50, valid=Range(1), semantic=False)
    eval_every: int = opt(1000, valid=Range(0, why="0 = only at the end"), semantic=False)
    # DataLoader processes per rank; None = from the cores (training.settings.default_num_workers)
    num_workers: Optional[int] = opt(None, valid=Range(0), semantic=False)
    device: str = opt("auto", semantic=False)
    # decode, resize and normalise each training frame once into STORE/frame-cache/ (when a run draws at least an
    # epoch of samples); the same samples bit for bit, ~0.1 ms each instead of 1-2.5 ms (docs/training.md)
    frame_cache: bool = opt(True, semantic=False)


@dataclass(frozen=True)
class TeachConfig(TrainConfig):
    pass


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    # weight of (1 - cos) between teacher and student embeddings; 0 = the AutoLink baseline
    gamma: float = opt(0.1, valid=Range(0, why="0 = the AutoLink baseline"), baseline=0.0)
    # detector tensor distilled: logits (pre-softmax output layer) | heatmaps | down1..4 | up1..2
    # (dkp_core.keypoints.FEATURE_NAMES)
    layer: str = opt("logits", choices=("logits", "heatmaps", "down1", "down2", "down3", "down4", "up1", "up2"))
    # cosine over: sample (whole tensor) | keypoint (per map) | location (per pixel, over channels) | attention
    # (attention transfer: 1 - cos of the maps of channel-mean squared activations; any widths)
    flatten: str = opt("sample", choices=("sample", "keypoint", "location", "attention"))
    # a learned 1x1 convolution from the student's layer channels to the teacher's, trained with the student and
    # stored in its model.pt: distils an intermediate layer between models of different widths
    adapter: bool = opt(False, baseline=False, unkeyed_at=False)
    # precompute teacher embeddings once when the teacher input is deterministic (the same targets either way)
    teacher_cache: bool = opt(True)
    # the student's starting weights: scratch (random, the paper) | teacher_detector (the trained teacher's detector,
    # decoder and links random) | teacher (the whole trained teacher). Needs distill.model = teach.model; the
    # gamma = 0 baseline always starts from scratch (it must not see depth).
    init: str = opt("scratch", choices=("scratch", "teacher_detector", "teacher"), baseline="scratch",
                    unkeyed_at="scratch")
    # + keypoint_weight * mean squared distance between the student's and the teacher's soft-argmax keypoints
    # (normalised [-1, 1] units), beside the gamma term and only with it (layer logits or heatmaps: the teacher's
    # keypoints are computed from that tensor). 0 = the paper's loss.
    keypoint_weight: float = opt(0.0, valid=Range(0, why="0 = the paper's loss"), baseline=0.0, unkeyed_at=0.0)


@dataclass(frozen=True)
class EvalConfig:
    # auto = the manifest's protocol | h36m | taichi | deepfashion | l2 (pipeline.data.spec.PROTOCOLS)
    protocol: str = opt("auto", choices=("auto", "h36m", "taichi", "deepfashion", "l2"))
    # l2 only: none | dataset = score each frame against its closer left/right orientation, with the pairs of
    # ROOT/dataset.yaml left_right_pairs (or synthetic.left_right_pairs, where `synth` writes them: the synthetic
    # figures turn through 360 degrees, so the image's left arm is the figure's right one half of the time and
    # no linear map can tell them apart).
    flip_pairs: str = opt("none", choices=("none", "dataset"))
    # Also train the gamma = 0 RGB-only baseline (a second distill artifact, sharing depth and teach) and score it
    # beside the student and the teacher: the comparison the paper makes, in one `run`. The baseline's own config
    # (baseline_of) turns it off: it is what is built, not what builds another.
    baseline: bool = opt(False, baseline=False)
    batch_size_inference: int = opt(64, valid=Range(1), semantic=False)
    device: str = opt("auto", semantic=False)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = opt("experiment", semantic=False)  # the experiment's label for humans (a file name in the store)
    data: DataConfig = section(DataConfig)
    depth: DepthConfig = section(DepthConfig)
    teach: TeachConfig = section(TeachConfig)
    distill: DistillConfig = section(DistillConfig)
    eval: EvalConfig = section(EvalConfig)


# ---------------------------------------------------------------------------------------------------
# the tables derived from the fields' metadata


def leaves(cls=ExperimentConfig, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """(dotted path, field) of every non-section field under ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            yield from leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


# The valid strings of each string field with a fixed set, by full dotted path.
CHOICES: dict[str, tuple[str, ...]] = {p: f.metadata["choices"] for p, f in leaves() if f.metadata.get("choices")}
# The valid values of numeric fields, by full dotted path.
RANGES: dict[str, Range] = {p: f.metadata["valid"] for p, f in leaves() if f.metadata.get("valid")}
# The fields that cannot change any output: in no artifact key.
NON_SEMANTIC: frozenset[str] = frozenset(p for p, f in leaves() if not f.metadata.get("semantic", True))


def choices_of(cls, name: str) -> tuple[str, ...]:
    """The valid strings of ``cls``'s field ``name`` (for code outside the config that checks the same field)."""
    return next(f.metadata["choices"] for f in fields(cls) if f.name == name)


def _as_dict(obj, drop_unkeyed: bool) -> dict:
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if not f.metadata.get("semantic", True) or (drop_unkeyed and "unkeyed_at" in f.metadata
                                                     and v == f.metadata["unkeyed_at"]):
            continue
        out[f.name] = _as_dict(v, drop_unkeyed) if is_dataclass(v) else copy.deepcopy(v)
    return out


def semantic_dict(obj) -> dict:
    """The fields of a config section that can change results (the non-semantic ones removed, at every depth)."""
    return _as_dict(obj, drop_unkeyed=False)


def key_dict(obj) -> dict:
    """:func:`semantic_dict` less each field at its ``unkeyed_at`` value: a section's config as its key hashes it."""
    return _as_dict(obj, drop_unkeyed=True)


def baseline_of(obj):
    """``obj`` with every field that declares a ``baseline`` value reset to it (at every depth)."""
    changes = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if "baseline" in f.metadata:
            changes[f.name] = f.metadata["baseline"]
        elif is_dataclass(v):
            reset = baseline_of(v)
            if reset is not v:
                changes[f.name] = reset
    return dataclasses.replace(obj, **changes) if changes else obj


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
        rng = RANGES.get(dotted)
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
    return CHOICES.get(dotted, ())


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


def to_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
