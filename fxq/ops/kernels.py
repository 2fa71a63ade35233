"""numpy helpers that several reference kernels share: exact integer GEMM and the requant rescale.

Integer GEMMs run in float32 BLAS when the verifier's accumulator bound proves every partial sum is
an integer below 2**24, in float64 below 2**53, and in int64 otherwise: each is exact, whatever
order BLAS sums in.
"""
from __future__ import annotations

import numpy as np

from ..formats import FP32_EXACT_BITS, FP64_EXACT_BITS, IntRange, Rounding, dyadic_requant_np, requant_np, round_np

BLAS_EXACT_LIMIT = 2 ** FP64_EXACT_BITS


def exact_dtype(bound: int):
    """The fastest dtype whose GEMM is exact for integer sums up to ``bound`` (the verifier's bound)."""
    if bound < 2 ** FP32_EXACT_BITS:
        return np.float32
    if bound < BLAS_EXACT_LIMIT:
        return np.float64
    return np.int64


def to_int(acc: np.ndarray) -> np.ndarray:
    return acc.astype(np.int64) if acc.dtype == np.int64 else round_np(acc).astype(np.int64)   # exact sums: no tie


def exact_matmul(a: np.ndarray, b: np.ndarray, bound: int) -> np.ndarray:
    """a @ b for integer arrays, in the fastest dtype that is provably exact for the bound."""
    dtype = exact_dtype(bound)
    return to_int(np.matmul(a.astype(dtype), b.astype(dtype)))


def out_range(n) -> IntRange:
    return IntRange(n.out.lo, n.out.hi)


def per_channel(v, x: np.ndarray):
    """A per-channel attribute (axis 1) broadcastable against ``x``; scalars stay scalars."""
    v = np.asarray(v, dtype=np.int64)
    return v.reshape((1, -1) + (1,) * (x.ndim - 2)) if v.ndim else v


def rescale(n, acc: np.ndarray) -> np.ndarray:
    """A shift (power-of-two targets) or a multiply then a shift (dyadic), round, add the zero point, clamp."""
    a, mode = n.attrs, Rounding(n.attrs.rounding)
    if a.multiplier is not None:
        return dyadic_requant_np(acc, per_channel(a.multiplier, acc), per_channel(a.shift, acc), n.out.zp,
                                 out_range(n), mode)
    return requant_np(acc, per_channel(a.shift, acc), out_range(n), mode)
