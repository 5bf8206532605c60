"""Finished artifacts know their files (issue 24): artifact.json lists every output file with its size and, where
cheap, its sha256; `status` (stat cost) calls an artifact with a file missing or truncated `damaged`, naming the
file, never fresh; `status --verify` re-hashes (the depth cache through its checksums); `run` rebuilds a damaged
artifact by resuming in it (the depth stage only the damaged shards, a training from its last checkpoint before
the damage) to the files of an uninterrupted run; artifacts published before file lists keep working.

The reference run, the copies and the in-process CLI are test_disk_full's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_disk_full import cli, exp, outputs, reference, status  # noqa: F401 - fixtures used by name

ALL = ("manifest", "depth", "teach", "distill", "eval")


def artifact(d: Path, stage: str) -> Path:
    return Path(status(d)[stage]["path"])


def same_as_reference(d: Path, ref: Path) -> None:
    mine, theirs = outputs(d / "store"), outputs(ref / "store")
    assert mine == theirs, {k: (mine.get(k), theirs.get(k)) for k in set(mine) | set(theirs)
                            if mine.get(k) != theirs.get(k)}
    assert {s["state"] for s in status(d).values()} == {"fresh"}


def test_record_lists_every_output_file(reference):
    """Sizes for every output; sha256 for the model, metrics, index and pictures; depth shards by size (their
    sha256 is in index.json); no checkpoints, TensorBoard events, locks, temporaries or the record itself."""
    store = reference / "store"
    recs = {p.parts[-3]: json.loads(p.read_text()) for p in store.glob("*/*/artifact.json")}
    teach, depth, ev = recs["teach"]["files"], recs["depth"]["files"], recs["eval"]["files"]
    assert {"model.pt", "metrics.jsonl", "loss.png", "keypoints.png", "samples/step_000003.png"} <= set(teach)
    assert all(v["sha256"].startswith("sha256:") for v in teach.values())
    assert not any(k.startswith(("checkpoints/", "tensorboard/")) or k in ("artifact.json", "COMPLETE")
                   for k in teach)
    assert "sha256" in depth["index.json"] and "sha256" not in depth["shards/shard-00001.h5"]
    index = json.loads((next(store.glob("depth/*")) / "index.json").read_text())
    assert {e["file"]: e["bytes"] for e in index["shards"]} == {k: v["bytes"] for k, v in depth.items()
                                                                 if k.endswith(".h5")}
    assert "sha256" in ev["metrics.json"] and recs["manifest"]["files"]["manifest.json"]["bytes"] > 0


def test_deleted_teacher_model_is_damaged_and_run_rebuilds_only_it(exp, reference):
    """The issue's case: delete a finished teacher's model.pt. `status` says damaged, naming it (distill and eval,
    whose own files are whole, stay fresh); `run` rebuilds the teacher from its final checkpoint, byte for byte,
    and nothing else."""
    d = exp()
    (artifact(d, "teach") / "model.pt").unlink()
    st = status(d)
    assert st["teach"]["state"] == "damaged" and st["teach"]["damaged_files"] == ["model.pt"], st["teach"]
    assert "model.pt missing" in st["teach"]["why"][0]
    assert [st[s]["state"] for s in ("manifest", "depth", "distill", "eval")] == ["fresh"] * 4
    p = cli(d, "status")
    assert "damaged" in p.stdout and "model.pt missing" in " ".join(p.stdout.split())
    p = cli(d, "run")
    assert p.returncode == 0, p.stderr
    out = " ".join(p.stdout.split())
    assert "teach damaged" in out and "teach built" in out, out
    assert "distill fresh" in out and "eval fresh" in out and "distill built" not in out, out
    rec = json.loads((artifact(d, "teach") / "artifact.json").read_text())
    assert rec["rebuilt_after_damage"] == [{"file": "model.pt", "problem": "missing"}]
    same_as_reference(d, reference)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("stage,rel,how", [
    ("manifest", "manifest.json", "truncate"),
    ("depth", "shards/shard-00001.h5", "truncate"),
    ("depth", "index.json", "delete"),
    ("teach", "metrics.jsonl", "truncate"),  # resumed from the last checkpoint before its first torn line
    ("teach", "samples/step_000003.png", "delete"),  # drawn after step 3: resumed from before it
    ("distill", "model.pt", "truncate"),
    ("eval", "metrics.json", "truncate"),
])
def test_missing_or_truncated_file_is_never_fresh_and_run_rebuilds_it(exp, reference, stage, rel, how):
    d = exp()
    path = artifact(d, stage)
    shard_times = {p.name: p.stat().st_mtime_ns for p in (artifact(d, "depth") / "shards").glob("*.h5")}
    (path / rel).unlink() if how == "delete" else _truncate(path / rel)
    st = status(d)[stage]
    assert st["state"] == "damaged" and st["damaged_files"] == [rel], st
    assert ("missing" if how == "delete" else "truncated or replaced") in st["why"][0]
    p = cli(d, "run")
    assert p.returncode == 0, p.stderr
    assert f"{stage} built" in " ".join(p.stdout.split())
    same_as_reference(d, reference)
    if stage == "depth":  # the depth stage resumes: only the damaged shard is computed again
        now = {p.name: p.stat().st_mtime_ns for p in (artifact(d, "depth") / "shards").glob("*.h5")}
        changed = sorted(n for n in now if now[n] != shard_times[n])
        assert changed == (["shard-00001.h5"] if rel.startswith("shards/") else []), changed


def test_verify_finds_changed_content_and_run_verify_rebuilds_it(exp, reference):
    """A flipped byte keeps the size: `status` (stat cost) cannot see it, `status --verify` can: in model.pt by its
    sha256, in a depth shard by the cache's checksums. `run --verify` rebuilds both (the depth stage only that
    shard)."""
    import h5py

    d = exp()
    model = artifact(d, "distill") / "model.pt"
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    model.write_bytes(bytes(raw))
    shard = artifact(d, "depth") / "shards" / "shard-00002.h5"
    with h5py.File(shard, "r") as f:
        offset = f["depth"].id.get_chunk_info(3).byte_offset
    raw = bytearray(shard.read_bytes())
    raw[offset + 5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    others = {n: (shard.parent / n).stat().st_mtime_ns for n in ("shard-00000.h5", "shard-00001.h5")}
    assert {s["state"] for s in status(d).values()} == {"fresh"}  # sizes match: fresh at stat cost
    st = status(d, "--verify")
    assert st["distill"]["state"] == "damaged" and "content differs from its recorded sha256" in st["distill"]["why"][0]
    assert st["depth"]["state"] == "damaged" and st["depth"]["damaged_files"] == ["shards/shard-00002.h5"], st["depth"]
    assert st["depth"]["why"][-1] == "`run --verify` rebuilds it"
    assert st["teach"]["state"] == "fresh"
    p = cli(d, "run", "--verify")
    assert p.returncode == 0, p.stderr
    assert {n: (shard.parent / n).stat().st_mtime_ns for n in others} == others
    same_as_reference(d, reference)
    assert {s["state"] for s in status(d, "--verify").values()} == {"fresh"}


def test_artifacts_built_before_file_lists_keep_working(exp, reference):
    """A record without "files" (published before issue 24): fresh while whole, reused by `run`; a missing model or
    depth shard still makes it damaged (the files every artifact of its stage has; the cache's index), and `run`
    rebuilds it."""
    d = exp()
    for rec_path in (d / "store").glob("*/*/artifact.json"):
        rec = json.loads(rec_path.read_text())
        del rec["files"]
        rec_path.write_text(json.dumps(rec))
    assert {s["state"] for s in status(d).values()} == {"fresh"}
    p = cli(d, "run")
    assert p.returncode == 0 and "nothing to do" in p.stdout, p.stdout + p.stderr
    (artifact(d, "teach") / "model.pt").unlink()
    (artifact(d, "depth") / "shards" / "shard-00000.h5").unlink()
    st = status(d)
    assert st["teach"]["damaged_files"] == ["model.pt"] and st["depth"]["damaged_files"] == ["shards/shard-00000.h5"]
    p = cli(d, "run")
    assert p.returncode == 0, p.stderr
    mine, theirs = outputs(d / "store"), outputs(reference / "store")  # the rebuilt ones list their files again
    assert {k for k in mine} == {k for k in theirs if k.startswith(("depth/", "teach/"))}
    assert all(mine[k] == theirs[k] for k in mine)
    assert {s["state"] for s in status(d).values()} == {"fresh"}


def test_resume_state_and_logs_are_not_outputs(exp, reference):
    """Checkpoints and TensorBoard events may be deleted to free space: the artifact stays fresh. Its model deleted
    too, `run` retrains from scratch (no checkpoint left) to the same teacher."""
    import shutil

    d = exp()
    teach = artifact(d, "teach")
    shutil.rmtree(teach / "checkpoints")
    shutil.rmtree(teach / "tensorboard")
    assert status(d)["teach"]["state"] == "fresh"
    (teach / "model.pt").unlink()
    assert status(d)["teach"]["damaged_files"] == ["model.pt"]
    p = cli(d, "run")
    assert p.returncode == 0, p.stderr
    assert (teach / "model.pt").is_file() and (teach / "checkpoints").is_dir()  # retrained
    same_as_reference(d, reference)


def test_stage_command_refuses_when_what_it_reads_is_damaged(exp):
    """`dkp-pipeline distill` alone does not build upstream: a damaged teacher is refused with the file named
    (before, distill failed inside itself on the missing model)."""
    d = exp(keep=("manifest", "depth", "teach"))
    (artifact(d, "teach") / "model.pt").unlink()
    p = cli(d, "distill")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    err = " ".join(p.stderr.split())
    assert "stage distill needs teach, which is damaged (model.pt missing)" in err, err
    assert "dkp-pipeline run tiny --until teach" in err


def test_rebuild_refused_when_what_it_reads_is_not_fresh(exp):
    """prepare_rebuild itself: rebuilding the teacher reads the depth cache; with the cache damaged too (and so not
    rebuilt first, as `run` would), it refuses naming both files."""
    from pipeline.config import load_config
    from pipeline.errors import DkpError
    from pipeline.graph import build_plan
    from pipeline.execute import prepare_rebuild
    from pipeline.stages import registry
    from pipeline.store.artifacts import Store

    d = exp(keep=("manifest", "depth", "teach"))
    (artifact(d, "teach") / "model.pt").unlink()
    (artifact(d, "depth") / "shards" / "shard-00001.h5").unlink()
    plan = build_plan(load_config(str(d / "tiny.yaml"), []), Store(d / "store"), progress=False)
    with pytest.raises(DkpError, match=r"teach artifact .* is damaged \(model.pt missing\); rebuilding it reads the "
                                       r"depth artifact, which is damaged \(shards/shard-00001.h5 missing\)"):
        prepare_rebuild(plan, "teach", plan.store, registry.stage("teach"))
    assert (artifact(d, "teach") / "COMPLETE").exists()  # refused before touching anything
