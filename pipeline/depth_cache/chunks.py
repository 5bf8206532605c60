"""A depth-cache chunk encoded outside HDF5, byte for byte what HDF5's filter pipeline writes (shuffle, deflate,
fletcher32), so the cache can compress frames on several threads and hand HDF5 finished chunks
(``write_direct_chunk``): HDF5 runs its filters under h5py's global lock, one frame at a time, which made the
writer thread the depth stage's ceiling at large frames (docs/benchmarks.md, issue 22).

The three filters, in h5py's order for ``shuffle=True, compression="gzip", fletcher32=True``:

1. shuffle: byte ``b`` of every element, for b = 0 .. itemsize-1, one after the other;
2. deflate: zlib's ``compress2`` at the dataset's level (a zlib stream, as ``zlib.compress``);
3. fletcher32: HDF5's ``H5_checksum_fletcher32`` of the compressed bytes, appended little-endian.

``tests/test_depth_cache.py`` checks the bytes against HDF5's own on several shapes and dtypes; the reader checks
every chunk's fletcher32 as before (a mismatch is an error on read, never silently wrong depth).
"""
from __future__ import annotations

import zlib

import numpy as np

_M32 = (1 << 32) - 1
_BLOCK = 360  # words per reduction in HDF5's fletcher32 (so the 32-bit sums never wrap... almost: see below)


def _fold(x: int) -> int:
    return (x & 0xFFFF) + (x >> 16)


def _rep(total: int) -> int:
    """The value in [0, 0xFFFF] that HDF5's folding leaves for a positive sum ``total`` (its residue mod 65535,
    with 0xFFFF for a multiple of 65535), and 0 for 0."""
    return 0 if total == 0 else (total - 1) % 65535 + 1


def fletcher32(buf: bytes) -> int:
    """HDF5's ``H5_checksum_fletcher32`` of ``buf``: 16-bit big-endian words, sums folded every 360 words, an odd
    last byte as the high byte of one more word.

    Folding keeps each sum's residue mod 65535 (65536 = 1 mod 65535) and a positive sum positive, so when the
    32-bit second sum never wraps the result follows from per-block totals (exact in float64: a block's sums stay
    below 2^53). Whether it can wrap is checked per block with the block's real sums; where it could, the blocks
    run one by one as HDF5's loop does."""
    n = len(buf)
    n_full = n // 2  # words in the blocks; an odd last byte comes after them
    odd = buf[-1] << 8 if n % 2 else 0
    if n_full == 0:
        return 0 if odd == 0 else (_fold(odd) << 16) | _fold(odd)
    nb = -(-n_full // _BLOCK)
    blk = np.zeros(nb * _BLOCK, np.float64)
    blk[:n_full] = np.frombuffer(buf, dtype=">u2", count=n_full)
    blk = blk.reshape(nb, _BLOCK)  # (blocks, 360) words, the last block zero-padded
    sw = blk.sum(1)  # (blocks,) Σ words
    # (blocks,) Σ j·w_j, j the position in the block (einsum, not a BLAS matvec: no thread pool of its own)
    sj = np.einsum("ij,j->i", blk, np.arange(_BLOCK, dtype=np.float64))
    t = np.full(nb, _BLOCK, np.float64)
    t[-1] = n_full - (nb - 1) * _BLOCK
    sp = t * sw - sj  # Σ of the block's running sums: word j is in (t - j) of them
    # entering a block both sums are folded to <= 0x1FFFE: the second sum cannot wrap in the block if this holds
    if not np.all(0x1FFFE * (1 + t) + sp <= _M32):
        return _fletcher32_blocks(sw.astype(np.int64), sp.astype(np.int64), t.astype(np.int64), n % 2, odd)
    s1_total = int(sw.sum()) + odd
    if s1_total == 0:  # every word zero: both sums stay 0
        return 0
    # the second sum is Σ_i w_i (nw - i) over all nw words (each is in that many running sums), odd word last:
    # per block, Σ_j w_j (nw - 360 k - j) = (nw - 360 k) Σ w_j - Σ j w_j; only residues mod 65535 are needed
    nw = n_full + (n % 2)
    swi, sji = sw.astype(np.int64), sj.astype(np.int64)
    coef = (nw - _BLOCK * np.arange(nb, dtype=np.int64)) % 65535
    r2 = (int((coef * (swi % 65535) % 65535).sum()) - int((sji % 65535).sum()) + odd) % 65535
    return ((r2 or 0xFFFF) << 16) | _rep(s1_total)


def _fletcher32_blocks(sw, sp, t, has_odd: int, odd: int) -> int:
    """The same checksum block by block (HDF5's loop, the 32-bit wrap of the second sum included)."""
    s1 = s2 = 0
    for k in range(len(sw)):
        s2 = (s2 + int(t[k]) * s1 + int(sp[k])) & _M32
        s1 = _fold(s1 + int(sw[k]))
        s2 = _fold(s2)
    if has_odd:  # even a zero byte adds the first sum to the second once more
        s1 += odd
        s2 = (s2 + s1) & _M32
        s1, s2 = _fold(s1), _fold(s2)
    return (_fold(s2) << 16) | _fold(s1)


def encode_chunk(chunk: np.ndarray, level: int) -> bytes:
    """``chunk`` (the whole chunk, C order, the dataset's dtype) as HDF5 stores it with shuffle + deflate(level) +
    fletcher32: the bytes ``write_direct_chunk`` takes with filter mask 0."""
    a = np.ascontiguousarray(chunk)
    shuffled = a.view(np.uint8).reshape(-1, a.dtype.itemsize).T.tobytes()
    packed = zlib.compress(shuffled, level)
    return packed + fletcher32(packed).to_bytes(4, "little")
