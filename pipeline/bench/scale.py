"""`dkp-pipeline bench scale`: what a dataset of N frames costs the commands that should cost stats, at several N.

For each N of ``--scale-frames`` (default 10k, 100k) a ``folder`` dataset of N tiny frames (8x8 PNGs, 1 000
per sub-folder, a ``keypoints.csv`` annotating every frame, every tenth one ``test``; with ``--scale-depth``
also one 16-bit PNG depth file per frame) is generated under a scratch directory, then each command runs as
its own ``dkp-pipeline`` process, timed wall-clock with its peak RSS from ``wait4`` (the whole process:
interpreter, imports, everything):

- ``manifest_first``: ``run --until manifest`` on a new dataset: walks, hashes every file, writes the memo
  and the manifest artifact (linear in N: compare ``s_per_frame`` across N);
- ``status_noop``: ``status`` right after: every file is ``stat``ed, none is read (the target: 1 M frames in
  <= 10 s and <= 1 GB);
- ``run_noop``: ``run --until manifest`` again: nothing to build;
- ``depth_import`` (``--scale-depth``): ``run --until depth`` with ``depth.provider: files``: every depth file
  read into the depth cache (linear in N).

The datasets are deleted after each N (``--keep`` keeps them). A 1 M-frame dataset takes ~4 GB and 1 M inodes
(2 M with depth files) and minutes to generate: run it once, not in tests.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

PER_DIR = 1000  # frames per sub-folder of images/ (and depth/)
FRAME_SIDE = 8
N_JOINTS = 4
TEST_EVERY = 10  # every tenth frame is a test frame


def frame_png(i: int) -> bytes:
    """A unique 8x8 RGB PNG for frame ``i`` (its index in the first pixels, a gradient elsewhere)."""
    import cv2

    img = np.full((FRAME_SIDE, FRAME_SIDE, 3), 128, np.uint8)
    img[0, :4, 0] = np.frombuffer(int(i).to_bytes(4, "little"), np.uint8)
    img[1:, :, 1] = np.arange(FRAME_SIDE, dtype=np.uint8)[None, :] * 30
    ok, buf = cv2.imencode(".png", img[:, :, ::-1])
    assert ok
    return buf.tobytes()


def depth_png(i: int) -> bytes:
    """A 16-bit 8x8 depth PNG (millimetres, no holes) for frame ``i``."""
    import cv2

    d = (1000 + 10 * np.arange(FRAME_SIDE * FRAME_SIDE, dtype=np.uint16).reshape(FRAME_SIDE, FRAME_SIDE)
         + np.uint16(i % 1000))
    ok, buf = cv2.imencode(".png", d)
    assert ok
    return buf.tobytes()


def rel_name(i: int) -> str:
    return f"v{i // PER_DIR:04d}/f{i:07d}"


def write_folder_dataset(root: Path, n: int, *, depth: bool = False, progress: bool = False) -> dict:
    """Generate the ``folder`` dataset described in the module docstring under ``root`` (must not exist).

    Every file gets an mtime an hour in the past, so the fingerprint memo may keep it (files younger than
    2 s are never memoised). Returns ``{"frames", "seconds", "bytes_apparent"}``."""
    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} exists; the scale bench writes a new dataset")
    t0 = time.perf_counter()
    (root / "images").mkdir(parents=True)
    past = time.time() - 3600
    written = 0
    rows = []
    for d in range(0, n, PER_DIR):
        sub = rel_name(d).split("/")[0]
        (root / "images" / sub).mkdir()
        if depth:
            (root / "depth" / sub).mkdir(parents=True, exist_ok=True)
        for i in range(d, min(d + PER_DIR, n)):
            name = rel_name(i)
            for path, data in [(root / "images" / f"{name}.png", frame_png(i))] + (
                    [(root / "depth" / f"{name}.png", depth_png(i))] if depth else []):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, data)
                os.close(fd)
                os.utime(path, (past, past))
                written += len(data)
            xy = (np.arange(N_JOINTS * 2) % FRAME_SIDE).astype(int)
            rows.append(f"{name},{'test' if i % TEST_EVERY == 0 else 'train'}," + ",".join(map(str, xy)))
        if progress and (d // PER_DIR) % 100 == 99:
            print(f"  {d + PER_DIR} frames written ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    header = "frame,split," + ",".join(f"{a}{j}" for j in range(N_JOINTS) for a in ("x", "y"))
    (root / "keypoints.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    opts = {"n_joints": N_JOINTS, "image_size": 16}
    if depth:
        opts |= {"depth_kind": "depth", "depth_scale": 0.001}
    import yaml

    (root / "dataset.yaml").write_text(yaml.safe_dump(opts))
    for p in (root / "keypoints.csv", root / "dataset.yaml"):
        os.utime(p, (past, past))
    return {"frames": n, "seconds": round(time.perf_counter() - t0, 2), "bytes_apparent": written}


def timed_cli(args: Sequence[str], env: Optional[dict] = None, cwd: Optional[Path] = None) -> dict:
    """Run ``dkp-pipeline ARGS`` as a child process; wall seconds and its own peak RSS (``wait4``)."""
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    out, err = p.stdout.read(), p.stderr.read()  # drained before wait4: a full pipe would block the child
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    return {"seconds": round(wall, 3), "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
            "stdout_tail": out.decode(errors="replace")[-400:]}


def scale_point(work: Path, n: int, *, depth: bool = False, keep: bool = False, progress: bool = True) -> dict:
    """Every case of the module docstring for one dataset size ``n``, in ``work``/n<N>."""
    base = Path(work) / f"n{n}"
    root, store, cache = base / "data", base / "store", base / "cache"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    try:
        gen = write_folder_dataset(root, n, depth=depth, progress=progress)
        env = dict(os.environ, DKP_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
        conf = base / "scale.yaml"
        conf.write_text(json.dumps({"name": f"scale{n}", "data": {"manifest": "folder", "root": str(root)},
                                    "depth": {"provider": "files" if depth else "midas"}}))
        common = [str(conf), "--store", str(store)]
        cases = {"manifest_first": timed_cli(["run", *common, "--until", "manifest"], env),
                 "status_noop": timed_cli(["status", *common], env),
                 "run_noop": timed_cli(["run", *common, "--until", "manifest"], env)}
        if depth:
            cases["depth_import"] = timed_cli(["run", *common, "--until", "depth"], env)
        for c in cases.values():
            c["s_per_frame"] = c["seconds"] / n
        memo_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        return {"frames": n, "generate": gen, "cases": cases, "memo_bytes": memo_bytes}
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
