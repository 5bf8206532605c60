"""The HDF5 depth cache: round trip, resume, rank partition, verify, spec check, export/import, DataLoader."""
from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import depth_cache as dc
from pipeline.store.io import sha256_file
from pipeline.errors import CacheError, StorageError

SPEC = {"model_type": "dpt_swin2_tiny_256", "weights_sha256": "sha256:" + "a1" * 32, "net_size": 256,
        "resize_rule": "minimal/32", "precision": "fp32", "normalisation": "mean=std=0.5",
        "manifest_fingerprint": "xxh3:0123", "extra": None, "sizes": [256, 256]}
# Non-square, mixed sizes (h, w) so that a swapped axis or a wrong crop of the padding shows up.
SIZES = [(12, 20), (17, 9), (8, 8), (21, 13), (5, 30), (16, 16), (9, 11)]


def synth_depth(i: int, h: int, w: int) -> np.ndarray:
    """MiDaS-like relative inverse depth: smooth field + a sharp-edged near blob + small noise, >= 0."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = 200 + 800 * yy / h + 100 * np.sin(xx / w * 3 + rng.uniform(0, 3))
    blob = ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 3) / (w / 4)) ** 2 < 1
    d[blob] += 900
    d += rng.standard_normal((h, w)).astype(np.float32)
    return (d - d.min() + rng.uniform(0, 2)).astype(np.float32) * rng.uniform(0.01, 20)


def frames(n: int, invalid: tuple[int, ...] = (3,)):
    ids = [f"clip{i // 4}/frame_{i:04d}.jpg" for i in range(n)]
    hashes = [f"xxh3:{i:032x}" for i in range(n)]
    depths = [None if i in invalid else synth_depth(i, *SIZES[i % len(SIZES)]) for i in range(n)]
    valid = [i not in invalid for i in range(n)]
    return ids, hashes, depths, valid


def build(cache_dir: Path, n: int = 10, shard_size: int = 4, *, rank: int = 0, world: int = 1,
          storage_dtype: str = "float16", invalid: tuple[int, ...] = (3,), do_finalize: bool = True):
    ids, hashes, depths, valid = frames(n, invalid)
    w = dc.CacheWriter(cache_dir, spec=SPEC, n_frames=n, shard_size=shard_size, storage_dtype=storage_dtype)
    for p in w.shards_todo(rank, world):
        sl = slice(p.start, p.stop)
        w.write_shard(p, ids[sl], hashes[sl], depths[sl], valid[sl])
    if do_finalize:
        dc.finalize(cache_dir)
    return w, (ids, hashes, depths, valid)


def shard_digests(cache_dir: Path) -> list[str]:
    """sha256 of the shard files as they are on disk (not as the index claims)."""
    return [sha256_file(cache_dir / e["file"]) for e in dc.read_index(cache_dir)["shards"]]


def test_round_trip_mixed_sizes_float16(tmp_path):
    _, (ids, hashes, depths, valid) = build(tmp_path / "c", n=10, shard_size=4)
    r = dc.DepthCacheReader(tmp_path / "c")
    assert len(r) == 10 and r.spec == json.loads(json.dumps(SPEC)) and r.storage_dtype == "float16"
    for i in range(10):
        assert r.frame_id(i) == ids[i] and r.frame_hash(i) == hashes[i] and r.is_valid(i) == valid[i]
        assert r.index_of(ids[i]) == i
        if not valid[i]:
            with pytest.raises(CacheError, match="invalid"):
                r.read(i)
            continue
        got = r.read(i)
        assert got.dtype == np.float32 and got.shape == depths[i].shape
        peak = np.abs(depths[i]).max()
        # float16 with a power-of-two scale: only float16 rounding, <= 2^-11 of the frame's peak.
        assert np.abs(got - depths[i]).max() <= peak * 2.0 ** -11
        assert np.abs(got - depths[i]).max() > 0  # it really is float16, not silently float32
    np.testing.assert_array_equal(r.valid_indices(), [i for i in range(10) if valid[i]])
    with pytest.raises(IndexError):
        r.read(10)
    with pytest.raises(KeyError, match="nope"):
        r.index_of("nope")
    r.close()


def test_readable_with_plain_h5py(tmp_path):
    _, (ids, _, depths, _) = build(tmp_path / "c", n=6, shard_size=4)
    with h5py.File(tmp_path / "c" / "shards" / "shard-00001.h5", "r") as f:
        assert f.attrs["values"] == "relative inverse depth (larger = nearer)"
        assert f.attrs["spec.model_type"] == SPEC["model_type"] and f.attrs["schema_version"] == dc.SCHEMA_VERSION
        assert json.loads(f.attrs["spec_json"])["sizes"] == [256, 256]
        assert list(f["frame_index"][...]) == [4, 5] and list(f["frame_id"].asstr()[...]) == ids[4:6]
        h, w = f["shape"][1]
        plain = f["depth"][1, :h, :w].astype(np.float32) * f["scale"][1]
        assert f["depth"].chunks == (1, *f["depth"].shape[1:])
    np.testing.assert_allclose(plain, depths[5], rtol=0, atol=np.abs(depths[5]).max() * 2.0 ** -11)


def test_float32_storage_is_exact(tmp_path):
    _, (_, _, depths, valid) = build(tmp_path / "c", n=5, shard_size=2, storage_dtype="float32")
    r = dc.DepthCacheReader(tmp_path / "c")
    for i in range(5):
        if valid[i]:
            np.testing.assert_array_equal(r.read(i), depths[i])


def test_nan_is_a_hole_inf_and_all_nan_are_refused_naming_the_frame(tmp_path):
    holed = np.ones((4, 5), np.float32)
    holed[1, 2] = np.nan  # a pixel with no reading (depth files' holes): stored as NaN, read back as NaN
    w = dc.CacheWriter(tmp_path / "ok", spec=SPEC, n_frames=2, shard_size=2)
    w.write_shard(w.plan(0), ["a", "b"], ["h0", "h1"], [np.ones((4, 5), np.float32), holed], [True, True])
    dc.finalize(tmp_path / "ok")
    back = dc.DepthCacheReader(tmp_path / "ok").read(1)
    assert np.isnan(back[1, 2]) and np.isnan(back).sum() == 1 and (back[~np.isnan(back)] == 1).all()
    assert dc.verify(tmp_path / "ok").ok
    for bad, what in ((np.full((4, 5), np.inf, np.float32), "Inf"), (np.full((4, 5), np.nan, np.float32), "NaN")):
        w = dc.CacheWriter(tmp_path / what, spec=SPEC, n_frames=2, shard_size=2)
        with pytest.raises(CacheError, match=rf"frame 1 \('b'\).*{what}"):
            w.write_shard(w.plan(0), ["a", "b"], ["h0", "h1"], [np.ones((4, 5), np.float32), bad], [True, True])
        # the failed shard left neither a temp file nor an entry behind
        assert sorted(p.name for p in (tmp_path / what / "shards").iterdir()) == []


def test_streaming_writer_any_order_equals_list_writer(tmp_path):
    ids, hashes, depths, valid = frames(4)
    w1 = dc.CacheWriter(tmp_path / "a", spec=SPEC, n_frames=4, shard_size=4)
    w1.write_shard(w1.plan(0), ids, hashes, depths, valid)
    w2 = dc.CacheWriter(tmp_path / "b", spec=SPEC, n_frames=4, shard_size=4)
    with w2.open_shard(w2.plan(0)) as sw:  # no max_shape: buffered, frames arrive out of order (batched by size)
        for i in (2, 0, 3, 1):
            sw.add(i, frame_id=ids[i], frame_hash=hashes[i], depth=depths[i], valid=valid[i])
    assert dc.finalize(tmp_path / "a")["shards"] == dc.finalize(tmp_path / "b")["shards"]  # same bytes (sha256)
    with pytest.raises(ValueError, match="never added"):
        w2.open_shard(w2.plan(0)).commit()


def test_resume_skips_finished_shards_and_cleans_temps(tmp_path):
    c = tmp_path / "c"
    ids, hashes, depths, valid = frames(12)
    w = dc.CacheWriter(c, spec=SPEC, n_frames=12, shard_size=4)
    for p in w.shards_todo()[:2]:
        w.write_shard(p, ids[p.start:p.stop], hashes[p.start:p.stop], depths[p.start:p.stop], valid[p.start:p.stop])
    assert dc.progress(c) == (8, 12)
    shards = c / "shards"
    # leftovers of a killed run: a half-written shard and a half-written entry
    (shards / "shard-00002.h5.tmp-999-deadbeef").write_bytes(b"\x89HDF partial")
    (shards / "shard-00001.json.tmp-999-deadbeef").write_text("{")
    stat0 = (shards / "shard-00000.h5").stat()
    w2 = dc.CacheWriter(c, spec=SPEC, n_frames=12, shard_size=4)
    assert [p.index for p in w2.shards_todo()] == [2]
    assert not [p for p in shards.iterdir() if ".tmp-" in p.name]
    # killed between os.replace and the entry: the file is there but does not count, and is rewritten
    (shards / "shard-00001.json").unlink()
    assert [p.index for p in w2.shards_todo()] == [1, 2] and dc.progress(c) == (4, 12)
    # a truncated/replaced file behind an entry is not trusted either
    with open(shards / "shard-00000.h5", "ab") as fh:
        fh.write(b"x")
    assert [p.index for p in w2.shards_todo()] == [0, 1, 2]
    with open(shards / "shard-00000.h5", "rb+") as fh:
        fh.truncate(stat0.st_size)
    assert [p.index for p in w2.shards_todo()] == [1, 2]
    assert (shards / "shard-00000.h5").stat().st_ino == stat0.st_ino  # finished shard untouched
    # same size, different bytes: only a rehash notices
    data = bytearray((shards / "shard-00000.h5").read_bytes())
    data[-1] ^= 1
    (shards / "shard-00000.h5").write_bytes(bytes(data))
    assert w2.is_done(w2.plan(0)) and not w2.is_done(w2.plan(0), rehash=True)
    todo = w2.shards_todo(rehash=True)
    assert [p.index for p in todo] == [0, 1, 2]
    for p in todo:
        w2.write_shard(p, ids[p.start:p.stop], hashes[p.start:p.stop], depths[p.start:p.stop], valid[p.start:p.stop])
    (c / "index.json.tmp-999-deadbeef").write_text("{")  # a finalize killed mid-write
    dc.finalize(c)
    assert sorted(p.name for p in c.iterdir()) == ["index.json", "layout.json", "shards"]
    build(tmp_path / "ref", n=12, shard_size=4)
    assert shard_digests(c) == shard_digests(tmp_path / "ref")


def test_resume_with_other_settings_is_refused(tmp_path):
    build(tmp_path / "c", n=6, shard_size=4, do_finalize=False)
    with pytest.raises(CacheError, match=r"shard_size: cache 4, expected 2"):
        dc.CacheWriter(tmp_path / "c", spec=SPEC, n_frames=6, shard_size=2)
    with pytest.raises(CacheError, match=r"net_size: cache 256, expected 384"):
        dc.CacheWriter(tmp_path / "c", spec={**SPEC, "net_size": 384}, n_frames=6, shard_size=4)


def test_two_ranks_write_disjoint_shards_and_merge_to_single_writer_result(tmp_path):
    c = tmp_path / "c"
    w0, _ = build(c, n=14, shard_size=3, rank=0, world=2, do_finalize=False)
    rank0 = {p.name for p in (c / "shards").glob("*.h5")}
    assert rank0 == {"shard-00000.h5", "shard-00002.h5", "shard-00004.h5"}
    with pytest.raises(CacheError, match=r"2 of 5 shards missing \(shard-00001, shard-00003\)"):
        dc.finalize(c)
    assert dc.progress(c) == (3 + 3 + 2, 14)
    build(c, n=14, shard_size=3, rank=1, world=2, do_finalize=False)
    assert not (c / "index.json").exists()
    merged = dc.finalize(c)
    assert dc.progress(c) == (14, 14) and merged["n_frames"] == 14
    build(tmp_path / "single", n=14, shard_size=3)
    assert merged == dc.read_index(tmp_path / "single")
    assert shard_digests(c) == shard_digests(tmp_path / "single")  # bytewise-identical shard files
    assert w0.shards_todo(0, 2) == [] and w0.shards_todo(1, 2) == []


def _chunk_offset(shard: Path, row: int) -> tuple[int, int]:
    with h5py.File(shard, "r") as f:
        info = f["depth"].id.get_chunk_info(row)
        return info.byte_offset, info.size


def test_verify_catches_a_flipped_byte_in_a_chunk(tmp_path):
    c = tmp_path / "c"
    _, (ids, hashes, _, _) = build(c, n=8, shard_size=4)
    assert dc.verify(c, hashes).ok
    shard = c / "shards" / "shard-00001.h5"
    offset, size = _chunk_offset(shard, 2)  # frame 6
    with open(shard, "rb+") as fh:
        fh.seek(offset + size // 2)
        b = fh.read(1)
        fh.seek(offset + size // 2)
        fh.write(bytes([b[0] ^ 0x10]))
    report = dc.verify(c, hashes)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "shards/shard-00001.h5: sha256:" in text and "frame 6 (" + repr(ids[6]) + ")" in text
    assert not any("frame 5 " in p or "frame 7 " in p for p in report.problems)  # only the damaged frame
    with pytest.raises(CacheError, match="failed verification"):
        report.raise_if_failed()
    with pytest.raises(CacheError, match=r"shard-00001\.h5: frame 6 cannot be read"):
        dc.DepthCacheReader(c).read(6)


def test_verify_catches_a_truncated_file_and_foreign_frames(tmp_path):
    c = tmp_path / "c"
    _, (ids, hashes, _, _) = build(c, n=8, shard_size=4)
    other = list(hashes)
    other[2] = "xxh3:" + "f" * 32
    report = dc.verify(c, other)
    assert len(report.problems) == 1 and "frame 2" in report.problems[0] and "manifest" in report.problems[0]
    shard = c / "shards" / "shard-00000.h5"
    with open(shard, "rb+") as fh:
        fh.truncate(shard.stat().st_size // 2)
    text = "\n".join(dc.verify(c, hashes).problems)
    assert "shards/shard-00000.h5" in text and "truncated" in text
    with pytest.raises(CacheError, match="shard-00000.h5"):
        dc.DepthCacheReader(c).read(1)
    assert "no index.json" in dc.verify(tmp_path / "nothing").problems[0]


def test_check_spec_names_the_differing_fields(tmp_path):
    build(tmp_path / "c", n=3, shard_size=4)
    dc.check_spec(tmp_path / "c", SPEC)  # same spec: no error
    want = {**SPEC, "weights_sha256": "sha256:" + "9f" * 32, "precision": "fp16"}
    del want["extra"]
    with pytest.raises(CacheError) as err:
        dc.check_spec(tmp_path / "c", want)
    msg = str(err.value)
    assert f"weights_sha256: cache '{SPEC['weights_sha256']}', expected '{want['weights_sha256']}'" in msg
    assert "precision: cache 'fp32', expected 'fp16'" in msg and "extra: cache None, expected '<absent>'" in msg
    assert "net_size" not in msg and str(tmp_path / "c") in msg


def test_unfinished_cache_is_refused_by_reader(tmp_path):
    build(tmp_path / "c", n=6, shard_size=4, rank=0, world=2, do_finalize=False)
    with pytest.raises(CacheError, match=r"not finished .*4/6 frames written.*every rank"):
        dc.DepthCacheReader(tmp_path / "c")


def test_export_import_round_trip(tmp_path):
    c = tmp_path / "c"
    _, (ids, hashes, depths, valid) = build(c, n=9, shard_size=4)
    out = tmp_path / "share" / "cache.h5"
    out.parent.mkdir()
    digest = dc.export_cache(c, out)
    assert digest == sha256_file(out)
    assert (tmp_path / "share" / "cache.h5.sha256").read_text().split() == [digest[7:], "cache.h5"]
    with h5py.File(out, "r") as f:  # one self-describing file
        assert f.attrs["spec.model_type"] == SPEC["model_type"] and len(f["shards"]) == 3
    dest = tmp_path / "colleague" / "depth" / "abc"
    spec = dc.import_cache(out, dest, expected_spec=SPEC, expected_frame_hashes=hashes)
    assert spec == json.loads(json.dumps(SPEC))
    a, b = dc.DepthCacheReader(c), dc.DepthCacheReader(dest)
    for i in range(9):
        assert b.frame_id(i) == ids[i] and b.is_valid(i) == valid[i]
        if valid[i]:
            np.testing.assert_array_equal(a.read(i), b.read(i))
    assert dc.verify(dest, hashes).ok
    with pytest.raises(CacheError, match="already holds a depth cache"):
        dc.import_cache(out, dest)
    with pytest.raises(CacheError, match="net_size: cache 256, expected 512"):
        dc.import_cache(out, tmp_path / "x", expected_spec={**SPEC, "net_size": 512})
    assert not (tmp_path / "x" / "layout.json").exists()
    # frames of another manifest: refused and nothing left behind
    other = list(hashes)
    other[0] = "xxh3:" + "e" * 32
    with pytest.raises(CacheError, match="frame 0"):
        dc.import_cache(out, tmp_path / "y", expected_frame_hashes=other)
    assert not (tmp_path / "y" / "layout.json").exists() and not (tmp_path / "y" / "shards").exists()
    # a damaged download
    with open(out, "rb+") as fh:
        fh.seek(out.stat().st_size // 2)
        fh.write(b"\x00\xff\x00")
    with pytest.raises(CacheError, match="does not match .*sha256"):
        dc.import_cache(out, tmp_path / "z")


def test_export_refuses_a_corrupt_cache(tmp_path):
    c = tmp_path / "c"
    build(c, n=4, shard_size=4)
    offset, size = _chunk_offset(c / "shards" / "shard-00000.h5", 0)
    with open(c / "shards" / "shard-00000.h5", "rb+") as fh:
        fh.seek(offset + 3)
        fh.write(b"\x00\x00\x00\x00")
    with pytest.raises(CacheError, match="failed verification"):
        dc.export_cache(c, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


def test_reader_pickles_without_handles_and_works_in_dataloader_workers(tmp_path):
    torch = pytest.importorskip("torch")
    _, (_, _, depths, valid) = build(tmp_path / "c", n=10, shard_size=3)
    reader = dc.DepthCacheReader(tmp_path / "c", max_open_files=2)
    reader.read(0)  # the parent holds an open handle before the workers fork
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._files == {} and len(clone) == 10

    class DepthSet(torch.utils.data.Dataset):
        def __init__(self, r):
            self.r, self.idx = r, [i for i in range(len(r)) if valid[i]]

        def __len__(self):
            return len(self.idx)

        def __getitem__(self, k):
            i = self.idx[k]
            return i, torch.from_numpy(self.r.read(i)), os.getpid()

    loader = torch.utils.data.DataLoader(DepthSet(reader), batch_size=None, num_workers=2)
    seen, pids = {}, set()
    for i, d, pid in loader:
        seen[int(i)] = d.numpy()
        pids.add(int(pid))
    assert sorted(seen) == [i for i in range(10) if valid[i]] and os.getpid() not in pids and len(pids) == 2
    for i, d in seen.items():
        np.testing.assert_array_equal(d, reader.read(i))
        assert d.shape == depths[i].shape


def test_disk_full_while_writing_keeps_finished_shards(tmp_path, monkeypatch):
    c = tmp_path / "c"
    ids, hashes, depths, valid = frames(8)
    w = dc.CacheWriter(c, spec=SPEC, n_frames=8, shard_size=4)
    w.write_shard(w.plan(0), ids[:4], hashes[:4], depths[:4], valid[:4])
    before = (c / "shards" / "shard-00000.h5").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the first fsync of shard 1's temp file hits a full disk
    with pytest.raises(StorageError, match=r"shard-00001.h5 .*failed .*No space left.*finished shards are kept"):
        w.write_shard(w.plan(1), ids[4:], hashes[4:], depths[4:], valid[4:])
    monkeypatch.undo()
    assert sorted(p.name for p in (c / "shards").iterdir()) == ["shard-00000.h5", "shard-00000.json"]
    assert (c / "shards" / "shard-00000.h5").read_bytes() == before and w.is_done(w.plan(0))
    assert [p.index for p in w.shards_todo()] == [1]
