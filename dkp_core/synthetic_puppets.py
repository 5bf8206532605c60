"""The second built-in scene family, ``puppets``: jointed mannequins in a room with pillars.

Why it exists: a recipe tuned on one scene generator can fit that generator's quirks (the figure's proportions,
its joint set, the kind of clutter). This family draws the same *kind* of problem differently, so a recipe tuned
on ``figures`` (:mod:`dkp_core.synthetic`) can be validated here (docs/synthetic.md, "Scene families"):

- **another figure model**: 15 joints in another order (left before right, no thorax or head top: the head's
  centre), other proportions (a big head, a long tapered barrel torso, long arms, short legs, wide hips) and a
  ball at every elbow, knee, shoulder and hip, each body part in its own colour (5 colour slots, not 4);
- **other clutter**: free-standing pillars between the figure and the back wall (clutter with its own depth,
  1.5 m or more behind the figure), stripes, rings and checker patches, and distractors that are whole puppet
  limbs (two capsules and a ball) in the figure's colours;
- **other lighting**: a key light plus a tinted fill light from the other side, and a colour cast per clip.

Colour stays ambiguous (the distractors wear the figure's colours, shaded by the same lights) and depth does not
(every figure pixel is nearer than every pillar and wall pixel), as in the first family. Same config
(:class:`dkp_core.synthetic.SyntheticConfig` with ``family="puppets"``), same purity: a frame is a function of
``(cfg, seed, index)``; the random streams are this family's own (labels 11, 12), so the same seed draws
unrelated scenes in the two families.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from dkp_core.synthetic import SyntheticConfig, SyntheticFrame, draw_capsule, inside_image, rng_for

JOINT_NAMES: tuple[str, ...] = (
    "head", "neck", "pelvis",
    "l_shoulder", "l_elbow", "l_hand",
    "r_shoulder", "r_elbow", "r_hand",
    "l_hip", "l_knee", "l_foot",
    "r_hip", "r_knee", "r_foot",
)
SUPPORTED_N_JOINTS = (15,)
DEFAULT_N_JOINTS = 15
_LEFT_RIGHT_PAIRS: tuple[tuple[int, int], ...] = ((3, 6), (4, 7), (5, 8), (9, 12), (10, 13), (11, 14))

# Colour slots of a clip's palette: every body part its own.
_HEAD, _TORSO, _ARMS, _LEGS, _BALLS = 0, 1, 2, 3, 4
# Capsules (joint a, joint b, radius at a, radius at b in m, colour slot); the torso tapers from chest to hips.
_LIMBS: tuple[tuple[int, int, float, float, int], ...] = (
    (1, 2, 0.17, 0.12, _TORSO),
    (3, 4, 0.045, 0.04, _ARMS), (4, 5, 0.04, 0.03, _ARMS),
    (6, 7, 0.045, 0.04, _ARMS), (7, 8, 0.04, 0.03, _ARMS),
    (9, 10, 0.055, 0.05, _LEGS), (10, 11, 0.05, 0.04, _LEGS),
    (12, 13, 0.055, 0.05, _LEGS), (13, 14, 0.05, 0.04, _LEGS),
)
_BALL_JOINTS = (3, 4, 6, 7, 9, 10, 12, 13)  # shoulders, elbows, hips, knees: a sphere each
_BALL_RADIUS = 0.07
_HEAD_RADIUS = 0.15
# Bone lengths in metres at scale 1 (a 1.5 m puppet): long arms, short legs, compared with `figures`.
_LEN = {"torso": 0.58, "neck": 0.08, "head": 0.17, "shoulder": 0.23, "upper_arm": 0.33, "forearm": 0.36,
        "hip": 0.14, "thigh": 0.33, "shin": 0.32}
# Angle ranges (rad): (low, high); each follows base + amp * sin(2 pi f t + phase) inside its clip.
_ANGLE_RANGES: dict[str, tuple[float, float]] = {
    "lean": (-0.3, 0.4), "side": (-0.3, 0.3), "nod": (-0.4, 0.4),
    "l_arm_flex": (-1.0, 2.9), "l_arm_abd": (0.0, 2.0), "l_elbow": (0.0, 2.5),
    "r_arm_flex": (-1.0, 2.9), "r_arm_abd": (0.0, 2.0), "r_elbow": (0.0, 2.5),
    "l_leg_flex": (-0.6, 1.9), "l_leg_abd": (0.0, 0.8), "l_knee": (0.0, 2.3),
    "r_leg_flex": (-0.6, 1.9), "r_leg_abd": (0.0, 0.8), "r_knee": (0.0, 2.3),
}
_ANGLE_NAMES = tuple(_ANGLE_RANGES)
_LO = np.array([_ANGLE_RANGES[n][0] for n in _ANGLE_NAMES])
_HI = np.array([_ANGLE_RANGES[n][1] for n in _ANGLE_NAMES])
_STREAM_CLIP = 11
_STREAM_FRAME = 12
_AMBIENT = 0.3


def joint_names(n_joints: int) -> tuple[str, ...]:
    _check(n_joints)
    return JOINT_NAMES


def left_right_pairs(n_joints: int) -> tuple[tuple[int, int], ...]:
    _check(n_joints)
    return _LEFT_RIGHT_PAIRS


def _check(n_joints: int) -> None:
    if n_joints not in SUPPORTED_N_JOINTS:
        raise ValueError(f"n_joints={n_joints!r} is not a synthetic skeleton (scene family 'puppets'); choose one of "
                         f"{SUPPORTED_N_JOINTS}")


@dataclass(frozen=True)
class _Clip:
    palette: np.ndarray  # (5, 3) float: head, torso, arms, legs, balls
    scale: float
    lengths: dict
    angle_base: np.ndarray
    angle_amp: np.ndarray
    angle_freq: np.ndarray
    angle_phase: np.ndarray
    yaw0: float
    yaw_rate: float
    root: np.ndarray  # (3,) x as a fraction of the half-width at the root depth, y in m, z in m
    root_amp: np.ndarray
    root_freq: float
    root_phase: np.ndarray
    key: np.ndarray  # (3,) unit vector towards the key light
    fill: np.ndarray  # (3,) unit vector towards the fill light
    fill_rgb: np.ndarray  # (3,) the fill light's colour, 8-bit levels at full incidence
    cast: np.ndarray  # (3,) per-channel gain of the whole image (white balance)
    wall_inv: np.ndarray  # (3,) inverse-depth plane a + b x + c y of the back wall
    wall_colour: np.ndarray  # (3,)
    pillars: tuple  # (x0, x1, depth m, colour (3,)), drawn far to near
    clutter: tuple  # drawing commands on the wall and pillars


def _make_clip(cfg: SyntheticConfig, seed: int, clip: int) -> _Clip:
    rng = rng_for(seed, _STREAM_CLIP, clip)
    h, w = cfg.height, cfg.width
    palette = np.stack([np.array([rng.uniform(140, 240), rng.uniform(100, 200), rng.uniform(70, 170)])]
                       + [rng.integers(25, 235, size=3).astype(np.float64) for _ in range(4)])
    scale = rng.uniform(0.9, 1.15)
    lengths = {k: v * scale * rng.uniform(0.9, 1.1) for k, v in _LEN.items()}
    base = rng.uniform(_LO, _HI)
    amp = rng.uniform(0.0, 0.3, size=len(_LO)) * (_HI - _LO)
    freq = rng.uniform(0.01, 0.05, size=len(_LO))
    phase = rng.uniform(0, 2 * np.pi, size=len(_LO))
    root = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.1, 0.15), rng.uniform(*cfg.figure_depth)])
    root_amp = np.array([rng.uniform(0, 0.25), rng.uniform(0, 0.05), rng.uniform(0, 0.3)])
    root_phase = rng.uniform(0, 2 * np.pi, size=3)
    key = np.array([rng.uniform(-0.9, -0.2) * rng.choice([-1.0, 1.0]), rng.uniform(-0.8, 0.0), -1.0])
    key /= np.linalg.norm(key)
    fill = np.array([-np.sign(key[0]) * rng.uniform(0.4, 1.0), rng.uniform(-0.2, 0.6), -0.6])
    fill /= np.linalg.norm(fill)
    fill_rgb = rng.uniform(10, 70, size=3)
    cast = rng.uniform(0.85, 1.15, size=3)

    # Back wall: a fronto-parallel-ish plane (small yaw/pitch) at wall_depth.
    f = cfg.focal * h
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    yaw, pitch = rng.uniform(-0.25, 0.25), rng.uniform(-0.1, 0.1)
    normal = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    d = rng.uniform(*cfg.wall_depth) * normal[2]
    wall = np.array([(normal[2] - normal[0] * cx / f - normal[1] * cy / f) / d, normal[0] / (f * d), normal[1] / (f * d)])
    corners = np.array([[1.0, 0, 0], [1.0, w - 1, 0], [1.0, 0, h - 1], [1.0, w - 1, h - 1]])
    max_inv = (corners @ wall).max()
    if max_inv > 1.0 / (cfg.wall_depth[0] - 1.0):  # keep every wall pixel 2 m or more behind the figure
        wall *= (1.0 / (cfg.wall_depth[0] - 1.0)) / max_inv
    wall_colour = rng.integers(40, 220, size=3).astype(np.float64)

    # Pillars: full-height vertical slabs between the figure (its farthest point ~ figure_depth[1] + 0.5 m) and the
    # wall, at least 1.5 m behind the figure; they carry clutter too.
    near = cfg.figure_depth[1] + 1.5
    far = max(near, cfg.wall_depth[0] - 1.2)
    n_pillars = int(rng.integers(0, 4))
    pillars = []
    for _ in range(n_pillars):
        x0 = rng.uniform(-0.1, 0.9) * w
        pillars.append((float(x0), float(x0 + rng.uniform(0.08, 0.25) * w), float(rng.uniform(near, far)),
                        rng.integers(40, 220, size=3).astype(np.float64)))
    pillars.sort(key=lambda p: -p[2])  # far to near

    m = cfg.n_clutter
    side = float(min(h, w))
    centre = rng.uniform(0, 1, size=(m, 2)) * np.array([w - 1, h - 1])
    is_distractor = rng.random(m) < cfg.distractor_fraction
    kind = rng.integers(0, 3, size=m)  # stripes, ring, checker patch
    ang = rng.uniform(0, 2 * np.pi, size=m)
    bend = rng.uniform(0.0, 2.2, size=m)
    u = rng.random((m, 3))
    colour = rng.integers(0, 256, size=(m, 2, 3))
    slots = rng.integers(0, 5, size=(m, 2))
    clutter = []
    for i in range(m):
        c = centre[i]
        if is_distractor[i]:
            # a whole puppet limb: upper segment, joint ball, lower segment, in two of the figure's colours
            l1 = (0.07 + 0.1 * u[i, 0]) * side
            r = (0.02 + 0.025 * u[i, 1]) * side
            d1 = np.array([np.cos(ang[i]), np.sin(ang[i])])
            d2 = np.array([np.cos(ang[i] + bend[i]), np.sin(ang[i] + bend[i])])
            mid = c + l1 * d1
            clutter.append(("limb", c, mid, mid + l1 * d2, r, int(slots[i, 0]), int(slots[i, 1])))
            continue
        col = tuple(int(v) for v in colour[i, 0])
        col2 = tuple(int(v) for v in colour[i, 1])
        if kind[i] == 0:  # stripes: parallel bars in two colours
            n = 2 + int(3 * u[i, 2])
            half = (0.06 + 0.12 * u[i, 0]) * side
            step = max(1.0, (0.02 + 0.03 * u[i, 1]) * side)
            clutter.append(("stripes", c, half, step, n, ang[i], col, col2))
        elif kind[i] == 1:  # ring
            clutter.append(("ring", (int(c[0]), int(c[1])), max(2, int((0.04 + 0.08 * u[i, 0]) * side)),
                            max(1, int((0.01 + 0.02 * u[i, 1]) * side)), col))
        else:  # checker patch
            clutter.append(("checker", (int(c[0]), int(c[1])), max(2, int((0.02 + 0.03 * u[i, 0]) * side)),
                            2 + int(2 * u[i, 1]), col, col2))
    return _Clip(palette=palette, scale=scale, lengths=lengths, angle_base=base, angle_amp=amp, angle_freq=freq,
                 angle_phase=phase, yaw0=rng.uniform(-np.pi, np.pi), yaw_rate=rng.uniform(-0.08, 0.08), root=root,
                 root_amp=root_amp, root_freq=rng.uniform(0.01, 0.04), root_phase=root_phase, key=key, fill=fill,
                 fill_rgb=fill_rgb, cast=cast, wall_inv=wall, wall_colour=wall_colour, pillars=tuple(pillars),
                 clutter=tuple(clutter))


def _two_bone(root: np.ndarray, down: np.ndarray, fwd: np.ndarray, out: np.ndarray, flex: float, abd: float,
              bend: float, bend_dir: float, l1: float, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """(middle joint, end joint) of a limb hanging along ``down``, swung forward by ``flex`` and outward by ``abd``,
    its second bone bent by ``bend`` forward (arms, +1) or backward (legs, -1)."""
    d1 = np.cos(abd) * (np.cos(flex) * down + np.sin(flex) * fwd) + np.sin(abd) * out
    d1 /= np.linalg.norm(d1)
    side = fwd - (fwd @ d1) * d1
    side /= max(float(np.linalg.norm(side)), 1e-9)
    d2 = np.cos(bend) * d1 + bend_dir * np.sin(bend) * side
    mid = root + l1 * d1
    return mid, mid + l2 * d2


def _pose(cfg: SyntheticConfig, clip: _Clip, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``t``: joints (15, 3) in metres (camera axes: x right, y down, z forward), pixel (x, y) (15, 2)."""
    a = dict(zip(_ANGLE_NAMES, np.clip(clip.angle_base + clip.angle_amp * np.sin(
        2 * np.pi * clip.angle_freq * t + clip.angle_phase), _LO, _HI)))
    L = clip.lengths
    yaw = clip.yaw0 + clip.yaw_rate * t
    c, s = np.cos(yaw), np.sin(yaw)
    left, fwd, up = np.array([c, 0.0, s]), np.array([s, 0.0, -c]), np.array([0.0, -1.0, 0.0])
    spine = np.cos(a["lean"]) * np.cos(a["side"]) * up + np.sin(a["lean"]) * fwd + np.sin(a["side"]) * left
    spine /= np.linalg.norm(spine)
    t_left = left - (left @ spine) * spine
    t_left /= np.linalg.norm(t_left)
    t_fwd = np.cross(spine, t_left)  # completes the torso frame (facing direction)
    if t_fwd @ fwd < 0:
        t_fwd = -t_fwd
    p = np.zeros((15, 3))
    p[2] = 0.0  # pelvis at the root
    p[1] = spine * L["torso"]
    headdir = np.cos(a["nod"]) * spine + np.sin(a["nod"]) * t_fwd
    p[0] = p[1] + spine * L["neck"] + headdir * L["head"]
    for sgn, sh, el, hd, side in ((1.0, 3, 4, 5, "l"), (-1.0, 6, 7, 8, "r")):
        p[sh] = p[1] + sgn * L["shoulder"] * t_left
        p[el], p[hd] = _two_bone(p[sh], -spine, t_fwd, sgn * t_left, a[f"{side}_arm_flex"], a[f"{side}_arm_abd"],
                                 a[f"{side}_elbow"], 1.0, L["upper_arm"], L["forearm"])
    for sgn, hip, kn, ft, side in ((1.0, 9, 10, 11, "l"), (-1.0, 12, 13, 14, "r")):
        p[hip] = sgn * L["hip"] * left
        p[kn], p[ft] = _two_bone(p[hip], -up, fwd, sgn * left, a[f"{side}_leg_flex"], a[f"{side}_leg_abd"],
                                 a[f"{side}_knee"], -1.0, L["thigh"], L["shin"])
    h, w = cfg.height, cfg.width
    focal = cfg.focal * h
    osc = np.sin(2 * np.pi * clip.root_freq * t + clip.root_phase)
    z = float(np.clip(clip.root[2] + clip.root_amp[2] * osc[2], 1.0, None))
    x = (clip.root[0] + clip.root_amp[0] * osc[0]) * (w / 2.0) * z / focal
    pts = p + np.array([x, clip.root[1] + clip.root_amp[1] * osc[1], z])
    kp = np.stack([focal * pts[:, 0] / pts[:, 2] + (w - 1) / 2.0, focal * pts[:, 1] / pts[:, 2] + (h - 1) / 2.0], 1)
    return pts, kp


def frame_keypoints(cfg: SyntheticConfig, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints (15, 2) float32 pixel (x, y) and visible (15,) bool of frame ``index``, without rasterising."""
    clip_id, t = divmod(int(index), cfg.clip_length)
    _, kp = _pose(cfg, _make_clip(cfg, seed, clip_id), t)
    kp = kp.astype(np.float32)
    return kp, inside_image(cfg, kp)


def _background(cfg: SyntheticConfig, clip: _Clip) -> tuple[np.ndarray, np.ndarray]:
    """RGB (H, W, 3) uint8 and depth (H, W) float32 m of the wall, the pillars and their clutter."""
    h, w = cfg.height, cfg.width
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    a, b, c = (np.float32(v) for v in clip.wall_inv)
    depth = np.broadcast_to(1.0 / (a + b * xs + c * ys), (h, w)).astype(np.float32)
    # light falls off towards the top (a lamp low on one side): brighter at the bottom, unlike `figures`
    shade = (0.7 + 0.3 * ys / h + 0.1 * np.sign(clip.key[0]) * (xs / w - 0.5))[..., None]  # (H, W, 1)
    rgb = np.ascontiguousarray(np.clip(clip.wall_colour * shade, 0, 255).astype(np.uint8))
    for x0, x1, z, col in clip.pillars:
        i0, i1 = max(0, int(x0)), min(w, int(np.ceil(x1)))
        if i0 >= i1:
            continue
        edge = np.linspace(0.75, 1.05, i1 - i0, dtype=np.float32)[None, :, None]  # a rounded-looking face
        rgb[:, i0:i1] = np.clip(col * edge * (0.8 + 0.2 * ys / h)[..., None], 0, 255).astype(np.uint8)
        depth[:, i0:i1] = np.minimum(depth[:, i0:i1], np.float32(z))
    focal = cfg.focal * h
    for item in clip.clutter:
        kind = item[0]
        if kind == "limb":
            _, p0, p1, p2, r, s1, s2 = item
            for q0, q1, slot in ((p0, p1, s1), (p1, p2, s2)):
                draw_capsule(rgb, None, None, np.asarray(q0), np.asarray(q1), r, 0.8 * r, 0.0, 0.0,
                             clip.palette[slot], clip.key, focal, _AMBIENT, (clip.fill, clip.fill_rgb))
            draw_capsule(rgb, None, None, np.asarray(p1), np.asarray(p1), 1.5 * r, 1.5 * r, 0.0, 0.0,
                         clip.palette[_BALLS], clip.key, focal, _AMBIENT, (clip.fill, clip.fill_rgb))
        elif kind == "stripes":
            _, cen, half, step, n, ang, col, col2 = item
            d = np.array([np.cos(ang), np.sin(ang)])
            nrm = np.array([-d[1], d[0]])
            for k in range(n):
                off = cen + (k - (n - 1) / 2) * step * nrm
                q0, q1 = off - half * d, off + half * d
                cv2.line(rgb, (int(q0[0]), int(q0[1])), (int(q1[0]), int(q1[1])), col if k % 2 == 0 else col2,
                         thickness=max(1, int(step / 2)), lineType=cv2.LINE_AA)
        elif kind == "ring":
            _, cen, rad, thick, col = item
            cv2.circle(rgb, cen, rad, col, thickness=thick, lineType=cv2.LINE_AA)
        else:  # checker
            _, cen, cell, n, col, col2 = item
            for i in range(n):
                for j in range(n):
                    q = (cen[0] + (i - n // 2) * cell, cen[1] + (j - n // 2) * cell)
                    cv2.rectangle(rgb, q, (q[0] + cell - 1, q[1] + cell - 1), col if (i + j) % 2 == 0 else col2, -1)
    return rgb, depth


def render_frame(cfg: SyntheticConfig, seed: int, index: int) -> SyntheticFrame:
    """Frame ``index`` of the ``puppets`` sequence ``seed``: a pure function of (cfg, seed, index), the same
    :class:`~dkp_core.synthetic.SyntheticFrame` as the first family (palette (5, 3) here)."""
    clip_id, t = divmod(int(index), cfg.clip_length)
    clip = _make_clip(cfg, seed, clip_id)
    frame_rng = rng_for(seed, _STREAM_FRAME, index)
    h, w = cfg.height, cfg.width
    focal = cfg.focal * h
    rgb, depth = _background(cfg, clip)
    pts, kp = _pose(cfg, clip, t)
    z = pts[:, 2]
    mask = np.zeros((h, w), dtype=bool)
    light = (clip.fill, clip.fill_rgb)
    s = clip.scale
    for ja, jb, ra, rb, slot in _LIMBS:
        draw_capsule(rgb, depth, mask, kp[ja], kp[jb], focal * ra * s / z[ja], focal * rb * s / z[jb], z[ja], z[jb],
                     clip.palette[slot], clip.key, focal, _AMBIENT, light)
    for j in _BALL_JOINTS:
        r = focal * _BALL_RADIUS * s / z[j]
        draw_capsule(rgb, depth, mask, kp[j], kp[j], r, r, z[j], z[j], clip.palette[_BALLS], clip.key, focal,
                     _AMBIENT, light)
    r = focal * _HEAD_RADIUS * s / z[0]
    draw_capsule(rgb, depth, mask, kp[0], kp[0], r, r, z[0], z[0], clip.palette[_HEAD], clip.key, focal, _AMBIENT,
                 light)
    img = rgb.astype(np.float32) * clip.cast.astype(np.float32)  # (H, W, 3) the clip's colour cast
    if cfg.noise_std > 0:
        img += frame_rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(cfg.noise_std)
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    kp = kp.astype(np.float32)
    visible = inside_image(cfg, kp)
    ix = np.clip(np.rint(kp[:, 0]).astype(int), 0, w - 1)
    iy = np.clip(np.rint(kp[:, 1]).astype(int), 0, h - 1)
    occluded = np.zeros(15, dtype=bool)
    occluded[visible] = depth[iy[visible], ix[visible]] < z[visible] - 0.2 * s
    return SyntheticFrame(rgb=rgb, depth=depth, keypoints=kp, visible=visible, occluded=occluded, mask=mask,
                          palette=clip.palette.astype(np.uint8), index=int(index), clip=clip_id,
                          joint_names=JOINT_NAMES)
