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
