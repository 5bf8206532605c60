"""Frame fingerprints: xxh3-128 of the bytes, memoised by (path, inode, size, mtime_ns), never trusted blindly."""
import hashlib
import json
import logging
import os

import cv2
import numpy as np
import pytest
import xxhash

from pipeline.data.images import probe_depth, probe_image
from pipeline.store import fingerprint as F
from pipeline.store import memo as memo_module

OLD = 1_600_000_000  # a past mtime (s): outside the racy window, so entries are memoised


def _files(tmp_path, n=4, old=True):
    rels = []
    for i in range(n):
        p = tmp_path / "d" / f"f{i}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(bytes([i]) * (100 + i))
        if old:
            os.utime(p, (OLD + i, OLD + i))
        rels.append(f"d/f{i}.bin")
    return rels


@pytest.fixture
def spy(fingerprint_reads):
    """Records every path whose content is read."""
    return fingerprint_reads


def test_hash_file_is_prefixed_xxh3_128_of_the_bytes(tmp_path):
    p = tmp_path / "a.bin"
    data = os.urandom(3 * F.CHUNK + 17)  # several read chunks
    p.write_bytes(data)
    assert F.hash_file(p) == "xxh3:" + xxhash.xxh3_128(data).hexdigest()
    assert len(F.hash_file(p)) == 5 + 32
    q = tmp_path / "b.bin"
    q.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert F.hash_file(q) != F.hash_file(p)


def test_combine_is_order_sensitive_and_unambiguous():
    a, b = "xxh3:" + "a" * 32, "xxh3:" + "b" * 32
    assert F.combine([a, b]) != F.combine([b, a])
    assert F.combine([a, b]) == F.combine([a, b])
    assert F.combine(["ab"]) != F.combine(["a", "b"])
    assert F.combine([]) != F.combine([a])
    assert F.combine([a]).startswith("xxh3:") and len(F.combine([a])) == 37


def test_memo_rebuild_reads_nothing_and_touch_rehashes_only_that_file(tmp_path, spy):
    rels = _files(tmp_path)
    memo_path = tmp_path / "cache" / "m.npz"
    first = F.fingerprint_files(tmp_path, rels, F.FingerprintMemo(memo_path), progress=False)
    assert len(spy) == 4 and len(set(first)) == 4
    assert first == [F.hash_file(tmp_path / r) for r in rels]
    spy.clear()

    # a new process: the memo comes from disk
    again = F.fingerprint_files(tmp_path, rels, F.FingerprintMemo(memo_path), progress=False)
    assert again == first and spy == []

    # touching one file (new mtime, same bytes) re-reads exactly that file; the hash is unchanged
    os.utime(tmp_path / rels[2], (OLD + 99, OLD + 99))
    again = F.fingerprint_files(tmp_path, rels, F.FingerprintMemo(memo_path), progress=False)
    assert spy == ["f2.bin"] and again == first
    spy.clear()

    # changing content (same size) with a different mtime: re-read and a new fingerprint
    (tmp_path / rels[1]).write_bytes(b"\xff" * 101)
    os.utime(tmp_path / rels[1], (OLD + 7, OLD + 7))
    again = F.fingerprint_files(tmp_path, rels, F.FingerprintMemo(memo_path), progress=False)
    assert spy == ["f1.bin"] and again[1] != first[1] and again[0] == first[0]


def test_recent_files_are_hashed_but_not_memoised(tmp_path, spy):
    rels = _files(tmp_path, n=2, old=False)  # mtime = now: inside the racy window
    memo_path = tmp_path / "m.npz"
    F.fingerprint_files(tmp_path, rels, F.FingerprintMemo(memo_path), progress=False)
    F.fingerprint_files(tmp_path, rels, F.FingerprintMemo(memo_path), progress=False)
    assert len(spy) == 4


def _memo_header(path):
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["header"]))


def test_corrupt_memo_is_a_logged_miss_and_gets_rewritten(tmp_path, spy, caplog):
    rels = _files(tmp_path, n=3)
    memo_path = tmp_path / "m.npz"
    memo_path.write_text('{"schema": "dkp.fingerprint-memo/1", "entries": {tru')
    with caplog.at_level(logging.WARNING, logger="pipeline.store.fingerprint"):
        fps = F.fingerprint_files(tmp_path, rels, F.FingerprintMemo(memo_path), progress=False)
    assert "corrupt" in caplog.text and len(spy) == 3
    assert _memo_header(memo_path)["schema"] == memo_module.MEMO_SCHEMA  # replaced by a valid memo
    spy.clear()
    assert F.fingerprint_files(tmp_path, rels, F.FingerprintMemo(memo_path), progress=False) == fps
    assert spy == []
    # a truncated file, then a memo whose segment columns disagree in length: each just a miss
    raw = memo_path.read_bytes()
    memo_path.write_bytes(raw[: len(raw) // 2])
    assert F.fingerprint_files(tmp_path, rels, F.FingerprintMemo(memo_path), progress=False) == fps
    assert len(spy) == 3
    with np.load(memo_path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["s0.size"] = arrays["s0.size"][:1]
    np.savez(memo_path, **arrays)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.store.fingerprint"):
        assert F.fingerprint_files(tmp_path, rels, F.FingerprintMemo(memo_path), progress=False) == fps
    assert len(spy) == 6 and "corrupt" in caplog.text


def test_memo_of_the_json_format_is_read_then_rewritten_columnar(tmp_path, spy):
    """A memo written before the columnar format (one JSON object per file) still vouches for its files."""
    rels = _files(tmp_path, n=3)
    fps = F.fingerprint_files(tmp_path, rels, None, progress=False)
    spy.clear()
    entries = {}
    for r, fp in zip(rels, fps):
        p = os.path.join(os.path.abspath(tmp_path), r)
        st = os.stat(p)
        entries[p] = [[st.st_ino, st.st_size, st.st_mtime_ns], {"xxh3": fp}]
    legacy = tmp_path / "cache" / "fingerprints" / "x.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"schema": memo_module.LEGACY_SCHEMA, "entries": entries}))
    memo = F.FingerprintMemo(legacy.with_suffix(".npz"))  # what for_root names now; the .json beside it is read
    assert F.fingerprint_files(tmp_path, rels, memo, progress=False) == fps and spy == []
    assert not legacy.exists() and _memo_header(legacy.with_suffix(".npz"))["entries"] == {}
    assert F.fingerprint_files(tmp_path, rels, F.FingerprintMemo(legacy.with_suffix(".npz")), progress=False) == fps
    assert spy == []


def test_memo_follows_added_removed_and_reordered_files(tmp_path, spy):
    rels = _files(tmp_path, n=4)
    memo_path = tmp_path / "m.npz"
    fps = F.fingerprint_files(tmp_path, rels, F.FingerprintMemo(memo_path), progress=False)
    spy.clear()
    new = tmp_path / "d" / "f9.bin"
    new.write_bytes(b"new")
    os.utime(new, (OLD, OLD))
    order = [rels[3], "d/f9.bin", rels[0], rels[2]]  # one removed, one added, the rest reordered
    got = F.fingerprint_files(tmp_path, order, F.FingerprintMemo(memo_path), progress=False)
    assert spy == ["f9.bin"] and got == [fps[3], F.hash_file(new), fps[0], fps[2]]
    spy.clear()
    assert F.fingerprint_files(tmp_path, order, F.FingerprintMemo(memo_path), progress=False) == got and spy == []


def test_unwritable_memo_location_does_not_fail_the_scan(tmp_path, caplog):
    rels = _files(tmp_path, n=2)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="pipeline.store.fingerprint"):
        fps = F.fingerprint_files(tmp_path, rels, F.FingerprintMemo(blocker / "m.npz"), progress=False)
    assert fps == [F.hash_file(tmp_path / r) for r in rels]
    assert "could not write" in caplog.text


def test_memo_for_root_honours_dkp_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DKP_CACHE_DIR", str(tmp_path / "c"))
    m = F.FingerprintMemo.for_root(tmp_path / "data")
    assert m.path.parent == tmp_path / "c" / "fingerprints" and m.path.suffix == ".npz"
    assert F.FingerprintMemo.for_root(tmp_path / "other").path != m.path


def test_progress_bar_runs(tmp_path):
    rels = _files(tmp_path, n=3)
    assert len(F.fingerprint_files(tmp_path, rels, None, progress=True)) == 3


def test_probes_read_sizes_from_headers_of_non_square_images(tmp_path):
    img = np.zeros((24, 40, 3), np.uint8)  # H=24, W=40
    for ext in (".png", ".jpg"):
        p = tmp_path / f"i{ext}"
        assert cv2.imwrite(str(p), img)
        info = F.scan_files(tmp_path, [p.name], None, probe=probe_image, probe_keys=("wh",), progress=False)
        assert info[0].extra["wh"] == [40, 24]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        F.scan_files(tmp_path, ["bad.png"], None, probe=probe_image, probe_keys=("wh",), progress=False)


def test_depth_probe_accepts_float_npy_and_16bit_png_only(tmp_path):
    np.save(tmp_path / "d.npy", np.ones((24, 40), np.float32))
    assert cv2.imwrite(str(tmp_path / "d16.png"), np.ones((24, 40), np.uint16))
    assert cv2.imwrite(str(tmp_path / "d8.png"), np.ones((24, 40), np.uint8))
    np.save(tmp_path / "i.npy", np.ones((24, 40), np.int32))
    out = F.scan_files(tmp_path, ["d.npy", "d16.png"], None, probe=probe_depth,
                       probe_keys=("wh", "depth_format"), progress=False)
    assert [o.extra["wh"] for o in out] == [[40, 24], [40, 24]]
    assert out[0].extra["depth_format"] == "npy:<f4" and out[1].extra["depth_format"] == "png16"
    for bad in ("d8.png", "i.npy"):
        with pytest.raises(ValueError, match=bad):
            F.scan_files(tmp_path, [bad], None, probe=probe_depth, progress=False)


def test_probe_results_are_memoised_with_the_hash(tmp_path, spy):
    assert cv2.imwrite(str(tmp_path / "a.png"), np.zeros((5, 7, 3), np.uint8))
    os.utime(tmp_path / "a.png", (OLD, OLD))
    memo = F.FingerprintMemo(tmp_path / "m.npz")
    F.scan_files(tmp_path, ["a.png"], memo, progress=False)  # hash only: no "wh" recorded
    out = F.scan_files(tmp_path, ["a.png"], F.FingerprintMemo(tmp_path / "m.npz"), probe=probe_image,
                       probe_keys=("wh",), progress=False)
    assert out[0].extra["wh"] == [7, 5] and len(spy) == 2  # the missing probe result forced a read
    out = F.scan_files(tmp_path, ["a.png"], F.FingerprintMemo(tmp_path / "m.npz"), probe=probe_image,
                       probe_keys=("wh",), progress=False)
    assert out[0].extra["wh"] == [7, 5] and len(spy) == 2


def test_sha256_file_memo(tmp_path, spy):
    p = tmp_path / "w.pt"
    p.write_bytes(b"weights" * 1000)
    os.utime(p, (OLD, OLD))
    memo = F.FingerprintMemo(tmp_path / "files.npz")
    want = "sha256:" + hashlib.sha256(b"weights" * 1000).hexdigest()
    assert F.sha256_file_memo(p, memo) == want
    assert F.sha256_file_memo(p, F.FingerprintMemo(tmp_path / "files.npz")) == want
    assert len(spy) == 1
    assert F.sha256_file_memo(p) == want  # default memo under DKP_CACHE_DIR
