"""Content-hashed artifact store: keys, locks, atomic publish, provenance.

Layout::

    STORE/<stage>/<key[:16]>/          one artifact
        artifact.json                  key, inputs, resolved config, versions, git SHA, command, timings, and
                                       (since issue 24) "files": every output file with its size and sha256
        LOCK                           while a process writes it: {"pid", "host", "started"}
        COMPLETE                       written last (tmp + rename): the artifact is published
        ...                            the stage's own files
    STORE/experiments/<name>.json      stage -> key last built for an experiment (what `status` diffs against)

A directory without ``COMPLETE`` is an interrupted run: the stage resumes inside it. Identity is one
function, :func:`artifact_key`. A published artifact whose files no longer match its record (one deleted,
truncated, or with ``--verify`` changed) is ``damaged``, never ``fresh`` (:meth:`Store.state`).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fnmatch
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from pipeline.errors import DkpError, LockError
from pipeline.store.io import (is_storage_error, json_digest, remove_temporaries_of, sha256_file, storage_error,
                               write_atomic, write_json_atomic)

# A stage's schema version (declared once, in its Stage: pipeline/stages/<name>/__init__.py) is bumped by hand when
# the meaning of its output changes (never derived from the git SHA); callers pass it in, so this floor of the house
# knows no stage.

COMPLETE = "COMPLETE"
LOCK = "LOCK"
RECORD = "artifact.json"


def artifact_key(stage: str, config: dict, upstream: dict[str, str], fingerprint: Optional[str | dict], *,
                 schema: int) -> str:
    """sha256 of canonical JSON of (stage, schema version, semantic config, upstream keys, input fingerprint).

    ``config`` must already be the *semantic* config (see :func:`pipeline.config.semantic_dict`);
    ``fingerprint`` is one ``"xxh3:..."`` or a dict of named parts (pipeline/data/reads.py); ``schema`` is the
    stage's declared schema version (``Stage.schema``).
    """
    return json_digest(key_inputs(stage, config, upstream, fingerprint, schema=schema))


def key_inputs(stage: str, config: dict, upstream: dict[str, str], fingerprint: Optional[str | dict], *,
               schema: int) -> dict:
    """What :func:`artifact_key` hashes, kept in artifact.json so `status` can say why a key changed."""
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise TypeError(f"schema of stage {stage!r} must be its declared int version, got {schema!r}")
    return {"stage": stage, "schema": schema, "config": config, "upstream": dict(upstream), "fingerprint": fingerprint}


# ---------------------------------------------------------------------------------------------------
# provenance


def git_sha() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, Optional[str]]:
    """Versions of what can change results; torch & co. only if already imported (keeps `status` fast)."""
    from importlib import metadata

    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for dist in ("distill-dkp", "torch", "torchvision", "timm", "h5py", "numpy", "opencv-python-headless"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children (DataLoader workers)."""
    own = time.process_time()
    try:
        import resource
    except ImportError:  # not on Windows
        return own
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own + kids.ru_utime + kids.ru_stime


# ---------------------------------------------------------------------------------------------------
# locks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A lock's holder touches the lock file every HEARTBEAT_S seconds; a lock of another host untouched for
# STALE_AFTER_S is a crashed process's (e.g. a rank of a multi-node job on a node that died): it is reported so by
# `status` and taken over by the next writer. Generous on purpose: a live holder frozen that long (SIGSTOP, a
# hung file system) and then resumed would find its lock taken, and refuses to publish (Lock.check_held).
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


@dataclass
class Lock:
    """An exclusive lock file holding the owner's pid, host and heartbeat period.

    Created with O_CREAT|O_EXCL, so two processes cannot both take it. A lock whose owner is a dead
    process on this host is stale and taken over. Processes of another host cannot be seen, so the
    holder keeps the file's mtime fresh (a heartbeat every :data:`HEARTBEAT_S`); a lock of another host
    without a heartbeat for :data:`STALE_AFTER_S` is stale too (a crashed rank of a multi-node job). A
    lock from another host written before heartbeats existed is never broken automatically: the message
    says how to remove it.
    """

    path: Path
    held: bool = False
    heartbeat_s: float = HEARTBEAT_S

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "heartbeat_s": self.heartbeat_s}
        dead: list[int] = []  # pids of killed owners whose lock we took over
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.read_owner()
                if owner is None:
                    # Torn/empty lock file: its writer died between create and write.
                    if time.time() - self._mtime() > 5:
                        self._break(None)
                        continue
                    time.sleep(0.2)
                    continue
                if self.stale(owner):
                    self._break(owner)  # its process is gone (this host) or silent for too long (another host)
                    dead.append(int(owner.get("pid", -1)))
                    continue
                raise LockError(
                    f"{self.path.parent} is being written by pid {owner.get('pid')} on {owner.get('host')} "
                    f"since {owner.get('started')}. Wait for it to finish, or, if that process is gone "
                    f"(another host), remove {self.path}."
                ) from None
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:  # disk full while writing it: an empty lock would block the next run for 5 s
                with contextlib.suppress(OSError):
                    self.path.unlink()
                raise
            self.held, self._me = True, me
            for pid in dead:
                remove_temporaries_of(self.path.parent, pid)
            self._start_heartbeat()
            return
        raise LockError(f"could not take the lock {self.path}; remove it if no process is writing there")

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def stale(self, owner: dict) -> bool:
        """Whether ``owner`` (read from the lock) is known gone: a dead pid on this host, or, on another host, no
        heartbeat for :data:`STALE_AFTER_S` (only owners that declare a heartbeat can be judged so)."""
        if owner.get("host") == socket.gethostname():
            return not _pid_alive(int(owner.get("pid", -1)))
        beat = owner.get("heartbeat_s")
        return isinstance(beat, (int, float)) and time.time() - self._mtime() > max(STALE_AFTER_S, 10 * beat)

    def describe(self, owner: dict) -> str:
        """What `status` says about an artifact this lock holds: who writes it, or that its writer is gone."""
        who = f"pid {owner.get('pid')} on {owner.get('host')}"
        if owner.get("host") == socket.gethostname():
            return f"being written by {who}"
        age = time.time() - self._mtime()
        if not isinstance(owner.get("heartbeat_s"), (int, float)):
            return (f"being written by {who} since {owner.get('started')} (no heartbeat recorded: if that process "
                    f"is gone, remove {self.path})")
        if self.stale(owner):
            return (f"interrupted: {who} left its lock and has not renewed it for {_age(age)} (its process is gone, "
                    f"e.g. a crashed rank on another node); the next run takes the lock over and resumes")
        return f"being written by {who} (heartbeat {_age(age)} ago)"

    def _break(self, expected: Optional[dict]) -> None:
        # Rename first so two processes breaking the same stale lock cannot both succeed; then make sure the
        # renamed file is the lock judged stale, not one a faster process took over meanwhile (put that back).
        grave = self.path.with_name(f"{LOCK}.stale-{os.getpid()}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        if expected is not None:
            try:
                got = json.loads(grave.read_text())
            except (OSError, ValueError):
                got = None
            if got != expected:
                with contextlib.suppress(OSError):
                    os.link(grave, self.path)  # fails if yet another process holds it now: theirs stands
        with contextlib.suppress(FileNotFoundError):
            grave.unlink()

    def read_owner(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, ValueError):
            return None

    def check_held(self) -> None:
        """LockError unless the lock file still names this process (it was not taken over as stale)."""
        owner = self.read_owner()
        if owner != getattr(self, "_me", None):
            raise LockError(f"the lock {self.path} was taken over by pid {(owner or {}).get('pid')} on "
                            f"{(owner or {}).get('host')} (this process's heartbeat stopped for over "
                            f"{STALE_AFTER_S:.0f} s); not publishing {self.path.parent}. Re-run to resume.")

    def _start_heartbeat(self) -> None:
        import threading

        stop = self._stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                if self.read_owner() != self._me:
                    return  # taken over (this process was silent too long): never keep another owner's lock alive
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        threading.Thread(target=beat, name=f"heartbeat {self.path}", daemon=True).start()

    def release(self) -> None:
        if self.held:
            self._stop.set()
            with contextlib.suppress(FileNotFoundError):
                if self.read_owner() == self._me:  # never remove the lock of a process that took it over
                    self.path.unlink()
            self.held = False

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------------
# the files of a finished artifact (issue 24)

# Not outputs, so not listed: resume state and logs. Deleting them (to free space) leaves the artifact whole.
NOT_OUTPUTS = ("checkpoints", "tensorboard")
# A file up to this size gets a sha256 in the list at publish (model, metrics, index, pictures): reading it once
# more costs little next to what wrote it. Larger files (an embedding cache) are listed with their size only.
HASH_LIMIT = 256 << 20
_TEMPORARY = re.compile(r"\.tmp[-.]\d+|^\.write-test-")  # atomic_file, checkpoints, depth_cache.tmp_name, probes


def list_files(path: Path, *, unhashed: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every output file under the artifact directory ``path``: ``{relative path: {"bytes": N, "sha256": ...}}``.

    Left out: the record and the marker, locks, temporaries and :data:`NOT_OUTPUTS`. ``unhashed``: glob patterns
    of files whose content is checksummed elsewhere (depth shards: in the cache's index), listed with their
    size only."""
    out: dict[str, dict] = {}
    path = Path(path)
    for top, dirs, names in os.walk(path):
        here = Path(top)
        if here == path:
            dirs[:] = [d for d in dirs if d not in NOT_OUTPUTS]
        for name in names:
            rel = (here / name).relative_to(path).as_posix()
            if rel in (RECORD, COMPLETE) or name.startswith(LOCK) or _TEMPORARY.search(name):
                continue
            size = (here / name).stat().st_size
            entry: dict[str, Any] = {"bytes": size}
            if size <= HASH_LIMIT and not any(fnmatch.fnmatchcase(rel, pat) for pat in unhashed):
                entry["sha256"] = sha256_file(here / name)
            out[rel] = entry
    return dict(sorted(out.items()))


def check_files(path: Path, files: dict[str, dict], *, deep: bool = False) -> list[dict]:
    """What no longer matches ``files`` (a record's list): ``[{"file": rel, "problem": ...}]``. Existence and size
    cost one stat per file; ``deep`` also re-hashes the files that have a sha256."""
    damage = []
    for rel, want in files.items():
        p = Path(path) / rel
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            damage.append({"file": rel, "problem": "missing"})
            continue
        if size != want.get("bytes"):
            damage.append({"file": rel, "problem": f"is {size} bytes, {want.get('bytes')} recorded (truncated or "
                                                   f"replaced)"})
        elif deep and want.get("sha256") and sha256_file(p) != want["sha256"]:
            damage.append({"file": rel, "problem": "content differs from its recorded sha256 (corrupted or replaced)"})
    return damage


def integrity(path: Path, record: dict, *, outputs: tuple = (), check: Optional[Callable[[Path, bool], list]] = None,
              deep: bool = False) -> list[dict]:
    """Damage of the published artifact at ``path``: its record's file list checked (or, for an artifact
    published before file lists, ``outputs``: the files every artifact of its stage has), then the stage's own
    ``check`` (the depth cache's shards against its index; with ``deep``, every checksum). ``outputs`` and
    ``check`` are the stage's declaration's (``Stage.outputs``, ``Stage.integrity``)."""
    files = record.get("files")
    if isinstance(files, dict):
        damage = check_files(path, files, deep=deep)
    else:  # published before issue 24: no list, but these files are there in every finished artifact
        damage = [{"file": rel, "problem": "missing"} for rel in outputs if not (Path(path) / rel).is_file()]
    if check is not None and (deep or not isinstance(files, dict)):
        seen = {d["file"] for d in damage}
        damage += [d for d in check(Path(path), deep) if d["file"] not in seen]
    return damage


def damage_text(damage: list[dict], limit: int = 3) -> str:
    """'model.pt missing; metrics.jsonl is 12 bytes, 340 recorded (truncated or replaced) …'"""
    shown = "; ".join(f"{d['file']} {d['problem']}" for d in damage[:limit])
    return shown + (f"; and {len(damage) - limit} more" if len(damage) > limit else "")


# ---------------------------------------------------------------------------------------------------
# the store


def _is_read_only(e: OSError) -> bool:
    return e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


@dataclass
class ArtifactState:
    stage: str
    key: str
    path: Path
    state: str  # fresh | damaged | in_progress | missing
    record: Optional[dict] = None
    locked_by: Optional[dict] = None
    damage: list[dict] = field(default_factory=list)  # damaged: [{"file": rel, "problem": ...}]


@dataclass
class Store:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @classmethod
    def from_option(cls, store: Optional[str]) -> "Store":
        root = Path(store or os.environ.get("DKP_STORE") or "dkp-store")
        if root.exists() and not root.is_dir():
            raise DkpError(f"--store {root}: this is a file, not a directory; pass the store directory "
                           f"(default ./dkp-store; it is created on the first run)")
        return cls(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:16]

    def is_complete(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / COMPLETE).exists()

    def record(self, stage: str, key: str) -> Optional[dict]:
        try:
            rec = json.loads((self.path(stage, key) / RECORD).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        # A 16-hex prefix collision is astronomically unlikely but must never serve the wrong artifact.
        if rec.get("key") not in (None, key):
            return None
        return rec

    def state(self, stage: str, key: str, *, verify: bool = False, outputs: tuple = (),
              check: Optional[Callable[[Path, bool], list]] = None) -> ArtifactState:
        """fresh / damaged / in_progress / missing. A published artifact is fresh only while every file its record
        lists is there with its size (``verify``: and its checksum); else damaged, with the files named.
        ``outputs``/``check``: the stage's declared files and own check (:func:`integrity`; graph passes them)."""
        p = self.path(stage, key)
        rec = self.record(stage, key)
        if (p / COMPLETE).exists() and rec is not None and rec.get("key") == key:
            damage = integrity(p, rec, outputs=outputs, check=check, deep=verify)
            return ArtifactState(stage, key, p, "damaged" if damage else "fresh", rec, damage=damage)
        if (p / COMPLETE).exists() and not self._record_of_another_key(p, key):
            return ArtifactState(stage, key, p, "damaged", rec,
                                 damage=[{"file": RECORD, "problem": "missing or unreadable"}])
        if p.exists():
            lock = Lock(p / LOCK)
            owner = lock.read_owner() if (p / LOCK).exists() else None
            if owner is not None and owner.get("host") == socket.gethostname() and not _pid_alive(
                    int(owner.get("pid", -1))):
                owner = None  # its writer was killed: an interrupted run (the next one takes the lock over)
            elif owner is not None:
                owner = dict(owner, note=lock.describe(owner))  # what `status` says (a crashed remote rank...)
            return ArtifactState(stage, key, p, "in_progress", rec, owner)
        return ArtifactState(stage, key, p, "missing")

    @staticmethod
    def _record_of_another_key(p: Path, key: str) -> bool:
        try:
            other = json.loads((p / RECORD).read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            return False
        return other not in (None, key)

    # experiments: which key each stage had when last built, for "stale because ..."
    def experiment_file(self, name: str) -> Path:
        """``experiments/<name>.json``; a name that would lead outside that folder is refused (config.validate
        already allows only a safe character set; this is the store's own guard)."""
        base = (self.root / "experiments").resolve()
        f = (base / f"{name}.json").resolve()
        if f.parent != base:
            raise DkpError(f"experiment name {name!r} would write outside {base}; use letters, digits and . _ + = -")
        return f

    def last_built(self, name: str) -> dict[str, str]:
        try:
            return json.loads(self.experiment_file(name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def remember(self, name: str, stage: str, key: str) -> None:
        """Record ``key`` as the artifact experiment ``name`` last used for ``stage`` (what `status` diffs against).

        Nothing is written when that is already recorded, so a run where everything is fresh works in a
        read-only store; when the store cannot be written, the record is skipped with a warning (it only
        feeds `status` explanations), since the artifacts themselves are already there.
        """
        if self.last_built(name).get(stage) == key:
            return
        f = self.experiment_file(name)
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            with Lock(f.with_suffix(".lock")):
                data = self.last_built(name)
                data[stage] = key
                write_json_atomic(f, data)
        except OSError as e:
            if not (_is_read_only(e) or is_storage_error(e)):  # it only feeds `status`: warn and go on
                raise
            import logging

            logging.getLogger(__name__).warning(
                "store %s is not writable (%s): not recording that experiment %r used %s %s", self.root,
                e.strerror or e, name, stage, key[:16])

    def check_writable(self, needed: str) -> None:
        """DkpError unless files can be created in the store; ``needed`` says what would be written. Said
        before any stage starts, instead of a traceback from the first write inside one."""
        probe = self.root / f".write-test-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            if is_storage_error(e) and not _is_read_only(e):
                raise storage_error(e, probe, what=f"an empty file, to check the store before {needed}") from None
            if not _is_read_only(e):
                raise
            raise DkpError(f"store {self.root} is not writable ({e.strerror or e}) and {needed}; make it writable, "
                           f"or pass --store DIR with a writable directory") from None

    def install(self, stage: str, key: str, src: Path, record: dict, *, unhashed: tuple[str, ...] = ()) -> Path:
        """Publish a directory built elsewhere in this store (an imported depth cache, built in a temporary directory
        beside its final place): ``record`` with the list of ``src``'s files, then ``COMPLETE``, written into
        ``src``, which is then renamed to the artifact's path in one step. Fails with OSError, changing nothing
        there, if that path exists. The other way in beside :meth:`ArtifactWriter.publish`; both end the same way,
        with the record listing the files and ``COMPLETE`` written last."""
        final = self.path(stage, key)
        rec = dict(record, key=key, stage=stage, status="complete", files=list_files(Path(src), unhashed=unhashed))
        write_json_atomic(Path(src) / RECORD, rec, what="the artifact's record")
        write_atomic(Path(src) / COMPLETE, key + "\n", what="the artifact's publish marker")
        os.rename(src, final)  # atomic; refused if another import or run created the directory meanwhile
        return final

    @contextlib.contextmanager
    def open_for_write(self, stage: str, key: str, *, inputs: dict, config: dict) -> Iterator["ArtifactWriter"]:
        """Lock the artifact directory (creating it) and yield a writer; nothing is published unless
        :meth:`ArtifactWriter.publish` is called. An exception leaves the directory as a resume point."""
        p = self.path(stage, key)
        p.mkdir(parents=True, exist_ok=True)
        with Lock(p / LOCK) as lock:
            if (p / COMPLETE).exists():
                raise DkpError(f"{p} is already complete; nothing to write")
            w = ArtifactWriter(stage=stage, key=key, path=p, inputs=inputs, config=config, lock=lock)
            w.write_record(status="in_progress")
            yield w


@dataclass
class ArtifactWriter:
    stage: str
    key: str
    path: Path
    inputs: dict
    config: dict
    started: float = field(default_factory=time.time)
    cpu_started: float = field(default_factory=cpu_seconds)
    extra: dict = field(default_factory=dict)
    lock: Optional[Lock] = None  # held while writing: checked before publishing
    unhashed: tuple[str, ...] = ()  # globs of files checksummed elsewhere (list_files), listed by size only

    def write_record(self, status: str, **extra: Any) -> None:
        self.extra.update(extra)
        prev = {}
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            prev = json.loads((self.path / RECORD).read_text())
        rec = {
            "key": self.key,
            "stage": self.stage,
            "status": status,
            "inputs": self.inputs,
            "config": self.config,
            "versions": versions(),
            "git_sha": git_sha(),
            "command": sys.argv,
            "host": socket.gethostname(),
            "timings": {
                "first_started": prev.get("timings", {}).get("first_started", _now()),
                "this_run_started": _dt.datetime.fromtimestamp(self.started, _dt.timezone.utc).isoformat(
                    timespec="seconds"),
                "seconds_this_run": round(time.time() - self.started, 3),
                "cpu_seconds_this_run": round(cpu_seconds() - self.cpu_started, 3),
            },
            **self.extra,
        }
        write_json_atomic(self.path / RECORD, rec, what="the artifact's record")

    def publish(self, **extra: Any) -> None:
        """Final artifact.json, listing every output file (:func:`list_files`), then the COMPLETE marker, last
        and atomically; refused if this writer's lock was taken over meanwhile (:meth:`Lock.check_held`)."""
        if self.lock is not None:
            self.lock.check_held()
        self.write_record(status="complete", files=list_files(self.path, unhashed=self.unhashed), **extra)
        write_atomic(self.path / COMPLETE, self.key + "\n", what="the artifact's publish marker")
