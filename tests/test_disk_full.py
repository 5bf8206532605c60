"""A full disk at every write path (issue 24): one message naming the file, the artifact, the space and the fix;
exit 2, no traceback; nothing partial left that a later run takes for finished; the same command, once space is
free, ends with the result of an uninterrupted run. The fingerprint memo, the experiment record and TensorBoard
events are accelerators or logs: when they cannot be written the run warns and goes on.

Two ways to fill a disk:
* ``full_disk`` (every platform): a fault-injecting wrapper around ``open``/``os.open``/``os.mkdir`` in this process.
  The chosen write fails with the chosen errno (ENOSPC, EDQUOT, EROFS, EIO) as the file system would say it: a
  ``write()`` that raises (what torch.save, h5py through GuardedFile and plain writes see) or, where noted, the
  ``open``; from then on every write under the store fails too, since a full disk stays full.
* a real one (root only): the store is a small tmpfs mounted in a private mount namespace (``unshare -m``), made
  larger (``mount -o remount,size=``) before the same command runs again.

The chains (one per stage) fail the stage at its write paths in the order it reaches them: each run resumes
from what the previous one left, and the last, with space, must give files identical to the reference run's.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, TINY_YAML, tiny_folder, torch_threads

ENOSPC, EDQUOT, EROFS, EIO = errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO


# --------------------------------------------------------------------------------------------------
# the fault injector


class _FailingFile:
    """A file whose writes fail with ``exc`` (what a full disk does to ``write()``); everything else is the file's."""

    def __init__(self, f, exc: OSError) -> None:
        self._f, self._exc = f, exc

    def write(self, *_a, **_k):
        raise OSError(self._exc.errno, self._exc.strerror)  # a write() error names no file, as the kernel's

    def writelines(self, *_a, **_k):
        raise OSError(self._exc.errno, self._exc.strerror)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self._f.close()

    def __iter__(self):
        return iter(self._f)


@contextlib.contextmanager
def full_disk(pattern: str, err: int = ENOSPC, *, nth: int = 1, at: str = "write", under: Path | None = None):
    """Writes to files whose absolute path matches ``pattern`` (fnmatch) fail with ``err`` from the ``nth`` such
    open on (``at`` = "write": the writes fail; "open": the open does); after that every write-open and mkdir
    under ``under`` fails too. Yields a dict: ``hit`` (the file that failed first, or None)."""
    real_open, real_os_open, real_mkdir = io.open, os.open, os.mkdir
    state = {"hit": None, "count": 0}
    under_s = str(Path(under).resolve()) + os.sep if under is not None else None

    def exc(path) -> OSError:
        return OSError(err, os.strerror(err), path)

    def check(path, writing: bool):
        """None: go ahead; "open": raise now; "write": hand out a failing file."""
        if not writing or not isinstance(path, (str, bytes, os.PathLike)):
            return None
        p = os.path.abspath(os.fsdecode(path))
        if state["hit"] is not None and under_s and p.startswith(under_s):
            return "open"
        if fnmatch.fnmatchcase(p, pattern):
            state["count"] += 1
            if state["count"] >= nth:
                state["hit"] = state["hit"] or p
                return at
        return None

    def opener(file, mode="r", *a, **k):
        how = check(file, any(c in mode for c in "wax+"))
        if how == "open":
            raise exc(os.fsdecode(file))
        f = real_open(file, mode, *a, **k)
        return _FailingFile(f, exc(os.fsdecode(file))) if how == "write" else f

    def os_opener(path, flags, *a, **k):
        if check(path, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))):
            raise exc(os.fsdecode(path))
        return real_os_open(path, flags, *a, **k)

    def mkdir(path, *a, **k):
        p = os.path.abspath(os.fsdecode(path))
        if state["hit"] is not None and under_s and p.startswith(under_s):
            raise exc(p)
        return real_mkdir(path, *a, **k)

    import builtins

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", opener)
        mp.setattr(io, "open", opener)
        mp.setattr(os, "open", os_opener)
        mp.setattr(os, "mkdir", mkdir)
        yield state


# --------------------------------------------------------------------------------------------------
# the experiment: a reference run, copies of it, the CLI in this process


def cli(cwd: Path, *args: str, store: bool = True) -> subprocess.CompletedProcess:
    """``dkp-pipeline ARGS`` through the click entry point in this process (torch is imported once); exit code
    and stderr as a process would give them, the traceback appended if anything but SystemExit escaped."""
    import traceback

    from click.testing import CliRunner

    from pipeline.cli import main

    argv = list(args)
    if store:
        argv[1:1] = [str(cwd / "tiny.yaml"), "--store", str(cwd / "store")]
    r = CliRunner().invoke(main, argv)
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(argv, r.exit_code, r.stdout, err)


def status(cwd: Path, *args: str) -> dict[str, dict]:
    p = cli(cwd, "status", "--json", *args)
    assert p.returncode == 0, p.stderr
    return {s["stage"]: s for s in json.loads(p.stdout)}


# Files that differ between two uninterrupted runs too: the manifest holds the dataset root (a folder per test), the
# depth stage's stats its wall and CPU seconds.
VARY = ("manifest/manifest.json", "depth/stats.part*.json")


def outputs(store: Path) -> dict[str, dict]:
    """Every published artifact's file list (relative path -> bytes, sha256), keyed 'stage/file', but :data:`VARY`.
    Depth shards are listed by size: their sha256 is in the cache's index.json, which is listed with its own."""
    out = {}
    for rec_path in sorted(store.glob("*/*/artifact.json")):
        rec = json.loads(rec_path.read_text())
        if rec.get("status") == "complete":
            out.update({f"{rec['stage']}/{k}": v for k, v in rec.get("files", {}).items()
                        if not any(fnmatch.fnmatch(f"{rec['stage']}/{k}", pat) for pat in VARY)})
    return out


def temporaries(store: Path) -> list[str]:
    return [str(p.relative_to(store)) for p in store.rglob("*") if ".tmp" in p.name or p.name.startswith("LOCK")
            or p.name.startswith(".import-")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny experiment run once, uninterrupted, to the end (what every interrupted run must end as)."""
    with torch_threads(1), tiny_folder(tmp_path_factory, "disk-full-ref", TINY_YAML, data=True) as d:
        p = cli(d, "run")
        assert p.returncode == 0, p.stderr
        yield d


@pytest.fixture
def exp(tmp_path, reference, monkeypatch):
    """A copy of the reference's data and store (``keep``: the stages whose artifacts stay; the rest are removed
    so that the test builds them), with its own fingerprint memo."""
    def make(keep=("manifest", "depth", "teach", "distill", "eval"), yaml: str = TINY_YAML) -> Path:
        shutil.copytree(reference / "data", tmp_path / "data")
        (tmp_path / "tiny.yaml").write_text(yaml.format(root=tmp_path / "data"))
        shutil.copytree(reference / "store", tmp_path / "store", ignore=shutil.ignore_patterns("reports"))
        for stage_dir in (tmp_path / "store").iterdir():
            if stage_dir.name not in (*keep, "experiments"):
                shutil.rmtree(stage_dir)
        return tmp_path

    monkeypatch.setenv("DKP_CACHE_DIR", str(tmp_path / "dkp-cache"))
    return make


def assert_one_clear_error(p, *needles: str) -> str:
    """Exit 2, no traceback, one `error:` line with the errno's words, the fix, and every needle."""
    assert p.returncode == 2, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr and "Exception in thread" not in p.stderr, p.stderr
    err = " ".join(p.stderr.split())
    assert err.count("error:") == 1, err
    msg = err[err.index("error:"):]
    assert "rerun the same command" in msg and "Fix:" in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in the message:\n{msg}"
    return msg


WORDS = {ENOSPC: "disk full", EDQUOT: "disk quota exceeded", EROFS: "read-only file system", EIO: "input/output error"}
FIXES = {ENOSPC: "free disk space on", EDQUOT: "within your disk quota", EROFS: "make", EIO: "check the disk"}


def run_chain(d: Path, command: tuple[str, ...], chain: list[tuple], stage: str) -> None:
    """Run ``command`` once per fault of ``chain`` ((glob under the store, errno, nth, at, file named)): each must
    end in one clear error naming that file and the stage, leave no temporaries or locks, and leave ``stage``
    unpublished. Then once more with space, which must succeed."""
    store = d / "store"
    for pattern, err, nth, at, named in chain:
        with full_disk(str(store.resolve() / pattern), err, nth=nth, at=at, under=store) as hit:
            p = cli(d, *command)
        assert hit["hit"] is not None, f"{pattern} was never written (exit {p.returncode}): {p.stderr}"
        assert_one_clear_error(p, WORDS[err], FIXES[err], named, f"the {stage} artifact")
        assert not temporaries(store), temporaries(store)
        assert status(d)[stage]["state"] != "fresh"
    p = cli(d, *command)
    assert p.returncode == 0, p.stderr


# --------------------------------------------------------------------------------------------------
# the chains: each stage's write paths, in the order a run reaches them


def test_manifest_then_depth_write_paths(exp, reference):
    """manifest.json; then the depth cache: layout, a shard (HDF5 through GuardedFile), a shard's entry, the
    stats file, the merged index, the preview, the record, the publish marker. The cache after the last run is
    byte-identical to the uninterrupted one (index.json's sha256 covers every shard's)."""
    d = exp(keep=())
    run_chain(d, ("run", "--until", "manifest"), [("manifest/*/.manifest.json.tmp-*", ENOSPC, 1, "write",
                                                   "manifest.json")], "manifest")
    chain = [
        ("depth/*/layout.json.tmp-*", EDQUOT, 1, "write", "layout.json"),
        ("depth/*/shards/shard-00001.h5.tmp-*", ENOSPC, 1, "write", "shards/shard-00001.h5"),
        ("depth/*/shards/shard-00002.json.tmp-*", EIO, 1, "write", "shard-00002.json"),
        ("depth/*/.stats.part0.json.tmp-*", ENOSPC, 1, "write", "stats.part0.json"),
        ("depth/*/index.json.tmp-*", ENOSPC, 1, "write", "index.json"),
        ("depth/*/.preview.png.tmp-*", EROFS, 1, "open", "preview.png"),
        ("depth/*/.artifact.json.tmp-*", ENOSPC, 2, "write", "artifact.json"),
        ("depth/*/.COMPLETE.tmp-*", ENOSPC, 1, "write", "COMPLETE"),
    ]
    run_chain(d, ("run", "--until", "depth"), chain, "depth")
    mine, ref = outputs(d / "store"), outputs(reference / "store")
    assert {k: v for k, v in mine.items() if k.startswith(("manifest/", "depth/"))} == \
           {k: v for k, v in ref.items() if k.startswith(("manifest/", "depth/"))}
    assert status(d)["depth"]["state"] == "fresh"


def test_teach_write_paths_resume_to_the_same_teacher(exp, reference):
    """A picture, a checkpoint (torch.save's RuntimeError over the failed write), a metrics line, model.pt, the
    loss curve, the keypoint picture (a copy), the record, the marker; then the teacher is the reference's."""
    d = exp(keep=("manifest", "depth"))
    chain = [
        ("teach/*/samples/.step_000003.png.tmp-*", ENOSPC, 1, "write", "samples/step_000003.png"),
        ("teach/*/checkpoints/.step-00000004.pt.tmp.*", EDQUOT, 1, "write", "checkpoints/step-00000004.pt"),
        ("teach/*/metrics.jsonl", EIO, 2, "write", "teach/"),  # a bare write() names no file: the directory
        ("teach/*/.model.pt.tmp.*", ENOSPC, 1, "write", "model.pt"),
        ("teach/*/.loss.png.tmp-*", EROFS, 1, "open", "loss.png"),
        ("teach/*/keypoints.png", ENOSPC, 1, "open", "keypoints.png"),
        ("teach/*/.artifact.json.tmp-*", ENOSPC, 2, "write", "artifact.json"),
        ("teach/*/.COMPLETE.tmp-*", ENOSPC, 1, "write", "COMPLETE"),
    ]
    run_chain(d, ("run", "--until", "teach"), chain, "teach")
    mine, ref = outputs(d / "store"), outputs(reference / "store")
    assert {k: v for k, v in mine.items() if k.startswith("teach/")} == \
           {k: v for k, v in ref.items() if k.startswith("teach/")}


def test_checkpoint_message_names_the_space_needed(exp):
    d = exp(keep=("manifest", "depth"))
    with full_disk(str((d / "store").resolve() / "teach/*/checkpoints/.step-00000002.pt.tmp.*"), under=d / "store"):
        p = cli(d, "run", "--until", "teach")
    msg = assert_one_clear_error(p, "checkpoints/step-00000002.pt (training checkpoint)", "this write needed about",
                                 "MiB", "free now", "finished shards are kept", "training checkpoints")
    assert "teach artifact" in msg


def test_distill_embedding_cache_and_eval_write_paths(exp, reference):
    """The teacher-embedding cache (a part file of its folder), then eval's detections, pictures and metrics.json,
    then the report that `run` writes last: each a clear error, and the same result afterwards."""
    d = exp(keep=("manifest", "depth", "teach"))
    cache_on = ("--set", "distill.teacher_cache=true")
    run_chain(d, ("run", "--until", "distill", *cache_on),
              [("distill/*/teacher_embeddings/part-*.npy.tmp-*", ENOSPC, 1, "write", "part-00000-of-00001.npy")],
              "distill")
    assert (Path(status(d, *cache_on)["distill"]["path"]) / "teacher_embeddings" / "index.json").is_file()
    chain = [
        ("eval/*/.detections.npz.tmp-*", ENOSPC, 1, "write", "detections.npz"),
        ("eval/*/.student_test.png.tmp-*", EIO, 1, "write", "student_test.png"),
        ("eval/*/.metrics.json.tmp-*", EDQUOT, 1, "write", "metrics.json"),
    ]
    run_chain(d, ("run",), chain, "eval")
    mine, ref = outputs(d / "store"), outputs(reference / "store")
    assert {k: v for k, v in mine.items() if k.startswith("eval/")} == \
           {k: v for k, v in ref.items() if k.startswith("eval/")}
    # the report, which `run` writes after everything is built: an error, then the same command writes it
    (d / "store" / "reports").mkdir(exist_ok=True)
    with full_disk(str((d / "store").resolve() / "reports/.tiny.html.tmp-*"), under=d / "store"):
        p = cli(d, "run")
    assert_one_clear_error(p, "disk full", "reports/tiny.html", "HTML report")
    assert not temporaries(d / "store")
    p = cli(d, "run")
    assert p.returncode == 0 and (d / "store" / "reports" / "tiny.html").is_file(), p.stderr


def test_accelerators_warn_and_go_on(exp, reference, caplog):
    """The fingerprint memo, the experiment record and TensorBoard's events cannot be written: warnings, exit 0,
    the same artifacts. (The warnings are logged; without a logging setup, as under the CLI, Python prints them
    on stderr.)"""
    import logging

    caplog.set_level(logging.WARNING)
    d = exp(keep=("manifest", "depth"))
    (d / "store" / "experiments" / "tiny.json").unlink()  # so that the run has a record to write
    memo = Path(os.environ["DKP_CACHE_DIR"]).resolve()
    with full_disk(str(memo / "fingerprints/*"), ENOSPC), \
            full_disk(str((d / "store").resolve() / "experiments/.tiny.json.tmp-*"), EDQUOT), \
            full_disk(str((d / "store").resolve() / "teach/*/tensorboard/*/events.out.tfevents.*"), ENOSPC, nth=2):
        p = cli(d, "run", "--until", "teach")
    assert p.returncode == 0 and "Traceback" not in p.stderr and "Exception in thread" not in p.stderr, p.stderr
    err = " ".join((p.stderr + caplog.text).split())
    assert "could not write fingerprint memo" in err and "(No space left on device); next run hashes again" in err, err
    assert "not recording that experiment 'tiny' used" in err, err
    assert "TensorBoard events in" in err and "training goes on" in err, err
    mine, ref = outputs(d / "store"), outputs(reference / "store")
    assert {k: v for k, v in mine.items() if k.startswith("teach/")} == \
           {k: v for k, v in ref.items() if k.startswith("teach/")}
    assert status(d)["teach"]["state"] == "fresh"


def test_frame_cache_on_a_full_disk_warns_and_training_goes_on(exp, caplog):
    """The training-frame cache (issue 23) is an accelerator too: a write of it that fails is a warning, its partial
    file is removed (the space goes back to the artifacts), training decodes every sample, and the teacher is the
    one that a run with room (which builds the cache) trains."""
    import logging

    caplog.set_level(logging.WARNING)
    d = exp(keep=("manifest", "depth"))
    epoch = ("--set", "teach.batch_size=8")  # 6 steps of 8 draw an epoch of samples: the cache is worth building
    with full_disk(str((d / "store").resolve() / "frame-cache/*/data.npy.partial"), ENOSPC) as hit:
        p = cli(d, "run", "--until", "teach", *epoch)
    assert hit["hit"] is not None and p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "Exception in thread" not in p.stderr, p.stderr
    err = " ".join((p.stdout + p.stderr + caplog.text).split())
    assert "could not be written (No space left on device); training decodes every sample" in err, err
    assert not list((d / "store").glob("frame-cache/*/data.npy*")) and not temporaries(d / "store")
    teach = status(d, *epoch)["teach"]
    assert teach["state"] == "fresh"
    first = {k: v for k, v in outputs(d / "store").items() if k.startswith("teach/")}
    shutil.rmtree(teach["path"])
    p = cli(d, "run", "--until", "teach", *epoch)
    assert p.returncode == 0, p.stderr
    assert list((d / "store").glob("frame-cache/*/COMPLETE"))
    assert {k: v for k, v in outputs(d / "store").items() if k.startswith("teach/")} == first


def test_cache_export_and_import_on_a_full_disk(exp, tmp_path):
    d = exp(keep=("manifest", "depth"))
    out = tmp_path / "shared" / "cache.h5"
    out.parent.mkdir()
    with full_disk(str(out.parent.resolve() / "cache.h5.tmp-*"), ENOSPC, under=out.parent):
        p = cli(d, "cache", "export", str(d / "tiny.yaml"), "--store", str(d / "store"), "-o", str(out), store=False)
    assert_one_clear_error(p, "disk full", str(out), "depth cache export", "this write needed about")
    assert list(out.parent.iterdir()) == []
    p = cli(d, "cache", "export", str(d / "tiny.yaml"), "--store", str(d / "store"), "-o", str(out), store=False)
    assert p.returncode == 0, p.stderr
    # a colleague imports it into an empty store whose disk fills on the second shard
    other = tmp_path / "colleague"
    other.mkdir()
    with full_disk(str(other.resolve() / "depth/.import-*/shards/shard-00001.h5.tmp-*"), ENOSPC, under=other):
        p = cli(d, "cache", "import", str(out), "--store", str(other), store=False)
    assert_one_clear_error(p, "disk full", "shard-00001.h5", "imported depth cache shard")
    assert not temporaries(other) and not list((other / "depth").iterdir())
    p = cli(d, "cache", "import", str(out), "--store", str(other), store=False)
    assert p.returncode == 0, p.stderr
    imported = next((other / "depth").iterdir())
    rec = json.loads((imported / "artifact.json").read_text())
    assert "index.json" in rec["files"] and (imported / "COMPLETE").exists()


def test_synthetic_data_generation_on_a_full_disk(tmp_path, monkeypatch):
    """The built-in dataset generated on first use: its own message, and the next run generates it whole."""
    monkeypatch.setenv("DKP_CACHE_DIR", str(tmp_path / "dkp-cache"))
    (tmp_path / "tiny.yaml").write_text(TINY_YAML.format(root=tmp_path / "data"))
    with full_disk(str(tmp_path.resolve() / "data/images/.f000010.png.tmp-*"), ENOSPC, under=tmp_path / "data"):
        p = cli(tmp_path, "run", "--until", "manifest")
    assert_one_clear_error(p, "disk full", "f000010.png", "synthetic dataset")
    p = cli(tmp_path, "run", "--until", "manifest")
    assert p.returncode == 0, p.stderr
    assert len(list((tmp_path / "data" / "images").glob("*.png"))) == 48


# --------------------------------------------------------------------------------------------------
# a real full file system: a tmpfs in a private mount namespace (root only)


def _can_mount_tmpfs() -> str | None:
    """None when `unshare -m` can mount a tmpfs here, else why not (the tests then skip)."""
    if os.geteuid() != 0:
        return "needs root (a tmpfs mounted in a private mount namespace)"
    if shutil.which("unshare") is None:
        return "no unshare"
    p = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"],
                       capture_output=True, text=True)
    return None if p.returncode == 0 else f"cannot mount a tmpfs: {p.stderr.strip()}"


# Inside the namespace: the store on a tmpfs of SIZE holding the artifacts kept; a ballast file takes all but FREE
# bytes (so the disk fills in the stage under test); the command; then the ballast deleted and the tmpfs made
# larger; the command again; the store copied out for the comparison.
TMPFS_SCRIPT = """\
set -u
mount -t tmpfs -o size={size} tmpfs {store}
cp -a {saved}/. {store}/
avail=$(df --output=avail -B1 {store} | tail -1)
head -c $((avail - {free})) /dev/zero > {store}/ballast
{cmd} > {out}/first.out 2> {out}/first.err; echo $? > {out}/first.rc
find {store} -name '*.tmp*' -o -name 'LOCK*' > {out}/leftovers
rm -f {store}/ballast
mount -o remount,size=256m {store}
{cmd} > {out}/second.out 2> {out}/second.err; echo $? > {out}/second.rc
cp -a {store}/. {out}/store
"""


@pytest.mark.parametrize("until,keep,size,free,named", [
    # the depth cache (~ 100 KiB of shards): with 40 KiB free a shard write fails inside HDF5 (through GuardedFile:
    # a clean message, no segfault at exit)
    ("depth", ("manifest",), "4m", 40 * 2**10, "shards/shard-0000"),
    # teach: a checkpoint is ~ 5 MiB (model + AdamW state); with 3 MiB free the first one does not fit
    ("teach", ("manifest", "depth"), "16m", 3 * 2**20, "checkpoints/step-00000002.pt"),
])
def test_real_full_tmpfs(exp, reference, tmp_path, until, keep, size, free, named):
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    d = exp(keep=keep)
    store = d / "store"
    saved = tmp_path / "saved"
    shutil.move(str(store), str(saved))  # the tmpfs is mounted on an empty store dir; the kept artifacts go in
    store.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200", OMP_NUM_THREADS="1")
    cmd = (f"{sys.executable} -m pipeline.cli run {d / 'tiny.yaml'} --store {store} --until {until}")
    script = TMPFS_SCRIPT.format(size=size, store=store, saved=saved, free=free, cmd=cmd, out=out)
    p = subprocess.run(["unshare", "-m", "bash", "-c", script], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    first = subprocess.CompletedProcess(cmd, int((out / "first.rc").read_text()), (out / "first.out").read_text(),
                                        (out / "first.err").read_text())
    assert_one_clear_error(first, "disk full", "No space left on device", named, f"the {until} artifact", "free now")
    assert (out / "leftovers").read_text() == "", "temporaries or locks left: " + (out / "leftovers").read_text()
    assert int((out / "second.rc").read_text()) == 0, (out / "second.err").read_text()
    mine, ref = outputs(out / "store"), outputs(reference / "store")
    assert {k: v for k, v in mine.items() if k.startswith(f"{until}/")} == \
           {k: v for k, v in ref.items() if k.startswith(f"{until}/")}


def test_messages_for_each_errno(tmp_path):
    """The words and the fix of each errno, from the one translation every write path uses."""
    from pipeline.store.io import storage_error

    f = tmp_path / "x" / "model.pt"
    for code, head, fix in [(ENOSPC, "disk full", "free disk space on"),
                            (EDQUOT, "disk quota exceeded", "within your disk quota"),
                            (EROFS, "read-only file system", "writable again"),
                            (EIO, "input/output error", "`dmesg`")]:
        e = storage_error(OSError(code, os.strerror(code)), f, what="model file", needed=3 * 2**20,
                          artifact="the teach artifact 0123456789abcdef")
        msg = str(e)
        assert e.errno == code and isinstance(e, OSError) and e.exit_code == 2
        for needle in (head, fix, str(f), "(model file)", "teach artifact 0123456789abcdef", "about 3.0 MiB",
                       "rerun the same command"):
            assert needle in msg, (needle, msg)
    assert "free now" in str(storage_error(OSError(ENOSPC, "x"), f))
    # a copy names its source as filename and the file it was writing as filename2: the latter is the one named
    e = OSError(ENOSPC, "No space left on device", "/src/a.png", None, "/dst/b.png")
    assert "/dst/b.png" in str(storage_error(e))


class _FillsAfter:
    """A raw file whose writes fail with ENOSPC after ``n`` of them (a disk filling up under HDF5)."""

    def __init__(self, f, n: int) -> None:
        self._f, self._n = f, n

    def write(self, b):
        self._n -= 1
        if self._n < 0:
            raise OSError(ENOSPC, "No space left on device")
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_guarded_file_keeps_hdf5_consistent_after_a_failed_write(tmp_path):
    """HDF5 never sees the failed write: the file closes cleanly, the error is raised by check(); what failed to
    reach the disk is read back from memory (HDF5 reads its metadata back while closing). And a process doing it
    exits normally: h5py closing a file whose write failed segfaults, seen on a full tmpfs."""
    import h5py
    import numpy as np

    from pipeline.store.io import GuardedFile

    g = GuardedFile(tmp_path / "a.h5")
    g._f = _FillsAfter(g._f, 4)
    with h5py.File(g, "w") as f:
        d = f.create_dataset("x", shape=(20, 64, 64), dtype="float32", chunks=(1, 64, 64), compression="gzip")
        for i in range(20):
            d[i] = np.full((64, 64), i, np.float32)
        f.flush()
        assert f["x"][17].mean() == 17  # its chunk never reached the disk: read back from memory
    assert isinstance(g.error, OSError) and g.error.errno == ENOSPC
    with pytest.raises(OSError, match="No space"):
        g.check()
    g.close()
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        import numpy as np, h5py
        from test_disk_full import _FillsAfter
        from pipeline.store.io import GuardedFile
        g = GuardedFile({str(tmp_path / 'b.h5')!r})
        g._f = _FillsAfter(g._f, 3)
        with h5py.File(g, "w") as f:
            f.create_dataset("x", data=np.zeros((50, 64, 64), np.float32), chunks=(1, 64, 64))
        print("error", g.error.errno)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 0 and "error 28" in p.stdout, p.stderr


def test_side_by_side_logs_are_best_effort(tmp_path):
    """A side-by-side child's console goes to STORE/logs/<entry>.log through this stream: on a full disk the
    output is dropped and remembered (the parent then warns), the training is not failed by a print."""
    from pipeline.jobs import BestEffortStream

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(ENOSPC, "No space left on device")

    ok, full = BestEffortStream(io.StringIO()), BestEffortStream(Full())
    print("step 2/6", file=ok)
    print("step 2/6", file=full)
    full.flush()
    assert ok.getvalue() == "step 2/6\n" and ok.failed is None
    assert full.failed == "No space left on device"


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    """Creating LOCK needs no space, writing its owner does: on a full disk the empty file used to stay and hold
    the next run for 5 s (a torn lock); it is removed, and the error is the storage error."""
    from pipeline.store import artifacts

    def full(*_a, **_k):
        raise OSError(ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts.json, "dump", full)
    with pytest.raises(OSError, match="No space left"):
        artifacts.Lock(tmp_path / "LOCK").acquire()
    assert not (tmp_path / "LOCK").exists()
