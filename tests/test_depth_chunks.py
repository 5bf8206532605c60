"""pipeline/depth_cache/chunks.py: a chunk encoded outside HDF5 is byte for byte HDF5's own (shuffle + deflate +
fletcher32), and HDF5 reads a chunk written that way back, checking its checksum."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.depth_cache.chunks import encode_chunk, fletcher32


def _hdf5_fletcher32(buf: bytes) -> int:
    """HDF5's C loop (H5checksum.c), transcribed: the reference the vectorised version must equal."""
    s1 = s2 = 0
    i, n, left = 0, len(buf), len(buf) // 2
    while left:
        t = min(left, 360)
        left -= t
        for _ in range(t):
            s1 += (buf[i] << 8) | buf[i + 1]
            i += 2
            s2 = (s2 + s1) & 0xFFFFFFFF
        s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    if n % 2:
        s1 += buf[i] << 8
        s2 = (s2 + s1) & 0xFFFFFFFF
        s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    return (s2 << 16) | s1


def _cases():
    rng = np.random.default_rng(0)
    fixed = [b"", b"\x00", b"\x01", b"\xff", b"\x00\x00", b"\x00" * 999, b"\xff" * 720, b"\xff" * 721,
             b"\xff" * 7200 + b"\x00",  # blocks whose 32-bit second sum wraps: HDF5's block loop
             b"\xfe\xff" * 5000 + b"\x00", b"\xff" * 20001]
    rand = [bytes(rng.integers(lo, 256, n, dtype=np.uint8)) for n in (1, 2, 3, 718, 720, 723, 5000, 100001)
            for lo in (0, 200)]
    return fixed + rand


def test_fletcher32_is_hdf5s():
    for buf in _cases():
        assert fletcher32(buf) == _hdf5_fletcher32(buf), (len(buf), buf[:4])


@pytest.mark.parametrize("shape, dtype", [((1, 64, 80), np.float16), ((1, 100, 37), np.float32),
                                          ((1, 3, 3), np.float16), ((1, 1, 1), np.float16), ((1, 300, 200), np.float16)])
def test_encoded_chunk_is_hdf5s_own_and_reads_back(tmp_path, shape, dtype):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:shape[1], 0:shape[2]]
    a = ((np.sin(xx / 7) + np.cos(yy / 5) + 3) * 100 + rng.standard_normal(shape[1:]))[None].astype(dtype)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        kw = dict(shape=shape, dtype=dtype, chunks=shape, compression="gzip", compression_opts=1, shuffle=True,
                  fletcher32=True)
        ref = f.create_dataset("ref", **kw)
        ref[...] = a
        mask, raw = ref.id.read_direct_chunk((0, 0, 0))
        assert mask == 0 and encode_chunk(a, 1) == raw  # byte for byte what HDF5's filters write
        d = f.create_dataset("direct", **kw)
        d.id.write_direct_chunk((0, 0, 0), encode_chunk(a, 1))
    with h5py.File(tmp_path / "c.h5", "r") as f:
        np.testing.assert_array_equal(f["direct"][...], a)  # HDF5 checks the fletcher32 as it reads


def test_a_flipped_byte_in_a_direct_chunk_is_an_error_on_read(tmp_path):
    a = np.arange(64 * 80, dtype=np.float16).reshape(1, 64, 80)
    raw = bytearray(encode_chunk(a, 1))
    raw[10] ^= 0xFF
    with h5py.File(tmp_path / "c.h5", "w") as f:
        d = f.create_dataset("d", shape=a.shape, dtype=a.dtype, chunks=a.shape, compression="gzip",
                             compression_opts=1, shuffle=True, fletcher32=True)
        d.id.write_direct_chunk((0, 0, 0), bytes(raw))
    with h5py.File(tmp_path / "c.h5", "r") as f, pytest.raises(OSError):
        f["d"][...]


def _write_shard(root, maps, threads: int, direct: bool):
    from pipeline.depth_cache import CacheWriter
    from pipeline.depth_cache import writer as W
    from pipeline.stages.depth.writer import BackgroundWriter

    old, W.DIRECT_CHUNKS = W.DIRECT_CHUNKS, direct
    try:
        cw = CacheWriter(root, spec={"t": 1}, n_frames=len(maps), shard_size=len(maps), storage_dtype="float16")
        (plan,) = cw.shards_todo()
        bw = BackgroundWriter(cw, threads=threads)
        bw.open(plan, (40, 50))
        for k in range(0, len(maps), 3):
            bw.add([(j, f"f{j}", "h", maps[j], maps[j] is not None) for j in range(k, min(len(maps), k + 3))])
        bw.commit()
        bw.close(abort=False)
        return bw
    finally:
        W.DIRECT_CHUNKS = old


def test_the_writer_pool_stores_what_hdf5s_filters_store(tmp_path):
    """Frames prepared and encoded on 1 or 3 pool threads: every chunk's bytes (and so every frame, scale and
    checksum) equal the shard written with HDF5 compressing on the writer thread; frames smaller than the shard's
    chunk and invalid frames included."""
    rng = np.random.default_rng(2)
    maps = [rng.random((40, 50)).astype(np.float32) * 9, None, rng.random((17, 23)).astype(np.float32),
            np.full((40, 50), 3.0, np.float32), rng.random((40, 31)).astype(np.float32) * 1e5]
    raw = {}
    for name, threads, direct in (("filters", 1, False), ("pool1", 1, True), ("pool3", 3, True)):
        bw = _write_shard(tmp_path / name, maps, threads, direct)
        assert bw.threads == threads and (bw.seconds_encoding > 0)
        with h5py.File(next((tmp_path / name / "shards").glob("*.h5")), "r") as f:
            d = f["depth"]
            raw[name] = [d.id.read_direct_chunk((k, 0, 0))[1] if f["valid"][k] else None for k in range(len(maps))]
            scales, checks = f["scale"][...], f["checksum"][...]
            for k, m in enumerate(maps):
                if m is not None:
                    h, w = m.shape
                    np.testing.assert_array_equal(d[k, :h, :w].astype(np.float32) * scales[k],
                                                  (m / scales[k]).astype(np.float16).astype(np.float32) * scales[k])
        raw[name] += [scales.tolist(), list(checks)]
    assert raw["pool1"] == raw["filters"] and raw["pool3"] == raw["filters"]


def test_a_frame_the_pool_refuses_stops_the_writer_with_its_message(tmp_path):
    from pipeline.errors import CacheError

    maps = [np.ones((40, 50), np.float32), np.full((40, 50), np.inf, np.float32)]
    with pytest.raises(CacheError, match=r"frame 1 \('f1'\) has 2000 Inf"):
        _write_shard(tmp_path / "c", maps, 2, True)
    assert not list((tmp_path / "c" / "shards").glob("*.h5"))  # the shard was aborted, nothing published


def test_bench_depth_writer_runs(tmp_path):
    from pipeline.bench.harness import bench_device
    from pipeline.bench.writer import bench_depth_writer

    rec = bench_depth_writer(batch=1, size=32, steps=1, device=bench_device("cpu"), threads=(1, 2))
    assert set(rec["cases"]) == {"hdf5_filters", "threads_1", "threads_2"}
    assert len({c["bytes"] for c in rec["cases"].values()}) == 1  # the same bytes whichever way
    assert all(c["frames_per_s"] > 0 and len(c["runs_frames_per_s"]) == 2 for c in rec["cases"].values())
    assert set(rec["ratios"]) == {"frames_per_s threads_1/hdf5_filters", "frames_per_s threads_2/hdf5_filters"}
