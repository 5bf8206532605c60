"""The horizontal flips of a whole epoch at once, equal to the per-sample draws of :func:`sample_generator`.

A sample's flip is ``torch.rand((), generator=sample_generator(seed, epoch, index)) < 0.5``: a numpy
``SeedSequence`` hash of (tag, seed, epoch, index), a torch Mersenne twister seeded with it, its first float.
That costs ~35 us a sample (more than the sample itself once frames come from the frame cache), nearly all of
it object set-up. The same arithmetic runs here on arrays, for every index of an epoch: numpy's
``SeedSequence`` (its hash constants do not depend on the data, so it vectorises), then the first output of
torch's ``mt19937`` for that seed (its low 32 bits: the state words 0, 1 and 397 of the seeding recurrence,
one twist, the tempering), whose bit 23 decides ``rand < 0.5`` (torch's float is ``(r & 0xFFFFFF) / 2**24``).

Bit-exactness is checked, not assumed: :func:`fast_flips_ok` compares both ways on a set of samples once per
process and :func:`epoch_flips` falls back to the per-sample draw if they ever differ (a torch or numpy change
of algorithm); tests/test_framecache.py compares them on thousands of samples.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

# numpy.random.SeedSequence (bit_generator.pyx)
_POOL = 4
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_M32 = 0xFFFFFFFF
# torch's at::mt19937 (ATen/core/MT19937RNGEngine.h)
_MT_M = 397
_MATRIX_A, _UPPER, _LOWER = 0x9908B0DF, 0x80000000, 0x7FFFFFFF
CHUNK = 1 << 16  # indices per vectorised pass (bounded memory for a million-frame epoch)


def _words(n: int) -> list[int]:
    """numpy's ``_int_to_uint32_array``: little-endian 32-bit words of a non-negative int ([0] for 0)."""
    if n < 0:
        raise ValueError("expected non-negative integer")
    out = [] if n else [0]
    while n > 0:
        out.append(n & _M32)
        n >>= 32
    return out


def _seed_sequence_u64(entropy: list[np.ndarray]) -> np.ndarray:
    """``SeedSequence(entropy).generate_state(1, np.uint64)`` for arrays of entropy words (each (N,) uint32,
    the same word count for every sample): (N,) uint64."""
    u32 = np.uint32
    hc = [_INIT_A]

    def hashmix(v: np.ndarray) -> np.ndarray:
        v = v ^ u32(hc[0])
        hc[0] = (hc[0] * _MULT_A) & _M32
        v = v * u32(hc[0])
        return v ^ (v >> u32(16))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = u32(_MIX_L) * x - u32(_MIX_R) * y
        return r ^ (r >> u32(16))

    n = len(entropy[0])
    zero = np.zeros(n, dtype=np.uint32)
    pool = [hashmix(entropy[i] if i < len(entropy) else zero) for i in range(_POOL)]
    for i_src in range(_POOL):
        for i_dst in range(_POOL):
            if i_src != i_dst:
                pool[i_dst] = mix(pool[i_dst], hashmix(pool[i_src]))
    for i_src in range(_POOL, len(entropy)):
        for i_dst in range(_POOL):
            pool[i_dst] = mix(pool[i_dst], hashmix(entropy[i_src]))
    hb = _INIT_B
    words = []
    for k in range(2):  # generate_state: 2 uint32 words, little-endian into one uint64
        v = pool[k] ^ u32(hb)
        hb = (hb * _MULT_B) & _M32
        v = v * u32(hb)
        words.append(v ^ (v >> u32(16)))
    return words[0].astype(np.uint64) | (words[1].astype(np.uint64) << np.uint64(32))


def _first_output(seed_lo: np.ndarray) -> np.ndarray:
    """The first 32-bit output of torch's mt19937 seeded with ``seed`` (only its low word counts): (N,) uint32."""
    u32 = np.uint32
    s = seed_lo.astype(np.uint32)
    s0 = s
    s1 = None
    for j in range(1, _MT_M + 1):  # state[j] = 1812433253 * (state[j-1] ^ (state[j-1] >> 30)) + j
        s = u32(1812433253) * (s ^ (s >> u32(30))) + u32(j)
        if j == 1:
            s1 = s
    y = (s0 & u32(_UPPER)) | (s1 & u32(_LOWER))
    x = s ^ (y >> u32(1)) ^ np.where((s1 & u32(1)) != 0, u32(_MATRIX_A), u32(0))  # state'[0], the first twist
    x = x ^ (x >> u32(11))
    x = x ^ ((x << u32(7)) & u32(0x9D2C5680))
    x = x ^ ((x << u32(15)) & u32(0xEFC60000))
    return x ^ (x >> u32(18))


def _fast(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    from pipeline.training.sampling import TAG_SAMPLE

    prefix = [w for p in (TAG_SAMPLE, seed, epoch) for w in _words(int(p))]
    out = np.empty(len(indices), dtype=bool)
    for lo in range(0, len(indices), CHUNK):
        idx = indices[lo:lo + CHUNK]
        n = len(idx)
        entropy = [np.full(n, w, dtype=np.uint32) for w in prefix] + [idx.astype(np.uint32)]
        seeds = _seed_sequence_u64(entropy)
        r = _first_output((seeds & np.uint64(_M32)).astype(np.uint32))
        out[lo:lo + n] = (r & np.uint32(1 << 23)) == 0  # (r & 0xFFFFFF) / 2**24 < 0.5
    return out


def _slow(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    import torch

    from pipeline.training.sampling import sample_generator

    return np.array([bool(torch.rand((), generator=sample_generator(seed, epoch, int(i))) < 0.5) for i in indices],
                    dtype=bool)


_CHECKED: Optional[bool] = None


def fast_flips_ok() -> bool:
    """Whether the vectorised flips equal the per-sample draws here (checked once per process on 256 samples
    with seeds and epochs of every size the arithmetic distinguishes)."""
    global _CHECKED
    if _CHECKED is None:
        rng = np.random.default_rng(12345)
        ok = True
        for seed, epoch in ((0, 0), (3, 7), (2**31 + 5, 1), (2**40 + 1, 2**33 + 3)):
            idx = rng.integers(0, 2**31, 64)
            ok &= bool(np.array_equal(_fast(seed, epoch, idx), _slow(seed, epoch, idx)))
        if not ok:
            log.warning("the vectorised flips differ from sample_generator's here (torch or numpy changed their "
                        "generators?); drawing them one sample at a time")
        _CHECKED = ok
    return _CHECKED


def epoch_flips(seed: int, epoch: int, n: int) -> np.ndarray:
    """(n,) bool: the flip of each sample index 0..n-1 in ``epoch`` of a run seeded ``seed`` (see module
    docstring), exactly ``torch.rand((), generator=sample_generator(seed, epoch, i)) < 0.5``."""
    idx = np.arange(n, dtype=np.int64)
    if n >= 2**32 or not fast_flips_ok():
        return _slow(seed, epoch, idx)
    return _fast(seed, epoch, idx)
