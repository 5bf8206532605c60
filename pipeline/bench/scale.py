"""`dkp-pipeline bench scale`: what a dataset of N frames costs the commands that should cost stats, at several N.

For each N of ``--scale-frames`` (default 10k, 100k) a ``folder`` dataset of N tiny frames (8x8 PNGs, 1 000
per sub-folder, a ``keypoints.csv`` annotating every frame, every tenth one ``test``; with ``--scale-depth``
also one 16-bit PNG depth file per frame) is generated under a scratch directory, then each command runs as
its own ``dkp-pipeline`` process, timed wall-clock with its peak RSS from ``wait4`` (the whole process:
interpreter, imports, everything):

- ``manifest_first``: ``run --until manifest`` on a new dataset: walks, hashes every file, writes the memo
  and the manifest artifact (linear in N: compare ``s_per_frame`` across N);
- ``status_noop``: ``status`` right after: every file is ``stat``ed, none is read (the target: 1 M frames in
  <= 10 s and <= 1 GB; on a shared machine compare ``cpu_s`` too, the seconds the command itself ran);
- ``run_noop``: ``run --until manifest`` again: nothing to build;
- ``depth_import`` (``--scale-depth``): ``run --until depth`` with ``depth.provider: files``: every depth file
  read into the depth cache (linear in N).

The datasets are deleted after each N unless kept (``keep``; the CLI keeps them when ``--work`` is given, and a
kept dataset of the same N is reused instead of generated again). A 1 M-frame dataset takes ~4 GB and 1 M inodes
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

PER_DIR = 1000  # frames per sub-folder of images/ (and depth/)
GENERATOR = 1  # bump when write_folder_dataset writes something else
MARKER = ".scale-dataset.json"  # written last by write_folder_dataset (hidden: not a frame, not in the manifest)
FRAME_SIDE = 8
N_JOINTS = 4
TEST_EVERY = 10  # every tenth frame is a test frame


def frame_png(i: int) -> bytes:
    """A unique 8x8 RGB PNG for frame ``i`` (its index in the first pixels, a gradient elsewhere)."""
    import cv2
    import numpy as np

    img = np.full((FRAME_SIDE, FRAME_SIDE, 3), 128, np.uint8)
    img[0, :4, 0] = np.frombuffer(int(i).to_bytes(4, "little"), np.uint8)
    img[1:, :, 1] = np.arange(FRAME_SIDE, dtype=np.uint8)[None, :] * 30
    ok, buf = cv2.imencode(".png", img[:, :, ::-1])
    assert ok
    return buf.tobytes()


def depth_png(i: int) -> bytes:
    """A 16-bit 8x8 depth PNG (millimetres, no holes) for frame ``i``."""
    import cv2
    import numpy as np

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
    import numpy as np

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
    marker = {"frames": n, "depth": depth, "generator": GENERATOR}
    (root / "keypoints.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    opts = {"n_joints": N_JOINTS, "image_size": 16}
    if depth:
        opts |= {"depth_kind": "depth", "depth_scale": 0.001}
    import yaml

    (root / "dataset.yaml").write_text(yaml.safe_dump(opts))
    for p in (root / "keypoints.csv", root / "dataset.yaml"):
        os.utime(p, (past, past))
    (root / MARKER).write_text(json.dumps(marker))  # last: a dataset without it is incomplete
    return {"frames": n, "seconds": round(time.perf_counter() - t0, 2), "bytes_apparent": written}


def timed_cli(args: Sequence[str], env: Optional[dict] = None, cwd: Optional[Path] = None) -> dict:
    """Run ``dkp-pipeline ARGS`` in a fresh Python process: wall seconds (interpreter start to exit), that
    process's own peak RSS (``VmHWM`` read at its exit, so nothing of this process counts) and its CPU seconds
    (user + system, its finished DataLoader workers' included: what it cost the machine, whatever else shared the
    cores)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dkp-scale-") as tmp:
        report = Path(tmp) / "rusage.json"
        cmd = [sys.executable, "-c", _CHILD, str(report), *args]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, env=env, cwd=cwd)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"dkp-pipeline {' '.join(args)} failed ({p.returncode}):\n"
                               f"{p.stderr.decode(errors='replace')[-3000:]}")
        child = json.loads(report.read_text())
    return {"seconds": round(wall, 3), "peak_rss_mib": child["peak_rss_mib"], "cpu_s": child["cpu_s"]}


# The child process: the CLI with ARGS, then its own peak RSS into REPORT. Inline (python -c) so that it imports
# nothing but the CLI: importing pipeline.bench would load torch and count its hundreds of MB.
_CHILD = """
import json, resource, sys
from pipeline.cli import main
report, args = sys.argv[1], sys.argv[2:]
code = 0
try:
    main(args, standalone_mode=False)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
finally:
    # VmHWM is this address space's peak: ru_maxrss survives exec and would report the forking parent's size.
    try:
        kib = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ru, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = round(ru.ru_utime + ru.ru_stime + kids.ru_utime + kids.ru_stime, 3)  # with its finished DataLoader workers
    open(report, "w").write(json.dumps({"peak_rss_mib": round(kib / 1024, 1), "cpu_s": cpu}))
sys.exit(code)
"""


def _marker(root: Path) -> Optional[dict]:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def scale_point(work: Path, n: int, *, depth: bool = False, keep: bool = False, progress: bool = True) -> dict:
    """Every case of the module docstring for one dataset size ``n``, in ``work``/n<N>."""
    base = Path(work) / f"n{n}{'-depth' if depth else ''}"
    root, store, cache = base / "data", base / "store", base / "cache"
    for d in (store, cache):  # every measurement starts without a store and without a memo
        shutil.rmtree(d, ignore_errors=True)
    try:
        want = {"frames": n, "depth": depth, "generator": GENERATOR}
        if root.exists() and _marker(root) == want:  # kept from an earlier run (--keep): generated once
            gen = {"frames": n, "seconds": None, "reused": True}
        else:
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True)
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
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def bench_scale(*, batch: int, size: int, steps: int, device=None, isolate: bool = True,
                scale_frames: Sequence[int] = (10_000, 100_000), depth: bool = False, work: Optional[str] = None,
                keep: bool = False, console=None) -> dict:
    """The cases of the module docstring at each N of ``scale_frames`` (``batch``, ``size``, ``steps`` unused)."""
    import tempfile

    from pipeline.errors import ConfigError

    if not scale_frames or any(not isinstance(n, int) or n < 10 for n in scale_frames):
        raise ConfigError(f"bench scale --scale-frames {scale_frames!r}: give frame counts >= 10, e.g. 10000,100000")
    base = Path(work) if work else Path(tempfile.mkdtemp(prefix="dkp-bench-scale-"))
    need = sum(scale_frames) * (2 if depth else 1) * 4096 * 1.2  # a block per tiny file
    free = shutil.disk_usage(base if base.exists() else base.parent).free
    if need > free:
        raise ConfigError(f"bench scale: the datasets need ~{need / 2**30:.1f} GiB under {base}, "
                          f"{free / 2**30:.1f} GiB are free; pass --work DIR on a larger disk or fewer frames")
    points = []
    for n in scale_frames:
        if console is not None:
            console.print(f"scale: {n} frames under {base} ...", markup=False)
        points.append(scale_point(base, n, depth=depth, keep=keep or bool(work), progress=console is not None))
    if not work and not keep:
        shutil.rmtree(base, ignore_errors=True)
    cases = {f"{c}@{p['frames']}": p["cases"][c] | {"frames": p["frames"]} for p in points for c in p["cases"]}
    ratios, marginal = {}, {}
    first, last = points[0], points[-1]
    for c in last["cases"]:
        # per-frame cost at the largest N over the smallest (a command's fixed start-up weighs less at large N)
        ratios[f"{c} s_per_frame {last['frames']}/{first['frames']}"] = round(
            last["cases"][c]["s_per_frame"] / first["cases"][c]["s_per_frame"], 3) if first is not last else None
        # the cost of each added frame between consecutive sizes: constant when the command is linear in N
        slopes = [(b["cases"][c]["seconds"] - a["cases"][c]["seconds"]) / (b["frames"] - a["frames"])
                  for a, b in zip(points, points[1:])]
        for (a, b), sl in zip(zip(points, points[1:]), slopes):
            marginal[f"{c} {a['frames']}->{b['frames']}"] = round(sl * 1e6, 2)  # us per added frame
        if len(slopes) >= 2:  # None when the first interval is lost in the noise (tiny datasets)
            ratios[f"{c} marginal s_per_frame last/first interval"] = (round(slopes[-1] / slopes[0], 3)
                                                                       if slopes[0] > 0 else None)
    biggest = last["cases"]["status_noop"]
    goals = {f"status_noop seconds at {last['frames']} frames": {
                 "goal": 10.0, "value": biggest["seconds"], "met": biggest["seconds"] <= 10.0, "op": "<="},
             f"status_noop peak MiB at {last['frames']} frames": {
                 "goal": 1024.0, "value": biggest["peak_rss_mib"], "met": biggest["peak_rss_mib"] <= 1024.0,
                 "op": "<="}}
    return {"baseline": f"the smallest dataset ({first['frames']} frames)", "cases": cases, "ratios": ratios,
            "goals": goals, "marginal_us_per_frame": marginal,
            "points": [{k: v for k, v in p.items() if k != "cases"} for p in points],
            "setup": {"frame": f"{FRAME_SIDE}x{FRAME_SIDE} PNG", "per_dir": PER_DIR, "joints": N_JOINTS,
                      "keypoints_csv": "every frame, every tenth test", "depth_files": depth,
                      "memo": "a fresh $DKP_CACHE_DIR per dataset size", "threads": "OMP_NUM_THREADS=1"}}
