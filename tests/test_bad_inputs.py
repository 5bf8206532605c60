"""Bad inputs and untrusted files, each through the CLI (issue 7; the table is docs/reliability.md).

Every case: exit code 2, one message naming the file and the fix, no traceback, and nothing already
finished lost or overwritten (a finished depth artifact is built first and its bytes compared after).
Most cases run `dkp-pipeline depth` on the tiny synthetic experiment (no torch import, ~1 s); the
checkpoint/weights cases need torch and cost a few seconds each.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY_YAML, run_cli

# --------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory) -> Path:
    """The tiny experiment's 48-frame 32-px dataset and a store holding its finished depth artifact,
    made once per module (each test works on its own copy)."""
    from pipeline.data.synth import write_synthetic

    base = tmp_path_factory.mktemp("prebuilt")
    write_synthetic(base / "data", n=48, seed=0, image_size=32, progress=False)
    e = Exp(base, None)
    p = e.cli_subprocess("depth")
    assert p.returncode == 0, p.stderr
    return base


class Exp:
    """A copy of the tiny dataset (+ store) + experiment YAML in ``tmp_path``; ``cli`` runs dkp-pipeline.

    The dataset root is not part of any key, so a copied store is as fresh under its new root."""

    def __init__(self, tmp_path: Path, source: Path | None, *, with_store: bool = False) -> None:
        self.cwd = tmp_path
        self.root = tmp_path / "data"
        self.store = tmp_path / "store"
        if source is not None:
            shutil.copytree(source / "data", self.root)
            if with_store:
                shutil.copytree(source / "store", self.store)
        self.yaml = tmp_path / "tiny.yaml"
        self.yaml.write_text(TINY_YAML.format(root=self.root))

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """``dkp-pipeline CMD CONFIG --store STORE ARGS`` through the click entry point, in this process
        (torch & co. are imported once per module instead of once per case); exit code and stderr as
        a subprocess would give them, a traceback appended if anything but SystemExit escaped."""
        import traceback

        from click.testing import CliRunner

        from pipeline.cli import main

        cmd, rest = args[0], list(args[1:])
        r = CliRunner().invoke(main, [cmd, str(self.yaml), "--store", str(self.store), *rest])
        err = r.stderr
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            err += "".join(traceback.format_exception(r.exception))
        return subprocess.CompletedProcess([cmd, *rest], r.exit_code, r.stdout, err)

    def cli_raw(self, *args: str) -> subprocess.CompletedProcess:
        """Like :meth:`cli` for commands that take no CONFIG first (``cache verify DIR``, ``cache import``)."""
        from click.testing import CliRunner

        from pipeline.cli import main

        r = CliRunner().invoke(main, list(args))
        err = r.stderr + ("" if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception))
        return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, err)

    def cli_subprocess(self, *args: str, wrapper: Path | None = None) -> subprocess.CompletedProcess:
        """The same in a separate process: ``python -m pipeline.cli ...`` (or ``python WRAPPER ...``)."""
        cmd, rest = args[0], [str(self.yaml), "--store", str(self.store), *args[1:]]
        if wrapper is None:
            return run_cli([cmd, *rest], cwd=self.cwd, timeout=300)
        return subprocess.run([sys.executable, str(wrapper), cmd, *rest], cwd=self.cwd, env=_env(),
                              capture_output=True, text=True, timeout=300)

    def status(self, *args: str) -> dict[str, dict]:
        p = self.cli("status", "--json", *args)
        assert p.returncode == 0, p.stderr
        return {s["stage"]: s for s in json.loads(p.stdout)}

    def frame(self, i: int) -> Path:
        return self.root / "images" / f"f{i:06d}.png"

    def depth_file(self, i: int) -> Path:
        return self.root / "depth" / f"f{i:06d}.npy"


@pytest.fixture
def exp(tmp_path, prebuilt) -> Exp:
    """The dataset alone (empty store)."""
    return Exp(tmp_path, prebuilt)


@pytest.fixture
def built(tmp_path, prebuilt) -> Exp:
    """The dataset and a store whose depth artifact is finished (what must survive every failed run)."""
    e = Exp(tmp_path, prebuilt, with_store=True)
    assert e.status()["depth"]["state"] == "fresh"
    return e


def snapshot(store: Path) -> dict[str, str]:
    """sha256 of every artifact file in the store (the finished work a failed run must not touch).

    ``experiments/*.json`` (which key each stage had when last built) is left out: a changed input
    legitimately records a new manifest artifact there before the failing stage starts."""
    return {str(f.relative_to(store)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(store.rglob("*")) if f.is_file() and f.relative_to(store).parts[0] != "experiments"}


def assert_kept(before: dict[str, str], store: Path) -> None:
    after = snapshot(store)
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, f"finished files changed or removed by a failed run: {changed}"


def assert_user_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, and every needle (file name, fix) in the one-line message."""
    err = " ".join(p.stderr.split())
    assert p.returncode == 2, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    assert "error:" in err, err
    for n in needles:
        assert n in err, f"{n!r} not in the message:\n{err}"
    return err


def no_temporaries(store: Path) -> list[Path]:
    return [f for f in store.rglob("*") if ".tmp" in f.name]


def png(path: Path, img: np.ndarray) -> None:
    import cv2

    assert cv2.imwrite(str(path), img)


# --------------------------------------------------------------------------------------------------
# frames


def test_missing_frame(built):
    before = snapshot(built.store)
    built.frame(5).unlink()
    p = built.cli("depth")
    # keypoints.csv and depth/ still name it: the manifest says which file and what to do.
    assert_user_error(p, "f000005", "remove the row or add the image")
    assert_kept(before, built.store)


def test_zero_byte_frame(built):
    before = snapshot(built.store)
    built.frame(3).write_bytes(b"")
    p = built.cli_subprocess("depth")  # a real process: exit status 2 from the OS, not from CliRunner
    assert_user_error(p, "images/f000003.png", "replace or remove it")
    assert_kept(before, built.store)


def test_non_image_frame(built):
    before = snapshot(built.store)
    built.frame(4).write_text("this is not a picture\n")
    p = built.cli("depth")
    assert_user_error(p, "images/f000004.png", "not a readable image", "replace or remove it")
    assert_kept(before, built.store)


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # the header (and size) survive; the data and IEND do not


def test_truncated_frame_refused_then_skipped(built):
    before = snapshot(built.store)
    _truncate(built.frame(7))
    p = built.cli("depth")
    assert_user_error(p, "images/f000007.png", "truncated", "--skip-bad-frames")
    assert_kept(before, built.store)
    assert not no_temporaries(built.store)

    p = built.cli("depth", "--skip-bad-frames")
    assert p.returncode == 0, p.stderr
    assert_kept(before, built.store)
    st = built.status()
    dep = st["depth"]
    assert dep["state"] == "fresh"
    shown = " ".join(dep["why"] + [dep["progress"] or ""])
    assert "1 unreadable frame(s) skipped" in shown and "f000007" in shown, dep
    rec = json.loads((Path(dep["path"]) / "artifact.json").read_text())
    assert [s["frame"] for s in rec["skipped_frames"]] == ["f000007"]
    assert "truncated" in rec["skipped_frames"][0]["reason"]
    from pipeline.depth_cache import DepthCacheReader

    with DepthCacheReader(dep["path"]) as r:
        assert not r.is_valid(7) and r.is_valid(6) and r.is_valid(8)
        assert 7 not in set(r.valid_indices().tolist())


def test_image_formats_converted(exp):
    """Grayscale, 16-bit, RGBA (8/16-bit) and CMYK frames are converted to RGB; the stage runs."""
    import cv2
    from PIL import Image

    from pipeline.data.images import read_rgb

    rgb = {i: read_rgb(exp.frame(i)) for i in range(1, 7)}
    bgr = {i: rgb[i][:, :, ::-1] for i in rgb}
    gray = cv2.cvtColor(bgr[1], cv2.COLOR_BGR2GRAY)
    png(exp.frame(1), gray)  # 8-bit grayscale
    png(exp.frame(2), gray.astype(np.uint16) * 257)  # 16-bit grayscale
    png(exp.frame(3), bgr[3].astype(np.uint16) * 257)  # 16-bit RGB
    png(exp.frame(4), np.dstack([bgr[4], np.full(gray.shape, 128, np.uint8)]))  # RGBA, half transparent
    png(exp.frame(5), np.dstack([bgr[5], np.full(gray.shape, 9, np.uint8)]).astype(np.uint16) * 257)  # 16-bit RGBA
    exp.frame(6).unlink()  # same frame id, now a CMYK JPEG
    Image.fromarray(rgb[6]).convert("CMYK").save(exp.root / "images" / "f000006.jpg", quality=100)
    assert Image.open(exp.root / "images" / "f000006.jpg").mode == "CMYK"

    g3 = np.repeat(gray[:, :, None], 3, axis=2)
    assert np.array_equal(read_rgb(exp.frame(1)), g3)
    assert np.array_equal(read_rgb(exp.frame(2)), g3)
    assert np.array_equal(read_rgb(exp.frame(3)), rgb[3])
    assert np.array_equal(read_rgb(exp.frame(4)), rgb[4])
    assert np.array_equal(read_rgb(exp.frame(5)), rgb[5])
    cmyk = read_rgb(exp.root / "images" / "f000006.jpg")
    ref = np.asarray(Image.open(exp.root / "images" / "f000006.jpg").convert("RGB"))
    assert cmyk.shape == ref.shape and np.abs(cmyk.astype(int) - ref).max() <= 2
    for i in range(1, 7):
        assert read_rgb(exp.root / "images" / f"f{i:06d}.{'jpg' if i == 6 else 'png'}").dtype == np.uint8

    p = exp.cli("depth")
    assert p.returncode == 0, p.stderr


def test_unsupported_sample_type_refused(built):
    """A float TIFF saved under a frame's name decodes but is refused, not mistaken for truncated."""
    import cv2

    before = snapshot(built.store)
    ok, buf = cv2.imencode(".tiff", np.random.default_rng(0).random((32, 32, 3), dtype=np.float32))
    assert ok
    built.frame(9).write_bytes(buf.tobytes())
    p = built.cli("depth")
    assert_user_error(p, "images/f000009.png", "float32", "convert it to 8-bit RGB")
    assert_kept(before, built.store)


def test_mixed_frame_sizes(exp):
    """Frames of different sizes are supported (each is resized/cropped to the model size); depth is
    stored at each frame's own size. A depth map whose size differs from its frame is refused."""
    import cv2

    img = cv2.imread(str(exp.frame(2)))
    png(exp.frame(2), cv2.resize(img, (48, 40)))
    np.save(exp.depth_file(2), cv2.resize(np.load(exp.depth_file(2)), (48, 40)))
    p = exp.cli("depth")
    assert p.returncode == 0, p.stderr
    from pipeline.depth_cache import DepthCacheReader

    with DepthCacheReader(exp.status()["depth"]["path"]) as r:
        assert r.read(2).shape == (40, 48) and r.read(3).shape == (32, 32)

    before = snapshot(exp.store)
    np.save(exp.depth_file(2), np.ones((32, 32), np.float32))
    p = exp.cli("depth")
    assert_user_error(p, "depth/f000002.npy", "48x40", "depth must match the frame")
    assert_kept(before, exp.store)


# --------------------------------------------------------------------------------------------------
# manifests


def test_manifest_bad_schema(built):
    before = snapshot(built.store)
    desc = built.cwd / "mine.yaml"
    text = (REPO / "data_manifests" / "synthetic.yaml").read_text()
    desc.write_text(text + "colour: red\n")
    p = built.cli("depth", "--set", f"data.manifest={desc}")
    assert_user_error(p, str(desc), "unknown field(s) colour", "valid:")
    desc.write_text(text.replace("layout: folder", "layout: folders"))
    p = built.cli("depth", "--set", f"data.manifest={desc}")
    assert_user_error(p, str(desc), "layout 'folders' unknown", "valid:")
    assert_kept(before, built.store)


def test_manifest_duplicate_ids(built):
    before = snapshot(built.store)
    shutil.copyfile(built.frame(1), built.root / "images" / "f000001.jpg")
    p = built.cli("depth")
    assert_user_error(p, "duplicate frame id 'f000001'", "images/f000001.jpg", "keep one file")
    (built.root / "images" / "f000001.jpg").unlink()
    csv = built.root / "keypoints.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines + [lines[3]]) + "\n")
    p = built.cli("depth")
    assert_user_error(p, "keypoints.csv line 50", "duplicate frame id 'f000002'")
    assert_kept(before, built.store)


def test_manifest_path_outside_root(built, tmp_path):
    before = snapshot(built.store)
    outside = tmp_path / "elsewhere.png"
    shutil.move(built.frame(8), outside)
    os.symlink(outside, built.frame(8))
    p = built.cli("depth")
    assert_user_error(p, "images/f000008.png", "outside the root", "copy the file into the root")
    assert_kept(before, built.store)


# --------------------------------------------------------------------------------------------------
# depth files


def test_depth_holes_kept_all_hole_map_refused_then_skipped(built):
    """NaN, Inf and 0 in a depth .npy are pixels with no reading (issue 13): kept as holes and counted; a map
    with no valid pixel is refused, or marked invalid with --skip-bad-frames."""
    before = snapshot(built.store)
    d = np.load(built.depth_file(6))
    d[3, 4], d[5, 6], d[7, 8] = np.nan, np.inf, 0.0
    np.save(built.depth_file(6), d)
    p = built.cli("depth")
    assert p.returncode == 0, p.stderr
    assert "1 of 48 depth files have holes" in " ".join(p.stdout.split())
    dep = built.status()["depth"]
    assert "1 frame(s) with depth holes" in dep["progress"]
    from pipeline.depth_cache import DepthCacheReader

    with DepthCacheReader(dep["path"]) as r:
        got = r.read(6)
        assert np.isnan(got[[3, 5, 7], [4, 6, 8]]).all() and np.isnan(got).sum() == 3 and r.is_valid(6)
    assert_kept(before, built.store)

    np.save(built.depth_file(6), np.zeros_like(d))
    p = built.cli("depth")
    assert_user_error(p, "depth/f000006.npy", "no valid pixel", "--skip-bad-frames")
    p = built.cli("depth", "--skip-bad-frames")
    assert p.returncode == 0, p.stderr
    dep = built.status()["depth"]
    rec = json.loads((Path(dep["path"]) / "artifact.json").read_text())
    assert [s["frame"] for s in rec["skipped_frames"]] == ["f000006"]
    with DepthCacheReader(dep["path"]) as r:
        assert not r.is_valid(6) and r.is_valid(5)
    assert_kept(before, built.store)
    assert not no_temporaries(built.store)


def test_depth_wrong_shape(built):
    before = snapshot(built.store)
    np.save(built.depth_file(10), np.ones((32, 32, 2), np.float32))
    p = built.cli("depth")
    assert_user_error(p, "depth/f000010.npy", "2-D float array")
    np.save(built.depth_file(10), np.ones((16, 16), np.float32))
    p = built.cli("depth")
    assert_user_error(p, "depth/f000010.npy", "16x16", "depth must match the frame")
    assert_kept(before, built.store)


# --------------------------------------------------------------------------------------------------
# depth caches


def _depth_dir(exp: Exp) -> Path:
    return Path(exp.status()["depth"]["path"])


def test_cache_corrupted_chunk(built):
    """One flipped byte inside a compressed depth chunk: fletcher32 catches it on read."""
    shard = _depth_dir(built) / "shards" / "shard-00002.h5"
    import h5py

    with h5py.File(shard, "r") as f:
        offset = f["depth"].id.get_chunk_info(3).byte_offset  # frame 35 (a train frame)
    raw = bytearray(shard.read_bytes())
    raw[offset + 5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    from pipeline.depth_cache import DepthCacheReader, verify

    report = verify(shard.parents[1])
    assert any("frame 35" in m for m in report.problems), report.problems
    with DepthCacheReader(shard.parents[1]) as r:
        from pipeline.errors import CacheError

        with pytest.raises(CacheError, match="shard-00002.h5: frame 35 cannot be read.*cache verify"):
            r.read(35)
        assert r.read(34).shape == (32, 32)  # the other chunks are fine
    p = built.cli_raw("cache", "verify", str(shard.parents[1]))
    assert_user_error(p, "shard-00002.h5", "differs from the index", "frame 35", "unreadable",
                      "and re-run `dkp-pipeline depth` to rebuild it")
    before = snapshot(built.store)
    p = built.cli("teach")
    assert_user_error(p, "shard-00002.h5", "frame 35", "cache verify")
    assert_kept({k: v for k, v in before.items() if k.startswith("depth/")}, built.store)


def test_cache_truncated_file(built):
    """Issue 24: the truncated shard makes the finished cache `damaged` at stat cost, so `teach` refuses before it
    reads a frame, naming the shard; `depth` then rebuilds that shard alone, byte for byte."""
    shard = _depth_dir(built) / "shards" / "shard-00001.h5"
    raw = shard.read_bytes()
    others = {n: (shard.parent / n).stat().st_mtime_ns for n in ("shard-00000.h5", "shard-00002.h5")}
    shard.write_bytes(raw[: len(raw) // 3])
    p = built.cli("teach")
    assert_user_error(p, "depth, which is damaged", "shard-00001.h5", "truncated",
                      "dkp-pipeline run tiny --until depth")
    p = built.cli("depth")
    assert p.returncode == 0, p.stderr
    assert shard.read_bytes() == raw
    assert {n: (shard.parent / n).stat().st_mtime_ns for n in others} == others  # the others were not rewritten
    assert built.status()["depth"]["state"] == "fresh"


def test_cache_spec_mismatch(built):
    """A cache started with other settings (here: copied in by hand under another config's key) is
    refused, naming the differing field, and left as it is."""
    src = _depth_dir(built)
    other = built.status("--set", "depth.storage_dtype=float32")["depth"]
    dst = Path(other["path"])
    shutil.copytree(src, dst)
    (dst / "COMPLETE").unlink()
    (dst / "index.json").unlink()
    before = {k: v for k, v in snapshot(built.store).items() if not k.endswith(f"{dst.name}/artifact.json")}
    p = built.cli("depth", "--set", "depth.storage_dtype=float32")
    assert_user_error(p, str(dst), "storage_dtype: cache 'float16', expected 'float32'", "delete the directory")
    assert_kept(before, built.store)

    # the same through sharing: a colleague's export imported for a config that needs another spec
    export = built.cwd / "shared.h5"
    p = built.cli_raw("cache", "export", str(built.yaml), "--store", str(built.store), "-o", str(export))
    assert p.returncode == 0, p.stderr
    other_store = built.cwd / "colleague"
    p = built.cli_raw("cache", "import", str(export), "--store", str(other_store), "--config", str(built.yaml),
                      "--set", "depth.storage_dtype=float32")
    assert_user_error(p, str(export), "storage_dtype: cache 'float16', expected 'float32'")
    assert not (other_store / "depth").exists() or not any((other_store / "depth").iterdir())


# --------------------------------------------------------------------------------------------------
# weights and checkpoints (torch)


class Payload:
    """Pickles as a call that would create ``marker``; a safe loader must never make that call."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_midas_weights_not_a_midas_checkpoint(built, tmp_path):
    """Through the CLI: a torch file that is not a MiDaS state dict, and one carrying a pickled payload
    (never executed); in-process (same loader): a file that is not a torch file at all."""
    import torch

    from pipeline.errors import CheckpointError
    from pipeline.weights.midas import load_midas

    before = snapshot(built.store)
    wrong = tmp_path / "model.pt"
    torch.save({"model_args": {"n_keypoints": 4}, "state_dict": {"w": torch.zeros(2)}}, wrong)
    sets = ["--set", "depth.provider=midas", "--set", "depth.model_type=dpt_levit_224", "--set"]
    p = built.cli("depth", *sets, f"depth.weights={wrong}")
    assert_user_error(p, str(wrong), "not a MiDaS state dict", "dpt_levit_224.pt", "https://")
    evil = tmp_path / "dpt_levit_224.pt"
    marker = tmp_path / "pwned"
    torch.save({"w": Payload(marker)}, evil)
    p = built.cli("depth", *sets, f"depth.weights={evil}")
    assert_user_error(p, str(evil), "weights-only", "https://")
    assert not marker.exists(), "a crafted weights file ran code"
    assert_kept(before, built.store)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CheckpointError, match="cannot be read as a weights-only torch file.*https://"):
        load_midas("dpt_levit_224", junk)


def _teach_checkpoint_dir(exp: Exp) -> Path:
    d = Path(exp.status()["teach"]["path"]) / "checkpoints"
    d.mkdir(parents=True)
    return d


def test_checkpoint_from_another_config(built):
    import torch

    from pipeline.store.checkpoint import save_atomic
    from pipeline.training import CHECKPOINT_FORMAT

    ck = _teach_checkpoint_dir(built) / "step-00000002.pt"
    save_atomic({"format": CHECKPOINT_FORMAT, "step": 2, "config_hash": "f" * 64, "model": {"w": torch.zeros(1)}},
                ck)
    data = ck.read_bytes()
    p = built.cli("teach")
    assert_user_error(p, str(ck), "written for another config", "delete")
    assert ck.read_bytes() == data  # refused, not overwritten


def test_checkpoint_with_pickled_payload_refused(built, tmp_path):
    import torch

    ck = _teach_checkpoint_dir(built) / "step-00000002.pt"
    marker = tmp_path / "pwned"
    torch.save({"format": "x", "model": Payload(marker)}, ck)
    p = built.cli("teach")
    assert_user_error(p, str(ck), "pickled Python objects", "will not be executed")
    assert not marker.exists(), "a crafted checkpoint ran code"
    assert ck.exists()


# --------------------------------------------------------------------------------------------------
# concurrency and disk full


def test_two_concurrent_runs(built, tmp_path):
    """A second `depth` on the same artifact gets the lock error naming the live writer; once that
    writer is gone (killed), its lock is stale and the next run takes it over and finishes."""
    f32 = ["--set", "depth.storage_dtype=float32"]
    slow = tmp_path / "slow.py"
    slow.write_text(WRAPPER.format(n=1, action="time.sleep(60)"))  # holds the lock inside its first flush
    first = subprocess.Popen([sys.executable, str(slow), "depth", str(built.yaml), "--store", str(built.store), *f32],
                             cwd=built.cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        dep = Path(built.status(*f32)["depth"]["path"])
        deadline = time.time() + 120
        while not (dep / "shards").is_dir() or not any((dep / "shards").iterdir()):
            assert first.poll() is None and time.time() < deadline, "first run ended before writing"
            time.sleep(0.05)
        p = built.cli("depth", *f32)
        assert_user_error(p, str(dep), f"pid {first.pid}", "Wait for it to finish")
        st = built.status(*f32)["depth"]
        assert st["state"] == "in_progress" and any(f"pid {first.pid}" in w for w in st["why"]), st
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    p = built.cli("depth", *f32)
    assert p.returncode == 0, p.stderr
    assert built.status(*f32)["depth"]["state"] == "fresh"
    assert not no_temporaries(built.store)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="200")


# Runs dkp-pipeline with h5py.File.flush replaced: call number {n} does {action} (a disk that fills up,
# or a writer that stalls while holding its lock). Nothing else changes.
WRAPPER = """\
import errno, sys, time
import h5py
calls = [0]
orig = h5py.File.flush
def flush(self):
    calls[0] += 1
    if calls[0] == {n}:
        {action}
    return orig(self)
h5py.File.flush = flush
from pipeline.cli import main
sys.argv = ["dkp-pipeline"] + sys.argv[1:]
main()
"""
ENOSPC = 'raise OSError(errno.ENOSPC, "No space left on device")'


def test_disk_full_while_writing_depth(built, tmp_path):
    """ENOSPC while the third shard is flushed: exit 2, the earlier shards and the finished artifact of
    another config are untouched, no temporaries, and a re-run (space freed) resumes to the same cache."""
    before = snapshot(built.store)
    f32 = ["--set", "depth.storage_dtype=float32"]
    wrapper = tmp_path / "disk_full.py"
    wrapper.write_text(WRAPPER.format(n=3, action=ENOSPC))
    p = built.cli_subprocess("depth", *f32, wrapper=wrapper)
    assert_user_error(p, "shard-00002.h5", "No space left on device", "free disk space", "resumes")
    assert_kept(before, built.store)
    assert not no_temporaries(built.store)
    dep = built.status(*f32)["depth"]
    assert dep["state"] == "in_progress" and dep["progress"] == "frames 32/48", dep
    p = built.cli("depth", *f32)
    assert p.returncode == 0, p.stderr
    clean = Exp(tmp_path / "clean", built.cwd)
    p = clean.cli("depth", *f32)
    assert p.returncode == 0, p.stderr
    a, b = Path(dep["path"]), Path(clean.status(*f32)["depth"]["path"])
    for name in ("shard-00000.h5", "shard-00001.h5", "shard-00002.h5"):
        assert (a / "shards" / name).read_bytes() == (b / "shards" / name).read_bytes(), name


def test_depth_file_with_pickled_objects_refused(built):
    """An object .npy (pickled Python objects inside) is refused from its header; it is never unpickled."""
    before = snapshot(built.store)
    np.save(built.depth_file(11), np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    p = built.cli("depth")
    assert_user_error(p, "depth/f000011.npy", "2-D float array")
    assert_kept(before, built.store)


def test_no_unsafe_loaders_in_the_code():
    """Every torch.load is weights_only=True; no pickle.load(s), np.load(allow_pickle=True) or yaml.load
    anywhere in pipeline/ or dkp_core/ (the Taichi GT reader uses a restricted Unpickler subclass)."""
    import ast

    bad = []
    for f in sorted((REPO / "pipeline").rglob("*.py")) + sorted((REPO / "dkp_core").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{f.relative_to(REPO)}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load":
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    bad.append(f"{where}: torch.load without weights_only=True")
            if owner == "pickle" and node.func.attr in ("load", "loads"):
                bad.append(f"{where}: pickle.{node.func.attr}")
            if owner in ("np", "numpy") and node.func.attr == "load":
                v = kw.get("allow_pickle")
                if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                    bad.append(f"{where}: np.load with allow_pickle")
            if owner == "yaml" and node.func.attr in ("load", "unsafe_load", "full_load"):
                bad.append(f"{where}: yaml.{node.func.attr}")
    assert not bad, bad
