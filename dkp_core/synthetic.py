"""The built-in synthetic dataset: articulated human-like figures in front of cluttered walls.

Why it exists: the pipeline must run end to end, and its claims must be testable, without any
download. The scene is built so that the paper's argument holds by construction: the walls carry
bars and blobs drawn in the figure's own colours and shaded like its limbs, so colour alone cannot
tell figure from background, while depth can (the figure is always metres in front of the walls).

Scene, per frame (pure numpy + OpenCV drawing, no file I/O):

- a 3-D skeleton (16 or 20 joints, :data:`JOINT_NAMES`) posed by forward kinematics from random joint
  angles (torso lean, neck, shoulders, elbows, hips, knees, limb twist, whole-body yaw over the
  full circle), projected with a pinhole camera (x right, y down, z forward);
- limbs rendered as shaded capsules with a per-pixel z-buffer, so near limbs occlude far ones;
- one wall, or two walls meeting in a corner, tilted planes at 7-11 m: flat posters, bars, blobs, and
  distractor capsules/discs in the figure's colours, all at wall depth;
- sensor noise on the RGB.

Frames are grouped in *clips* of ``clip_length`` consecutive indices: inside a clip the figure, its
clothes, the walls and the light stay the same and the joint angles, yaw and position move smoothly
(sinusoids of the frame number), so a clip looks like a short video. Everything is a pure function
of ``(seed, index)``: the clip's parameters come from a generator seeded with ``(seed, clip)`` and the
frame's noise from one seeded with ``(seed, index)`` (PCG64 via SeedSequence; no global state).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

# ----------------------------------------------------------------------------------------------
# Skeleton
# ----------------------------------------------------------------------------------------------
# Left/right are the figure's own (anatomical) sides, as in Human3.6M. The 16-joint skeleton is the
# first 16 entries; the 20-joint one adds hands and toes.
JOINT_NAMES: tuple[str, ...] = (
    "pelvis", "thorax", "neck", "head_top",
    "r_shoulder", "r_elbow", "r_wrist",
    "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle",
    "l_hip", "l_knee", "l_ankle",
    "r_hand", "l_hand", "r_toe", "l_toe",
)
SUPPORTED_N_JOINTS = (16, 20)
_LEFT_RIGHT_PAIRS: tuple[tuple[int, int], ...] = (
    (7, 4), (8, 5), (9, 6), (13, 10), (14, 11), (15, 12), (17, 16), (19, 18),
)
# Parent of each joint (the root has -1): the bones of the kinematic tree.
_PARENT: tuple[int, ...] = (-1, 0, 1, 2, 1, 4, 5, 1, 7, 8, 0, 10, 11, 0, 13, 14, 6, 9, 12, 15)

# Body part colour slots, indices into a clip's palette.
_SKIN, _SHIRT, _TROUSERS, _SHOES = 0, 1, 2, 3
# Bones drawn as capsules: (joint a, joint b, radius in m at body scale 1, colour slot).
# The head is a separate sphere (see _render_figure).
_LIMBS: tuple[tuple[int, int, float, int], ...] = (
    (0, 1, 0.15, _SHIRT),      # torso
    (1, 2, 0.05, _SKIN),       # neck
    (1, 4, 0.065, _SHIRT), (4, 5, 0.05, _SHIRT), (5, 6, 0.04, _SKIN),
    (1, 7, 0.065, _SHIRT), (7, 8, 0.05, _SHIRT), (8, 9, 0.04, _SKIN),
    (0, 10, 0.09, _TROUSERS), (10, 11, 0.075, _TROUSERS), (11, 12, 0.055, _TROUSERS),
    (0, 13, 0.09, _TROUSERS), (13, 14, 0.075, _TROUSERS), (14, 15, 0.055, _TROUSERS),
    (6, 16, 0.035, _SKIN), (9, 17, 0.035, _SKIN), (12, 18, 0.045, _SHOES), (15, 19, 0.045, _SHOES),
)
_HEAD_RADIUS = 0.105  # m, at body scale 1

# Bone lengths in metres for a 1.75 m figure at body scale 1.
_LEN = {
    "spine": 0.50, "neck": 0.10, "head": 0.23, "shoulder": 0.19, "upper_arm": 0.29, "forearm": 0.26,
    "hand": 0.09, "hip": 0.10, "thigh": 0.43, "shin": 0.42, "foot": 0.14,
}

# Joint-angle ranges in radians: (low, high). Each angle follows base + amp * sin(2 pi f t + phase)
# inside its clip, clipped to the range.
_ANGLE_RANGES: dict[str, tuple[float, float]] = {
    "torso_pitch": (-0.2, 0.5), "torso_roll": (-0.25, 0.25),
    "neck_pitch": (-0.3, 0.4), "neck_roll": (-0.3, 0.3),
    "r_shoulder_flex": (-0.8, 2.6), "r_shoulder_abd": (0.05, 1.8), "r_elbow": (0.0, 2.3), "r_arm_twist": (-0.8, 0.8),
    "l_shoulder_flex": (-0.8, 2.6), "l_shoulder_abd": (0.05, 1.8), "l_elbow": (0.0, 2.3), "l_arm_twist": (-0.8, 0.8),
    "r_hip_flex": (-0.5, 1.6), "r_hip_abd": (0.0, 0.6), "r_knee": (0.0, 2.0), "r_leg_twist": (-0.3, 0.3),
    "l_hip_flex": (-0.5, 1.6), "l_hip_abd": (0.0, 0.6), "l_knee": (0.0, 2.0), "l_leg_twist": (-0.3, 0.3),
}
_ANGLE_NAMES = tuple(_ANGLE_RANGES)

# Random-stream labels, so that clip parameters and per-frame noise never share a generator.
_STREAM_CLIP = 1
_STREAM_FRAME = 2


# Scene families: ``figures`` (this module: the H36M-like humans the presets were tuned on) and the others, each a
# module with the same four functions (joint_names, left_right_pairs, frame_keypoints, render_frame), a
# SUPPORTED_N_JOINTS and a DEFAULT_N_JOINTS. Validating a recipe on a family it was not tuned on is the point of
# having more than one (docs/synthetic.md, "Scene families").
DEFAULT_FAMILY = "figures"
FAMILIES: dict[str, str] = {"figures": __name__, "puppets": "dkp_core.synthetic_puppets"}
DEFAULT_N_JOINTS = 16


def family_module(family: str):
    """The module that draws ``family`` (a ValueError naming the valid families otherwise)."""
    import importlib

    if family not in FAMILIES:
        raise ValueError(f"unknown synthetic scene family {family!r}; valid: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[family])


def joint_names(n_joints: int, family: str = DEFAULT_FAMILY) -> tuple[str, ...]:
    """Names of the synthetic skeleton's joints, in keypoint order."""
    if family != DEFAULT_FAMILY:
        return family_module(family).joint_names(n_joints)
    _check_n_joints(n_joints)
    return JOINT_NAMES[:n_joints]


def left_right_pairs(n_joints: int, family: str = DEFAULT_FAMILY) -> tuple[tuple[int, int], ...]:
    """(left, right) joint index pairs of the synthetic skeleton (the figure's own sides)."""
    if family != DEFAULT_FAMILY:
        return family_module(family).left_right_pairs(n_joints)
    _check_n_joints(n_joints)
    return tuple((a, b) for a, b in _LEFT_RIGHT_PAIRS if a < n_joints and b < n_joints)


def _check_n_joints(n_joints: int, family: str = DEFAULT_FAMILY) -> None:
    supported = SUPPORTED_N_JOINTS if family == DEFAULT_FAMILY else family_module(family).SUPPORTED_N_JOINTS
    if n_joints not in supported:
        raise ValueError(f"n_joints={n_joints!r} is not a synthetic skeleton (scene family {family!r}); choose one of "
                         f"{supported}")


# ----------------------------------------------------------------------------------------------
# Config and result
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticConfig:
    """What the generator draws. Every field changes the pixels, so all belong in an artifact key."""

    image_size: int = 128  # image height in pixels (and width unless image_width is set)
    image_width: int | None = None  # None = square; a different width tests (x, y) handling
    # figures: 16 (H36M-like) or 20 (adds hands and toes); puppets: 15. None = the family's default.
    n_joints: int | None = None
    clip_length: int = 32  # consecutive indices sharing figure, clothes and walls (1 = independent frames)
    n_clutter: int = 24  # wall shapes per frame (posters, bars, blobs)
    distractor_fraction: float = 0.5  # share of wall shapes drawn in the figure's colours and shading
    noise_std: float = 2.0  # Gaussian sensor noise on RGB, in 8-bit levels
    focal: float = 1.8  # focal length in units of the image height (about 31 deg vertical field of view)
    figure_depth: tuple[float, float] = (3.4, 4.8)  # pelvis distance from the camera, m
    wall_depth: tuple[float, float] = (8.0, 10.0)  # wall distance at the image centre, m
    # the scene family (FAMILIES). Last, and left out of the parameters `synth` records when it is the default,
    # so datasets and artifact keys from before the second family keep theirs.
    family: str = DEFAULT_FAMILY

    def __post_init__(self) -> None:
        module = family_module(self.family)
        if self.n_joints is None:
            object.__setattr__(self, "n_joints", module.DEFAULT_N_JOINTS)
        _check_n_joints(self.n_joints, self.family)
        if self.image_size < 16 or (self.image_width is not None and self.image_width < 16):
            raise ValueError(f"image_size/image_width must be >= 16 px, got {self.image_size}/{self.image_width}")
        if self.clip_length < 1:
            raise ValueError(f"clip_length must be >= 1, got {self.clip_length}")
        if self.n_clutter < 0 or not 0.0 <= self.distractor_fraction <= 1.0 or self.noise_std < 0:
            raise ValueError("n_clutter >= 0, 0 <= distractor_fraction <= 1 and noise_std >= 0 are required")
        lo, hi = self.figure_depth
        wlo, whi = self.wall_depth
        if not (0.5 < lo <= hi) or not (wlo <= whi):
            raise ValueError(f"bad depth ranges: figure_depth={self.figure_depth}, wall_depth={self.wall_depth}")
        # The figure extends about 1 m in depth around its pelvis; keep the walls clearly behind it.
        if wlo < hi + 2.0:
            raise ValueError(
                f"wall_depth starts at {wlo} m, too close to figure_depth up to {hi} m; "
                f"the walls must start at least 2 m behind the figure (>= {hi + 2.0})"
            )

    @property
    def height(self) -> int:
        return self.image_size

    @property
    def width(self) -> int:
        return self.image_width if self.image_width is not None else self.image_size


@dataclass(frozen=True)
class SyntheticFrame:
    """One rendered frame.

    rgb (H, W, 3) uint8 RGB; depth (H, W) float32 metric depth along the optical axis in metres
    (near = small, walls 7-11 m); keypoints (J, 2) float32 pixel (x, y) of the joint centres
    (docs/conventions.md), also for joints outside the image; visible (J,) bool = inside the image;
    occluded (J,) bool = inside the image but hidden behind another body part (approximate, still
    annotated, as in Human3.6M); mask (H, W) bool figure pixels; palette (4, 3) uint8 the figure's
    base colours (skin, shirt, trousers, shoes), which the wall distractors reuse.
    """

    rgb: np.ndarray
    depth: np.ndarray
    keypoints: np.ndarray
    visible: np.ndarray
    occluded: np.ndarray
    mask: np.ndarray
    palette: np.ndarray
    index: int
    clip: int
    joint_names: tuple[str, ...] = field(default=(), repr=False)


# ----------------------------------------------------------------------------------------------
# Random clip parameters
# ----------------------------------------------------------------------------------------------
def _rng(seed: int, stream: int, key: int) -> np.random.Generator:
    if seed < 0 or key < 0:
        raise ValueError(f"seed and index must be non-negative integers, got seed={seed}, index/clip={key}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), stream, int(key)])))


@dataclass(frozen=True)
class _Clip:
    palette: np.ndarray  # (4, 3) float: skin, shirt, trousers, shoes
    scale: float
    lengths: dict
    angle_base: np.ndarray  # (A,)
    angle_amp: np.ndarray
    angle_freq: np.ndarray
    angle_phase: np.ndarray
    yaw0: float
    yaw_rate: float
    root_xyz: np.ndarray  # (3,) pelvis position at t = 0 (x as a fraction of the half-width at that depth)
    root_amp: np.ndarray  # (3,)
    root_freq: float
    root_phase: np.ndarray  # (3,)
    light: np.ndarray  # (3,) unit vector from the surface towards the light
    walls: np.ndarray  # (n_walls, 3): inverse-depth plane coefficients a + b x + c y
    wall_colours: np.ndarray  # (n_walls, 3)
    clutter: tuple  # drawing commands


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(30, 230, size=3).astype(np.float64)


def _make_clip(cfg: SyntheticConfig, seed: int, clip: int) -> _Clip:
    rng = _rng(seed, _STREAM_CLIP, clip)
    h, w = cfg.height, cfg.width
    skin = np.array([rng.uniform(120, 235), rng.uniform(80, 190), rng.uniform(60, 160)])
    palette = np.stack([skin, _random_colour(rng), _random_colour(rng), _random_colour(rng)])
    scale = rng.uniform(0.9, 1.1)
    lengths = {k: v * scale * rng.uniform(0.93, 1.07) for k, v in _LEN.items()}

    lo = np.array([_ANGLE_RANGES[n][0] for n in _ANGLE_NAMES])
    hi = np.array([_ANGLE_RANGES[n][1] for n in _ANGLE_NAMES])
    base = rng.uniform(lo, hi)
    amp = rng.uniform(0.0, 0.35, size=len(lo)) * (hi - lo)
    freq = rng.uniform(0.01, 0.06, size=len(lo))  # cycles per frame
    phase = rng.uniform(0, 2 * np.pi, size=len(lo))

    # Root: x as a fraction of the visible half-width at the root's depth, y in metres, z in metres.
    root = np.array([rng.uniform(-0.45, 0.45), rng.uniform(-0.15, 0.1), rng.uniform(*cfg.figure_depth)])
    root_amp = np.array([rng.uniform(0, 0.2), rng.uniform(0, 0.05), rng.uniform(0, 0.3)])
    root_phase = rng.uniform(0, 2 * np.pi, size=3)

    # Light from the camera's side of the scene (negative z component points towards the camera).
    light = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.9, 0.2), -1.0])
    light /= np.linalg.norm(light)

    # Walls: planes n . P = d with P = Z * ((x - cx)/f, (y - cy)/f, 1), so 1/Z = (n . ray) / d is
    # affine in pixel coordinates. Two walls meeting in a vertical corner: the visible surface is the
    # nearer one, i.e. the larger inverse depth.
    f = cfg.focal * h
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    n_walls = 1 + int(rng.random() < 0.5)
    walls = []
    for k in range(n_walls):
        yaw = rng.uniform(-0.35, 0.35) if n_walls == 1 else (0.45 if k == 0 else -0.45) + rng.uniform(-0.15, 0.15)
        pitch = rng.uniform(-0.15, 0.15)
        normal = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
        d = rng.uniform(*cfg.wall_depth) * normal[2]
        # 1/Z = (nx (x-cx)/f + ny (y-cy)/f + nz) / d
        a = (normal[2] - normal[0] * cx / f - normal[1] * cy / f) / d
        walls.append((a, normal[0] / (f * d), normal[1] / (f * d)))
    walls = np.array(walls)
    # Keep every wall pixel at least 2 m behind the farthest figure depth (corners included).
    corners = np.array([[1.0, 0, 0], [1.0, w - 1, 0], [1.0, 0, h - 1], [1.0, w - 1, h - 1]])
    max_inv = (corners @ walls.T).max()
    min_inv_allowed = 1.0 / (cfg.wall_depth[0] - 1.0)
    if max_inv > min_inv_allowed:
        walls *= min_inv_allowed / max_inv
    wall_colours = np.stack([_random_colour(rng) for _ in range(n_walls)])

    # All clutter randomness in a few vectorised draws (one call per quantity, not per shape).
    m = cfg.n_clutter
    side = float(min(h, w))
    centre = rng.uniform(0, 1, size=(m, 2)) * np.array([w - 1, h - 1])
    is_distractor = rng.random(m) < cfg.distractor_fraction
    slot = rng.integers(0, 3 if cfg.n_joints == 16 else 4, size=m)  # 16 joints: no feet, no shoes
    is_bar = rng.random(m) < 0.6  # distractors: limb-like capsule (bar) or disc (blob)
    kind = rng.integers(0, 3, size=m)  # other clutter: poster, bar, blob
    ang = rng.uniform(0, np.pi, size=m)
    u = rng.random((m, 3))  # sizes, mapped into each kind's range below
    colour = rng.integers(0, 256, size=(m, 3))
    clutter = []
    for i in range(m):
        cx_, cy_ = centre[i]
        cos, sin = np.cos(ang[i]), np.sin(ang[i])
        if is_distractor[i]:
            # Limb-like distractor in one of the figure's colours, shaded like the figure.
            if is_bar[i]:
                half = (0.05 + 0.15 * u[i, 0]) * side
                r = (0.015 + 0.035 * u[i, 1]) * side
                clutter.append(("capsule", (cx_ - cos * half, cy_ - sin * half), (cx_ + cos * half, cy_ + sin * half),
                                r, int(slot[i])))
            else:
                clutter.append(("capsule", (cx_, cy_), (cx_, cy_), (0.03 + 0.05 * u[i, 0]) * side, int(slot[i])))
            continue
        col = tuple(int(c) for c in colour[i])
        if kind[i] == 0:  # poster
            hw, hh = (0.04 + 0.16 * u[i, :2]) * side
            clutter.append(("rect", (int(cx_ - hw), int(cy_ - hh)), (int(cx_ + hw), int(cy_ + hh)), col))
        elif kind[i] == 1:  # bar
            half = (0.1 + 0.4 * u[i, 0]) * side
            p0 = (int(cx_ - cos * half), int(cy_ - sin * half))
            p1 = (int(cx_ + cos * half), int(cy_ + sin * half))
            clutter.append(("bar", p0, p1, max(1, int((0.01 + 0.04 * u[i, 1]) * side)), col))
        else:  # blob
            axes = (max(1, int((0.02 + 0.08 * u[i, 0]) * side)), max(1, int((0.02 + 0.08 * u[i, 1]) * side)))
            clutter.append(("blob", (int(cx_), int(cy_)), axes, float(180 * u[i, 2]), col))
    return _Clip(
        palette=palette, scale=scale, lengths=lengths, angle_base=base, angle_amp=amp, angle_freq=freq,
        angle_phase=phase, yaw0=rng.uniform(-np.pi, np.pi), yaw_rate=rng.uniform(-0.06, 0.06),
        root_xyz=root, root_amp=root_amp, root_freq=rng.uniform(0.01, 0.04), root_phase=root_phase,
        light=light, walls=walls, wall_colours=wall_colours, clutter=tuple(clutter),
    )


# ----------------------------------------------------------------------------------------------
# Pose: forward kinematics in camera coordinates (x right, y down, z forward)
# ----------------------------------------------------------------------------------------------
def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _ortho(v: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """The component of v orthogonal to unit vector ``axis``, normalised."""
    return _unit(v - (v @ axis) * axis)


def _limb(root: np.ndarray, down: np.ndarray, fwd: np.ndarray, out: np.ndarray,
          flex: float, abd: float, bend: float, twist: float, bend_sign: float,
          l1: float, l2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-bone limb from ``root``: returns (middle joint, end joint, direction of the second bone)."""
    d1 = np.cos(abd) * np.cos(flex) * down + np.cos(abd) * np.sin(flex) * fwd + np.sin(abd) * out
    w = _ortho(fwd, d1)
    w = np.cos(twist) * w + np.sin(twist) * np.cross(d1, w)  # twist the bending plane about the bone
    d2 = np.cos(bend) * d1 + bend_sign * np.sin(bend) * w
    mid = root + l1 * d1
    return mid, mid + l2 * d2, d2


def _pose_3d(clip: _Clip, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``t`` of the clip: joint offsets from the pelvis (20, 3) in metres (camera axes), and the
    root (3,) = (x as a fraction of the visible half-width, y in m, z in m)."""
    ang = clip.angle_base + clip.angle_amp * np.sin(2 * np.pi * clip.angle_freq * t + clip.angle_phase)
    lo = np.array([_ANGLE_RANGES[n][0] for n in _ANGLE_NAMES])
    hi = np.array([_ANGLE_RANGES[n][1] for n in _ANGLE_NAMES])
    a = dict(zip(_ANGLE_NAMES, np.clip(ang, lo, hi)))
    L = clip.lengths

    yaw = clip.yaw0 + clip.yaw_rate * t
    # Body frame at yaw 0: facing the camera (-z), its left on the camera's right (+x).
    c, s = np.cos(yaw), np.sin(yaw)
    left = np.array([c, 0.0, s])
    fwd = np.array([s, 0.0, -c])
    up = np.array([0.0, -1.0, 0.0])
    down = -up

    p = np.zeros((20, 3))
    p[0] = 0.0
    pt, rl = a["torso_pitch"], a["torso_roll"]
    spine = np.cos(pt) * np.cos(rl) * up + np.sin(pt) * fwd + np.cos(pt) * np.sin(rl) * left
    t_left = _ortho(left, spine)
    t_fwd = _unit(fwd - (fwd @ spine) * spine - (fwd @ t_left) * t_left)
    p[1] = spine * L["spine"]
    p[2] = p[1] + spine * L["neck"]
    npt, nrl = a["neck_pitch"], a["neck_roll"]
    head = np.cos(npt) * np.cos(nrl) * spine + np.sin(npt) * t_fwd + np.cos(npt) * np.sin(nrl) * t_left
    p[3] = p[2] + head * L["head"]
    for side, sh, el, wr, hand in (("r", 4, 5, 6, 16), ("l", 7, 8, 9, 17)):
        sgn = 1.0 if side == "l" else -1.0
        p[sh] = p[1] + sgn * L["shoulder"] * t_left - 0.03 * spine
        p[el], p[wr], d2 = _limb(p[sh], -spine, t_fwd, sgn * t_left, a[f"{side}_shoulder_flex"], a[f"{side}_shoulder_abd"],
                                 a[f"{side}_elbow"], a[f"{side}_arm_twist"], 1.0, L["upper_arm"], L["forearm"])
        p[hand] = p[wr] + L["hand"] * d2
    for side, hip, kn, an, toe in (("r", 10, 11, 12, 18), ("l", 13, 14, 15, 19)):
        sgn = 1.0 if side == "l" else -1.0
        p[hip] = sgn * L["hip"] * left
        p[kn], p[an], _ = _limb(p[hip], down, fwd, sgn * left, a[f"{side}_hip_flex"], a[f"{side}_hip_abd"],
                                a[f"{side}_knee"], a[f"{side}_leg_twist"], -1.0, L["thigh"], L["shin"])
        p[toe] = p[an] + L["foot"] * fwd

    # Root trajectory: smooth drift in x/y/z; x is kept inside the field of view at that depth.
    osc = np.sin(2 * np.pi * clip.root_freq * t + clip.root_phase)
    z = float(np.clip(clip.root_xyz[2] + clip.root_amp[2] * osc[2], 1.0, None))
    return p, np.array([clip.root_xyz[0] + clip.root_amp[0] * osc[0], clip.root_xyz[1] + clip.root_amp[1] * osc[1], z])


# ----------------------------------------------------------------------------------------------
# Rasterisation
# ----------------------------------------------------------------------------------------------
def _draw_capsule(rgb: np.ndarray, zbuf: np.ndarray | None, mask: np.ndarray | None,
                  a: np.ndarray, b: np.ndarray, ra: float, rb: float, za: float, zb: float,
                  colour: np.ndarray, light: np.ndarray, focal: float, ambient: float = 0.35,
                  fill: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Shade a capsule (segment a-b in pixels, radii ra/rb in pixels, axis depths za/zb in m) into
    ``rgb`` (H, W, 3) uint8. With ``zbuf`` (H, W) float32 metres, a pixel is written only where the
    capsule's surface is nearer than the buffer, and the buffer is updated (z-buffering); without it
    the capsule is painted flat onto whatever is there (wall distractors keep the wall's depth). ``fill``: an
    optional second light (unit direction (3,), RGB (3,) in 8-bit levels added at full incidence), which the
    ``puppets`` family uses; without it the arithmetic is the ``figures`` family's, byte for byte."""
    h, w = rgb.shape[:2]
    r_max = max(ra, rb)
    x0 = max(int(np.floor(min(a[0], b[0]) - r_max)), 0)
    x1 = min(int(np.ceil(max(a[0], b[0]) + r_max)) + 1, w)
    y0 = max(int(np.floor(min(a[1], b[1]) - r_max)), 0)
    y1 = min(int(np.ceil(max(a[1], b[1]) + r_max)) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return
    # Pixel-centre offsets from a, as a row (1, w') and a column (h', 1) that broadcast to (h', w').
    px = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(a[0])
    py = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(a[1])
    abx, aby = float(b[0] - a[0]), float(b[1] - a[1])
    len2 = abx * abx + aby * aby
    if len2 > 1e-9:
        t = np.minimum(np.maximum((px * np.float32(abx / len2) + py * np.float32(aby / len2)), 0.0), 1.0)
    else:
        t = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    dx, dy = px - t * np.float32(abx), py - t * np.float32(aby)  # (h', w') offset from the closest axis point
    r = np.float32(ra) + t * np.float32(rb - ra)
    inside = dx * dx + dy * dy < r * r
    iy, ix = np.nonzero(inside)
    if iy.size == 0:
        return
    # From here on only the n covered pixels: (n,) arrays.
    dx, dy, r, t = dx[iy, ix], dy[iy, ix], r[iy, ix], t[iy, ix]
    dist = np.sqrt(dx * dx + dy * dy)
    s = dist / r  # 0 on the axis, 1 on the silhouette
    bulge = np.sqrt(np.maximum(1.0 - s * s, 0.0))
    inv = s / np.maximum(dist, 1e-6)
    # Surface normal of the tube seen from the camera: sideways in the image plane, towards the camera.
    lit = dx * (inv * light[0]) + dy * (inv * light[1]) - bulge * light[2]
    shade = ambient + (1.0 - ambient) * np.maximum(lit, 0.0)
    if fill is None:
        col = np.clip(colour[None, :] * shade[:, None], 0, 255).astype(np.uint8)  # (n, 3)
    else:
        lit2 = dx * (inv * fill[0][0]) + dy * (inv * fill[0][1]) - bulge * fill[0][2]
        col = np.clip(colour[None, :] * shade[:, None] + np.maximum(lit2, 0.0)[:, None] * fill[1][None, :],
                      0, 255).astype(np.uint8)  # (n, 3)
    iy += y0
    ix += x0
    if zbuf is not None:
        z_axis = za + t * (zb - za)
        depth = z_axis - bulge * r * z_axis / focal  # the surface bulges towards the camera
        nearer = depth < zbuf[iy, ix]
        iy, ix, col, depth = iy[nearer], ix[nearer], col[nearer], depth[nearer]
        zbuf[iy, ix] = depth
        if mask is not None:
            mask[iy, ix] = True
    rgb[iy, ix] = col


def _render_walls(cfg: SyntheticConfig, clip: _Clip) -> tuple[np.ndarray, np.ndarray]:
    """Wall RGB (H, W, 3) uint8 with clutter, and wall depth (H, W) float32 metres."""
    h, w = cfg.height, cfg.width
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    # Base colour, darker towards the floor so walls are not flat colour fields.
    shade = (1.0 - 0.25 * ys / h)[..., None]  # (H, 1, 1)
    cols = clip.wall_colours.astype(np.float32)
    a, b, c = (np.float32(v) for v in clip.walls[0])
    inv = a + b * xs + c * ys  # (H, W) inverse depth of wall 0
    if len(clip.walls) == 1:
        rgb = np.empty((h, w, 3), dtype=np.uint8)  # C-contiguous: OpenCV draws into it
        rgb[:] = (cols[0] * shade).astype(np.uint8)
    else:
        a, b, c = (np.float32(v) for v in clip.walls[1])
        inv1 = a + b * xs + c * ys
        second = inv1 > inv  # the nearer wall is the visible one (concave corner)
        inv = np.maximum(inv, inv1)
        rgb = np.where(second[..., None], cols[1] * shade, cols[0] * shade).astype(np.uint8)  # (H, W, 3)
    depth = 1.0 / inv  # (H, W) float32 metres
    focal = cfg.focal * h
    for item in clip.clutter:
        kind = item[0]
        if kind == "capsule":
            _, p0, p1, r, slot = item
            _draw_capsule(rgb, None, None, np.asarray(p0), np.asarray(p1), r, r, 0.0, 0.0,
                          clip.palette[slot], clip.light, focal)
        elif kind == "rect":
            cv2.rectangle(rgb, item[1], item[2], item[3], thickness=-1)
        elif kind == "bar":
            cv2.line(rgb, item[1], item[2], item[4], thickness=item[3], lineType=cv2.LINE_AA)
        else:
            cv2.ellipse(rgb, item[1], item[2], item[3], 0, 360, item[4], thickness=-1, lineType=cv2.LINE_AA)
    return rgb, depth


def _project(cfg: SyntheticConfig, clip: _Clip, t: int) -> tuple[np.ndarray, np.ndarray]:
    """All 20 joints of frame ``t``: 3-D positions (20, 3) in metres, pixel (x, y) positions (20, 2)."""
    h, w = cfg.height, cfg.width
    focal = cfg.focal * h
    body, root = _pose_3d(clip, t)
    # Root x was drawn as a fraction of the visible half-width at the root depth.
    root_x = root[0] * (w / 2.0) * root[2] / focal
    pts = body + np.array([root_x, root[1], root[2]])  # (20, 3) metres
    z = pts[:, 2]
    kp = np.stack([focal * pts[:, 0] / z + (w - 1) / 2.0, focal * pts[:, 1] / z + (h - 1) / 2.0], axis=1)
    return pts, kp  # kp: (20, 2) pixels (x, y)


def _inside(cfg: SyntheticConfig, kp: np.ndarray) -> np.ndarray:
    return (kp[:, 0] >= 0) & (kp[:, 0] <= cfg.width - 1) & (kp[:, 1] >= 0) & (kp[:, 1] <= cfg.height - 1)


def frame_keypoints(cfg: SyntheticConfig, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The ground truth of frame ``index`` without rasterising it (much cheaper than
    :func:`render_frame`, identical values): keypoints (J, 2) float32 pixel (x, y), visible (J,) bool."""
    if cfg.family != DEFAULT_FAMILY:
        return family_module(cfg.family).frame_keypoints(cfg, seed, index)
    clip_id, t = divmod(int(index), cfg.clip_length)
    _, kp = _project(cfg, _make_clip(cfg, seed, clip_id), t)
    kp = kp[: cfg.n_joints].astype(np.float32)
    return kp, _inside(cfg, kp)


def render_frame(cfg: SyntheticConfig, seed: int, index: int) -> SyntheticFrame:
    """Render frame ``index`` of the synthetic sequence ``seed``; a pure function of (cfg, seed, index).

    Returns a :class:`SyntheticFrame` (RGB (H, W, 3) uint8, depth (H, W) float32 m, keypoints (J, 2)
    pixel (x, y), visibility). ``cfg.family`` picks the scene family's renderer."""
    if cfg.family != DEFAULT_FAMILY:
        return family_module(cfg.family).render_frame(cfg, seed, index)
    clip_id, t = divmod(int(index), cfg.clip_length)
    clip = _make_clip(cfg, seed, clip_id)
    frame_rng = _rng(seed, _STREAM_FRAME, index)
    h, w = cfg.height, cfg.width
    focal = cfg.focal * h
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0

    rgb, depth = _render_walls(cfg, clip)
    pts, kp = _project(cfg, clip, t)
    z = pts[:, 2]

    mask = np.zeros((h, w), dtype=bool)
    scale = clip.scale
    for ja, jb, radius, slot in _LIMBS:
        if ja >= cfg.n_joints or jb >= cfg.n_joints:
            continue
        rm = radius * scale
        _draw_capsule(rgb, depth, mask, kp[ja], kp[jb], focal * rm / z[ja], focal * rm / z[jb], z[ja], z[jb],
                      clip.palette[slot], clip.light, focal)
    # Head: a sphere in the upper part of the neck -> head-top segment.
    hc = pts[2] + 0.55 * (pts[3] - pts[2])
    hz = hc[2]
    hxy = np.array([focal * hc[0] / hz + cx, focal * hc[1] / hz + cy])
    hr = focal * _HEAD_RADIUS * scale / hz
    _draw_capsule(rgb, depth, mask, hxy, hxy, hr, hr, hz, hz, clip.palette[_SKIN], clip.light, focal)

    if cfg.noise_std > 0:
        noisy = frame_rng.standard_normal(size=rgb.shape, dtype=np.float32)  # (H, W, 3)
        noisy *= np.float32(cfg.noise_std)
        noisy += rgb
        rgb = np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)

    kp = kp[: cfg.n_joints].astype(np.float32)
    zj = z[: cfg.n_joints]
    visible = _inside(cfg, kp)
    occluded = np.zeros(cfg.n_joints, dtype=bool)
    ix = np.clip(np.rint(kp[:, 0]).astype(int), 0, w - 1)
    iy = np.clip(np.rint(kp[:, 1]).astype(int), 0, h - 1)
    # A joint lies on its bone's axis; the surface in front of it is at most a limb radius nearer.
    occluded[visible] = depth[iy[visible], ix[visible]] < zj[visible] - 0.2 * scale
    return SyntheticFrame(
        rgb=rgb, depth=depth, keypoints=kp, visible=visible, occluded=occluded, mask=mask,
        palette=clip.palette.astype(np.uint8), index=int(index), clip=clip_id,
        joint_names=joint_names(cfg.n_joints),
    )


# What other scene families draw with (public names: a family module must not reach into private ones).
rng_for = _rng
draw_capsule = _draw_capsule
inside_image = _inside
