"""Write the built-in synthetic dataset to disk in the folder layout (``dkp-pipeline synth OUT``).

Layout (data_manifests/folder.yaml and synthetic.yaml read it)::

    OUT/images/f000000.png    RGB frames, image_size x image_size
    OUT/depth/f000000.npy     float32 (H, W) metric depth in metres (near = small)
    OUT/keypoints.csv         frame,split,x0,y0,x1,y1,...  pixels, x right, y down; empty = missing
    OUT/dataset.yaml          dataset options (depth_kind, depth_scale, n_joints, image_size, protocol)
                              plus a ``synthetic`` block (seed, generator parameters, joints, splits)

Split: frame indices ``0 .. n_train-1`` are ``train`` (self-supervised training and the regression
fit, as AutoLink's TrainSet/TrainRegSet), the last ``round(n * test_fraction)`` frames are ``test``.
Test frames start at the next clip boundary, so no test frame shares a clip (figure, clothes,
walls) with a train frame; the frame ids therefore jump at the split (file ``fNNNNNN`` always holds
``render_frame(cfg, seed, NNNNNN)``).

Resume: every file is written to a temporary name and ``os.replace``d into place, so a killed run
leaves only complete files (plus temporary files, removed by the next run). A marker
``OUT/.synth-in-progress.yaml`` holding the parameters is written first; a re-run with the same
parameters skips frames whose files exist, a re-run with other parameters is refused. ``dataset.yaml``
is written last and marks the dataset complete.

Frames are rendered in chunks of ``CHUNK`` on one process per CPU (joblib) for datasets of 800 frames or
more: 4000 frames of the synthetic preset took ~35 s on one of the development VM's 2 cores, 13 s on both.
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from pipeline.errors import ConfigError, ManifestError
from pipeline.store.io import write_atomic

GENERATOR_VERSION = 1  # bump when the same parameters would produce different files
_MARKER = ".synth-in-progress.yaml"
_TMP_TAG = ".tmp-"
CHUNK = 100  # frames per task when rendering on several processes


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers and re-runs never see a partial file. No fsync:
    this protects against killed processes, which is what a re-run recovers from."""
    write_atomic(path, data, durable=False)


def _frame_id(index: int, width: int) -> str:
    return f"f{index:0{width}d}"


def split_indices(n: int, test_fraction: float, clip_length: int) -> tuple[list[int], list[int]]:
    """Generator indices of the train and test frames (see the module docstring)."""
    n_test = max(1, round(n * test_fraction))
    n_train = n - n_test
    start = math.ceil(n_train / clip_length) * clip_length
    return list(range(n_train)), list(range(start, start + n_test))


def _check_args(n: int, seed: int, image_size: int, test_fraction: float) -> None:
    if not isinstance(n, int) or n < 2:
        raise ConfigError(f"synth: n={n!r} frames; need an integer >= 2 (at least one train and one test frame)")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"synth: seed={seed!r}; need a non-negative integer")
    if not isinstance(image_size, int) or image_size < 16:
        raise ConfigError(f"synth: image_size={image_size!r}; need an integer >= 16 pixels")
    if not 0.0 < test_fraction < 1.0 or round(n * test_fraction) >= n:
        raise ConfigError(f"synth: test_fraction={test_fraction!r} with n={n}; need 0 < fraction < 1 leaving "
                          f"at least one train frame")


def _check_previous(out_dir: Path, params: dict) -> bool:
    """True when ``out_dir`` already holds this dataset, complete. Raises when it holds something else."""
    for name in ("dataset.yaml", _MARKER):
        p = out_dir / name
        if not p.is_file():
            continue
        try:
            old = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ManifestError(f"{p}: unreadable ({e}); delete {out_dir} and run synth again") from None
        old_params = old.get("synthetic", {}).get("parameters") if name == "dataset.yaml" else old
        if old_params != params:
            old_flat, new_flat = _flat(old_params or {}), _flat(params)
            diff = sorted(k for k in set(new_flat) | set(old_flat) if old_flat.get(k) != new_flat.get(k))
            shown = ", ".join(f"{k}: {old_flat.get(k)!r} there, {new_flat.get(k)!r} asked" for k in diff)
            raise ManifestError(
                f"{out_dir} already holds a synthetic dataset with other parameters ({shown}); "
                f"write to another folder or delete {out_dir}"
            )
        if name == "dataset.yaml":
            return True
    if out_dir.exists() and not (out_dir / _MARKER).exists():
        stray = [p.name for p in out_dir.iterdir()]
        if stray:
            raise ManifestError(
                f"{out_dir} is not empty ({', '.join(sorted(stray)[:5])}) and is not a synthetic dataset; "
                f"choose an empty or new folder for synth"
            )
    return False


def _flat(params: dict) -> dict:
    """Parameters with the generator's ``config`` mapping spread out (``config.family``), so that a refusal names
    the field that differs, not the whole mapping."""
    out = {k: v for k, v in params.items() if k != "config"}
    cfg = params.get("config")
    if isinstance(cfg, dict):
        out.update({f"config.{k}": v for k, v in cfg.items()})
    elif "config" in params:
        out["config"] = cfg
    return out


def _remove_stale_tmp(*dirs: Path) -> None:
    for d in dirs:
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".") and _TMP_TAG in p.name:
                    p.unlink(missing_ok=True)


def write_synthetic(
    out_dir: Path,
    *,
    n: int,
    seed: int,
    image_size: int = 128,
    test_fraction: float = 0.2,
    progress: bool = True,
    n_joints: Optional[int] = None,
    clip_length: int = 32,
    workers: Optional[int] = None,
    family: str = "figures",
) -> dict[str, Any]:
    """Render ``n`` synthetic frames into ``out_dir`` in the folder layout (module docstring), on ``workers``
    processes (None: :func:`default_workers`; the files do not depend on it). ``family``: the scene family
    (``dkp_core.synthetic.FAMILIES``); ``n_joints`` None = the family's default (16 for figures, 15 for puppets).

    Returns a summary dict: ``out_dir`` (str), ``n_train``, ``n_test``, ``written`` (frames rendered
    by this call), ``skipped`` (frames already on disk), ``image_size``, ``n_joints``, ``seed``,
    ``complete`` (True). Raises :class:`ConfigError` for bad arguments and :class:`ManifestError`
    when ``out_dir`` holds something else.
    """
    from dkp_core.synthetic import SyntheticConfig, joint_names, left_right_pairs

    _check_args(n, seed, image_size, test_fraction)
    out_dir = Path(out_dir)
    try:
        cfg = SyntheticConfig(image_size=image_size, n_joints=n_joints, clip_length=clip_length, family=family)
    except ValueError as e:
        raise ConfigError(f"synth: {e}") from None
    n_joints = cfg.n_joints
    params = {
        "generator_version": GENERATOR_VERSION,
        "n": n,
        "seed": seed,
        "test_fraction": float(test_fraction),
        "config": generator_parameters(cfg),
    }
    train, test = split_indices(n, test_fraction, cfg.clip_length)
    summary = {"out_dir": str(out_dir), "n_train": len(train), "n_test": len(test), "written": 0, "skipped": 0,
               "image_size": image_size, "n_joints": n_joints, "seed": seed, "complete": True}
    if _check_previous(out_dir, params):
        summary["skipped"] = n
        return summary

    images, depth = out_dir / "images", out_dir / "depth"
    images.mkdir(parents=True, exist_ok=True)
    depth.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / _MARKER, yaml.safe_dump(params, sort_keys=True).encode())
    _remove_stale_tmp(out_dir, images, depth)

    width = max(6, len(str(test[-1])))
    jobs = [(i, "train") for i in train] + [(i, "test") for i in test]
    chunks = [jobs[k:k + CHUNK] for k in range(0, len(jobs), CHUNK)]
    n_workers = max(1, min(workers if workers is not None else default_workers(n), len(chunks)))
    rows = []
    bar = _progress(progress, len(jobs))
    try:
        if n_workers == 1:
            done = (_render_chunk(cfg, seed, chunk, images, depth, width) for chunk in chunks)
        else:  # every frame is a pure function of (config, seed, index): the same files with any worker count
            from joblib import Parallel, delayed

            done = Parallel(n_jobs=n_workers, return_as="generator")(
                delayed(_render_chunk)(cfg, seed, chunk, images, depth, width) for chunk in chunks)
        for chunk_rows, written in done:  # in chunk order
            rows += chunk_rows
            summary["written"] += written
            summary["skipped"] += len(chunk_rows) - written
            if bar is not None:
                bar[0].advance(bar[1], len(chunk_rows))
    finally:
        if bar is not None:
            bar[0].stop()

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["frame", "split"] + [f"{c}{j}" for j in range(n_joints) for c in ("x", "y")])
    w.writerows(rows)
    _atomic_write(out_dir / "keypoints.csv", buf.getvalue().encode())

    description = {
        # Options the dataset manifest reads (pipeline/data/spec.py _OVERRIDABLE).
        "n_joints": n_joints,
        "image_size": image_size,
        "protocol": "l2",
        "depth_kind": "depth",
        "depth_scale": 1.0,
        # Information only: how to regenerate the data and what the joints are.
        "synthetic": {
            "parameters": params,
            "seed": seed,
            "units": {"keypoints": "pixels (x right, y down)", "depth": "metres along the optical axis"},
            "splits": {"train": len(train), "test": len(test),
                       "rule": "train = indices 0..n_train-1; test starts at the next clip boundary"},
            "joint_names": list(joint_names(n_joints, cfg.family)),
            "left_right_pairs": [list(p) for p in left_right_pairs(n_joints, cfg.family)],
        },
    }
    _atomic_write(out_dir / "dataset.yaml", yaml.safe_dump(description, sort_keys=False).encode())
    (out_dir / _MARKER).unlink(missing_ok=True)
    return summary


def generator_parameters(cfg) -> dict:
    """``cfg`` (a SyntheticConfig) as the ``config`` mapping ``dataset.yaml`` records: every field, except the
    scene family when it is the first one (``figures``), so that datasets written before a second family existed
    keep their parameters (which teach's and eval's keys hash) byte for byte."""
    from dkp_core.synthetic import DEFAULT_FAMILY

    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    if out.get("family") == DEFAULT_FAMILY:
        del out["family"]
    return out


def default_workers(n: int) -> int:
    """One process per CPU (at most 8) for a dataset big enough to pay for starting them, else 1."""
    if n < 8 * CHUNK:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _render_chunk(cfg, seed: int, chunk: list[tuple[int, str]], images: Path, depth: Path,
                  width: int) -> tuple[list[list[str]], int]:
    """Render and write the frames of ``chunk`` that are not on disk yet; (keypoints.csv rows, frames written)."""
    import cv2

    from dkp_core.synthetic import frame_keypoints, render_frame

    rows, written = [], 0
    for index, split in chunk:
        fid = _frame_id(index, width)
        png, npy = images / f"{fid}.png", depth / f"{fid}.npy"
        if png.is_file() and npy.is_file():
            kp, visible = frame_keypoints(cfg, seed, index)
        else:
            fr = render_frame(cfg, seed, index)
            kp, visible = fr.keypoints, fr.visible
            ok, enc = cv2.imencode(".png", cv2.cvtColor(fr.rgb, cv2.COLOR_RGB2BGR))
            if not ok:
                raise RuntimeError(f"OpenCV could not encode frame {fid} as PNG")
            _atomic_write(png, enc.tobytes())
            buf = io.BytesIO()
            np.save(buf, fr.depth.astype(np.float32), allow_pickle=False)
            _atomic_write(npy, buf.getvalue())
            written += 1
        cells = []
        for (x, y), v in zip(kp, visible):
            cells += [f"{x:.3f}", f"{y:.3f}"] if v else ["", ""]
        rows.append([fid, split] + cells)
    return rows, written


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    task = p.add_task("synth", total=total)
    p.start()
    return p, task
