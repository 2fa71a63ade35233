"""Integer-only softmax, GELU and LayerNorm on power-of-two codes (after I-BERT, Kim et al. 2021).

Each algorithm is written once against a handful of exact integer operations (``IntOps``) with three
spellings: numpy int64 (the reference backend), torch int64 (the fake-quant model) and numpy float64
(what an ONNX export computes on exact integers), so the executors agree bit for bit by construction.
The operations are add, sub, mul, floor(x / 2**k) for a constant k, floor division by a positive
integer, comparisons/where/clip, and max and sum along the last axis. Every intermediate stays below
2**52 in magnitude for the supported inputs (codes in the int16 range, which holds int8 and uint8
codes; the bound is stated next to each step), so float64 computes all of them exactly.

The integers an executor needs come from ``softmax_constants``, ``gelu_constants`` and
``layer_norm_constants``, derived from the formats with exact arithmetic; an exporter bakes them in.
Output codes are rounded half to even, like ``formats.requant_np``, then clamped to the caller's range.

One module of ~500 lines on purpose: five kernels, each beside the constants and the bounds its
exactness rests on, sharing the limits and building blocks at the top.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from .formats import ACC_RANGE, FP64_EXACT_BITS, IntRange, int_range, quantize_np, round_div, round_shift  # noqa: F401
from .intops import FLOAT64, NUMPY, TORCH, Float64Ops, IntOps, NumpyOps, TorchOps, ops_for  # noqa: F401

CODE_RANGE = int_range(16, signed=True)   # supported input codes: int16, hence int8 and uint8 as well
EXACT_BITS = FP64_EXACT_BITS - 1          # intermediates stay below 2**52: exact in float64, with a bit spare

# --- softmax ---------------------------------------------------------------------------------------
LOG2E_FRAC = 32                 # log2(e) to 32 fraction bits: x*log2(e) is off by at most |x| * 2**-33
LOG2E_Q = 6196328019            # round(log2(e) * 2**32), computed once with 200-bit mpmath
EXP_POLY_FRAC = 24              # fraction bits of the base-2 exponent and of 2**r, r in [0, 1)
# 2**r on [0, 1) at EXP_POLY_FRAC bits (coefficients of r**0..r**5): minimax for relative error with
# 2**0 = 1 exact, so the row maximum's exp is exactly 1. Relative error after integer Horner <= 1.96e-7
# (every r checked).
EXP2_POLY = (16777216, 11629149, 4029283, 936240, 151146, 31396)
EXP_FRAC = 28                   # fraction bits of each exp before the sum: N floors cost <= N * 2**-28
EXP_SHIFT_BITS = 5              # exps shift right by at most 2**5 - 1 = 31 > EXP_FRAC places, i.e. to 0
SOFTMAX_MAX_LEN = 2 ** 16       # the sum of exps is then <= 2**16 * 2**28 = 2**44
SOFTMAX_FRAC_IN = (-8, 24)      # frac_in >= -8 keeps the shift onto EXP_POLY_FRAC a right shift
SOFTMAX_FRAC_OUT = (0, 22)      # exp * 2**frac_out <= 2**28 * 2**22 = 2**50

# --- GELU: gelu(x) = relu(x) - |x| * Phi(-|x|) ------------------------------------------------------
GELU_FRAC = 24                  # fraction bits of the residual and of the result before requantization
GELU_CUTOFF_LOG2 = 2            # the residual is dropped for |x| >= 4, where it is below 4 * Phi(-4) = 1.27e-4
# t * Phi(-t) on [0, 4] in w = t / 2 - 1 in [-1, 1] at GELU_FRAC bits (coefficients of w**0..w**8):
# minimax for absolute error with the value at t = 0 exactly 0. Error after integer Horner <= 1.227e-4
# (every w checked).
GELU_POLY = (762083, -2874681, 3678573, 203139, -5229268, 4089913, 579530, -1418335, 209118)
GELU_FRAC_IN = (-8, GELU_FRAC - GELU_CUTOFF_LOG2)   # |x| / 4 at GELU_FRAC bits is then a left shift
GELU_FRAC_OUT = (-8, GELU_FRAC)

# --- LayerNorm -------------------------------------------------------------------------------------
LN_MAX_LEN = 4096               # sum((q - mean)**2) <= 2**12 * 2**32 = 2**44; N * it is split below 2**52
LN_NORM_FRAC = 16               # fraction bits of (x - mean) / std
LN_NORM_MAX = 64                # |x - mean| / std <= sqrt(N - 1) < 64: the clip only acts when eps = 0
GAMMA_BITS = 16                 # gamma codes |g| <= 2**15 at the finest power-of-two step that fits max|gamma|
GAMMA_FRAC_MAX = 24             # ...but no finer than 2**-24, so tiny gammas leave room for beta
BETA_BITS = 50                  # |beta code| < 2**50 at the accumulator's step 2**-(LN_NORM_FRAC + gamma frac)
ISQRT_BITS = 52                 # isqrt is exact for 0 <= x < 2**52, in 26 digit-by-digit rounds
LN_FRAC = (-8, 24)              # frac_in and frac_out


# ---------------------------------------------------------------------------------------------
# exact building blocks
# ---------------------------------------------------------------------------------------------
def isqrt(xp: IntOps, x, bits: int = ISQRT_BITS):
    """floor(sqrt(x)) for integers 0 <= x < 2**bits (bits even), exactly.

    The digit-by-digit method: round i decides root bit i by one compare and subtract, so bits / 2 rounds
    always suffice and nothing reaches 2**bits. No division, hence nothing that float64 could round.
    """
    root, rem = x * 0, x
    for i in reversed(range(bits // 2)):
        trial = root + 4 ** i
        take = rem >= trial
        rem = xp.where(take, rem - trial, rem)
        half = xp.shift_right_floor(root, 1)
        root = xp.where(take, half + 4 ** i, half)
    return root


def _horner(xp: IntOps, coefs: tuple, x, frac: int):
    """sum_j coefs[j] * (x * 2**-frac)**j at ``frac`` fraction bits, flooring after each product."""
    acc = coefs[-1]
    for c in coefs[-2::-1]:
        acc = xp.shift_right_floor(x * acc, frac) + c
    return acc


def _shift_right_var(xp: IntOps, x, n, bits: int):
    """floor(x / 2**n) for integers 0 <= n < 2**bits, as one constant shift per bit of n."""
    for b in range(bits):
        bit = xp.shift_right_floor(n, b) - xp.shift_right_floor(n, b + 1) * 2
        x = xp.where(bit == 1, xp.shift_right_floor(x, 2 ** b), x)
    return x


# ---------------------------------------------------------------------------------------------
# checks shared by the three functions
# ---------------------------------------------------------------------------------------------
def _int_arg(fn: str, what: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{fn}: {what} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{fn}: {what}={v} is outside the supported range [{lo}, {hi}]")
    return int(v)


def _out_range(fn: str, out_lo, out_hi) -> tuple[int, int]:
    lo = _int_arg(fn, "out_lo", out_lo, ACC_RANGE.lo, ACC_RANGE.hi)
    hi = _int_arg(fn, "out_hi", out_hi, ACC_RANGE.lo, ACC_RANGE.hi)
    if lo > hi:
        raise ValueError(f"{fn}: empty output range out_lo={lo} > out_hi={hi}")
    return lo, hi


def _codes(fn: str, xp: IntOps | None, q, max_len: int):
    xp = xp or ops_for(q)
    q = xp.codes(q, fn)
    if q.ndim == 0:
        raise ValueError(f"{fn}: codes need at least one axis (the reduction runs over the last)")
    if q.shape[-1] == 0:
        raise ValueError(f"{fn}: the last axis is empty")
    if q.shape[-1] > max_len:
        raise ValueError(f"{fn}: the last axis has {q.shape[-1]} elements, at most {max_len} are supported")
    if q.numel() if isinstance(q, torch.Tensor) else q.size:
        lo, hi = xp.bounds(q)
        if lo < CODE_RANGE.lo or hi > CODE_RANGE.hi:
            raise ValueError(f"{fn}: codes span [{lo}, {hi}], outside the supported int16 range "
                             f"[{CODE_RANGE.lo}, {CODE_RANGE.hi}]")
    return xp, q


# ---------------------------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SoftmaxConstants:
    frac_out: int
    log2e: int            # LOG2E_Q
    log2e_shift: int      # (q - max) * log2e has frac_in + LOG2E_FRAC bits; this shift leaves EXP_POLY_FRAC
    exponent_min: int     # base-2 exponents below -(2**EXP_SHIFT_BITS - 1) give exps that floor to 0
    poly: tuple           # EXP2_POLY
    poly_frac: int        # EXP_POLY_FRAC
    exp_gain: int         # 2**(EXP_FRAC - EXP_POLY_FRAC): 2**r at EXP_FRAC bits
    shift_bits: int       # EXP_SHIFT_BITS


def softmax_constants(frac_in: int, frac_out: int) -> SoftmaxConstants:
    fn = "int_softmax"
    frac_in = _int_arg(fn, "frac_in", frac_in, *SOFTMAX_FRAC_IN)
    frac_out = _int_arg(fn, "frac_out", frac_out, *SOFTMAX_FRAC_OUT)
    return SoftmaxConstants(frac_out, LOG2E_Q, frac_in + LOG2E_FRAC - EXP_POLY_FRAC,
                            -(2 ** EXP_SHIFT_BITS - 1) * 2 ** EXP_POLY_FRAC, EXP2_POLY, EXP_POLY_FRAC,
                            2 ** (EXP_FRAC - EXP_POLY_FRAC), EXP_SHIFT_BITS)


def softmax_codes(xp: IntOps, q, c: SoftmaxConstants, out_lo: int, out_hi: int):
    """The algorithm, on validated codes; each line notes the bound that keeps it exact."""
    d = q - xp.amax(q)                                            # x - max at frac_in, in (-2**16, 0]
    v = xp.shift_right_floor(d * c.log2e, c.log2e_shift)          # (x - max) * log2(e); |d * log2e| < 2**48.6
    v = xp.clip(v, c.exponent_min, 0)                             # >= -31 * 2**24
    z = xp.shift_right_floor(v, c.poly_frac)                      # integer part, in [-31, 0]
    p = _horner(xp, c.poly, v - z * 2 ** c.poly_frac, c.poly_frac)  # 2**frac(v) in [2**24, 2**25); products < 2**50
    e = _shift_right_var(xp, p * c.exp_gain, -z, c.shift_bits)    # exp(x - max) at EXP_FRAC bits, <= 2**28
    total = xp.sum(e)                                             # in [2**28, 2**44]: the max contributes 2**28
    return xp.clip(round_div(xp, e * 2 ** c.frac_out, total), out_lo, out_hi)   # e * 2**frac_out <= 2**50


def int_softmax(q, frac_in: int, frac_out: int, out_lo: int, out_hi: int, xp: IntOps | None = None):
    """Softmax along the last axis: codes at ``frac_in`` in, probability codes at ``frac_out`` out.

    exp(x - max) = 2**z * 2**r with z = floor((x - max) * log2 e) and 2**r from EXP2_POLY; the
    probabilities are the exactly rounded quotients e_i * 2**frac_out / sum(e). Against float softmax
    on the dequantized input, the probability before the final rounding is within
    2 * 3e-7 + (N + 1) * 2**-28 (relative exp error 2.4e-7, then the floors of N exps), so the output code is within
    0.5 + 2**frac_out * that of the exact value (clamped to [out_lo, out_hi]).
    """
    fn = "int_softmax"
    c = softmax_constants(frac_in, frac_out)
    lo, hi = _out_range(fn, out_lo, out_hi)
    xp, q = _codes(fn, xp, q, SOFTMAX_MAX_LEN)
    return softmax_codes(xp, q, c, lo, hi)


# ---------------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeluConstants:
    in_shift: int         # GELU_FRAC - frac_in: x at GELU_FRAC bits is q * 2**in_shift
    cutoff_shift: int     # in_shift - GELU_CUTOFF_LOG2: |x| / 4 at GELU_FRAC bits
    one: int              # 2**GELU_FRAC
    poly: tuple           # GELU_POLY
    poly_frac: int        # GELU_FRAC
    out_shift: int        # GELU_FRAC - frac_out


def gelu_constants(frac_in: int, frac_out: int) -> GeluConstants:
    fn = "int_gelu"
    frac_in = _int_arg(fn, "frac_in", frac_in, *GELU_FRAC_IN)
    frac_out = _int_arg(fn, "frac_out", frac_out, *GELU_FRAC_OUT)
    return GeluConstants(GELU_FRAC - frac_in, GELU_FRAC - frac_in - GELU_CUTOFF_LOG2, 2 ** GELU_FRAC,
                         GELU_POLY, GELU_FRAC, GELU_FRAC - frac_out)


def gelu_codes(xp: IntOps, q, c: GeluConstants, out_lo: int, out_hi: int):
    s = xp.clip(xp.abs(q) * 2 ** c.cutoff_shift, 0, c.one)        # |x| / 4, saturated at 1; |q| * 2**30 < 2**46
    g = _horner(xp, c.poly, s * 2 - c.one, c.poly_frac)           # |x| * Phi(-|x|); |acc| < 2**25, products < 2**50
    g = xp.where(s < c.one, g, 0)                                 # dropped beyond |x| = 4
    y = xp.where(q > 0, q * 2 ** c.in_shift, 0) - g               # relu(x) - residual; |q| * 2**32 < 2**48
    return xp.clip(round_shift(xp, y, c.out_shift), out_lo, out_hi)


def int_gelu(q, frac_in: int, frac_out: int, out_lo: int, out_hi: int, xp: IntOps | None = None):
    """Exact-erf GELU, elementwise: codes at ``frac_in`` in, codes at ``frac_out`` out.

    gelu(x) = relu(x) - |x| * Phi(-|x|); the residual is a degree-8 polynomial in |x| on [0, 4) and 0
    beyond. I-BERT's i-GELU (a second-order erf) is off by up to 1.8e-2, half a step at frac_out 5;
    this is off by at most 1.28e-4 (1.227e-4 polynomial with its floors, 1.267e-4 cutoff),
    so the output code is within 0.5 + 2**frac_out * 1.28e-4 of the exact value, for 8 more multiplies.
    """
    fn = "int_gelu"
    c = gelu_constants(frac_in, frac_out)
    lo, hi = _out_range(fn, out_lo, out_hi)
    xp, q = _codes(fn, xp, q, math.inf)
    return gelu_codes(xp, q, c, lo, hi)


# ---------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LayerNormConstants:
    n: int                # N, the length of the last axis
    var_shift: int        # j: the variance is taken at 4**-j code**2, so that N * sum stays below 2**52
    eps: int              # nearest integer to N**2 * eps * 4**(frac_in - j)
    norm_shift: int       # LN_NORM_FRAC - j: N (x - mean) 2**norm_shift * scale / root is the normalised value
    norm_max: int         # LN_NORM_MAX * 2**LN_NORM_FRAC
    gamma_frac: int       # gamma codes are at 2**-gamma_frac, beta codes at 2**-(LN_NORM_FRAC + gamma_frac)
    gamma: np.ndarray     # int64 [N]
    beta: np.ndarray      # int64 [N]
    out_shift: int        # LN_NORM_FRAC + gamma_frac - frac_out


def _exp2_above(values: np.ndarray) -> int | None:
    """The least e with max|values| < 2**e (exact, via frexp), or None when all are zero."""
    top = float(np.max(np.abs(values), initial=0.0))
    return math.frexp(top)[1] if top > 0 else None


def _affine(fn: str, v, n: int, default: float) -> np.ndarray:
    a = np.full(n, default) if v is None else np.asarray(v, dtype=np.float64)
    if a.shape != (n,):
        raise ValueError(f"{fn}: gamma and beta must have shape ({n},) like the last axis, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{fn}: gamma and beta must be finite")
    return a


def layer_norm_constants(n: int, frac_in: int, gamma, beta, eps: float, frac_out: int) -> LayerNormConstants:
    """Every integer of the LayerNorm of ``n`` codes, from exact arithmetic only.

    Gamma is quantized to GAMMA_BITS (|code| <= 2**15) at the finest power-of-two step that fits max|gamma|
    (no finer than 2**-GAMMA_FRAC_MAX, and coarse enough that beta fits below 2**BETA_BITS at the
    accumulator's step); beta at the accumulator's step, so adding it is exact.
    """
    fn = "int_layer_norm"
    n = _int_arg(fn, "the last axis length", n, 1, LN_MAX_LEN)
    frac_in = _int_arg(fn, "frac_in", frac_in, *LN_FRAC)
    frac_out = _int_arg(fn, "frac_out", frac_out, *LN_FRAC)
    if not (isinstance(eps, (int, float, np.floating)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps!r}")
    gamma, beta = _affine(fn, gamma, n, 1.0), _affine(fn, beta, n, 0.0)

    limit = 2 ** EXACT_BITS
    sq_max = n * (CODE_RANGE.hi - CODE_RANGE.lo) ** 2      # sum((q - floor(mean))**2) <= N * 2**32 <= 2**44
    j = 0
    while n * (sq_max // 4 ** j) >= limit:                 # N * floor(sum / 4**j) stays below 2**52
        j += 1
    eps_q = math.floor(Fraction(float(eps)) * n * n * Fraction(4) ** (frac_in - j) + Fraction(1, 2))
    if n * sq_max // 4 ** j + eps_q >= limit:
        raise ValueError(f"{fn}: eps={eps} is too large at frac_in={frac_in}: N**2 * (eps + the largest "
                         f"variance) * 4**(frac_in - {j}) must stay below 2**{EXACT_BITS}")

    e_gamma, e_beta = _exp2_above(gamma), _exp2_above(beta)
    gamma_frac = min(GAMMA_FRAC_MAX,
                     GAMMA_FRAC_MAX if e_gamma is None else GAMMA_BITS - 1 - e_gamma,
                     GAMMA_FRAC_MAX if e_beta is None else BETA_BITS - LN_NORM_FRAC - e_beta)
    out_shift = LN_NORM_FRAC + gamma_frac - frac_out
    if out_shift < 0:
        raise ValueError(f"{fn}: frac_out={frac_out} is finer than gamma/beta allow "
                         f"(max|gamma| = {np.max(np.abs(gamma))}, max|beta| = {np.max(np.abs(beta))}): "
                         f"at most {LN_NORM_FRAC + gamma_frac}")
    gamma_q = quantize_np(gamma, gamma_frac, IntRange(-2 ** (GAMMA_BITS - 1), 2 ** (GAMMA_BITS - 1)))
    beta_q = quantize_np(beta, LN_NORM_FRAC + gamma_frac, IntRange(-2 ** BETA_BITS, 2 ** BETA_BITS))
    return LayerNormConstants(n, j, eps_q, LN_NORM_FRAC - j, LN_NORM_MAX * 2 ** LN_NORM_FRAC,
                              gamma_frac, gamma_q, beta_q, out_shift)


def _normalize_pow4(xp: IntOps, x, bits: int = ISQRT_BITS):
    """(x * 4**p, 2**p) with the largest p that keeps x * 4**p below 2**bits, for 1 <= x < 2**bits.

    Binary search by constant steps (p <= 25 < 32), so isqrt always gets 25 significant root bits.
    """
    scale = x * 0 + 1
    for b in (16, 8, 4, 2, 1):
        small = x < 2 ** (bits - 2 * b)
        x = x * xp.where(small, 4 ** b, 1)
        scale = scale * xp.where(small, 2 ** b, 1)
    return x, scale


def layer_norm_codes(xp: IntOps, q, c: LayerNormConstants, out_lo: int, out_hi: int):
    """With r = sum(q) - N * floor(mean), N**2 var = N * sum((q - floor(mean))**2) - r**2, all exact."""
    total = xp.sum(q)                                              # |.| <= 2**27
    base = xp.floor_div(total, c.n)                                # floor(mean), inside the row's range
    r = total - base * c.n                                         # in [0, N)
    d = q - base                                                   # |.| < 2**16
    centred = d * c.n - r                                          # N (x - mean) in codes, |.| < 2**28
    sq = xp.sum(d * d)                                             # <= N * 2**32 <= 2**44
    hi = xp.shift_right_floor(sq, 2 * c.var_shift)
    lo = sq - hi * 4 ** c.var_shift
    var = hi * c.n + xp.floor_div(lo * c.n - r * r, 4 ** c.var_shift)   # floor(N**2 var / 4**j) < 2**52
    x, scale = _normalize_pow4(xp, xp.clip(var + c.eps, 1, None))  # (N**2 (var + eps) / 4**j) * scale**2
    root = isqrt(xp, x)                                            # in [2**25, 2**26)
    # |N (x - mean)| <= sqrt(N - 1) * N std, so the numerator stays below 2**6 * 2**26.5 * 2**16 < 2**49
    norm = round_div(xp, centred * scale * 2 ** c.norm_shift, root)   # (x - mean) / std at LN_NORM_FRAC bits
    norm = xp.clip(norm, -c.norm_max, c.norm_max)                  # |.| <= 2**22
    acc = norm * xp.const(c.gamma, q) + xp.const(c.beta, q)        # |.| < 2**37 + 2**50
    return xp.clip(round_shift(xp, acc, c.out_shift), out_lo, out_hi)


def int_layer_norm(q, frac_in: int, gamma, beta, eps: float, frac_out: int, out_lo: int, out_hi: int,
                   xp: IntOps | None = None):
    """LayerNorm over the last axis (biased variance, like torch): codes at ``frac_in`` in, ``frac_out`` out.

    ``gamma``/``beta`` are float arrays of the last axis' length (None: 1 and 0). N**2 (var + eps) is
    exact up to one floor (at 4**-j code**2; j = 0 up to N = 1024) and one rounding of eps; it is scaled
    by a power of four into [2**50, 2**52) so the integer root has 25 significant bits. The normalised
    value is then rounded at LN_NORM_FRAC bits and gamma at GAMMA_BITS; tests/test_int_nonlinear.py
    states the resulting bound per element.
    """
    fn = "int_layer_norm"
    lo, hi = _out_range(fn, out_lo, out_hi)
    xp, q = _codes(fn, xp, q, LN_MAX_LEN)
    c = layer_norm_constants(q.shape[-1], frac_in, gamma, beta, eps, frac_out)
    return layer_norm_codes(xp, q, c, lo, hi)


# ---------------------------------------------------------------------------------------------
# one entry for the executors: the IR stores the fracs (softmax, GELU) or the integer constants
# ---------------------------------------------------------------------------------------------
FUNCTIONS = ("softmax", "gelu", "layer_norm")


def mask_codes(mask: np.ndarray, frac_in: int) -> np.ndarray:
    """A constant additive softmax mask as codes at the scores' step (int16: -1e4 saturates, exp is 0)."""
    return quantize_np(mask, frac_in, CODE_RANGE)


def key_mask_codes(on_valid: float, on_invalid: float, frac_in: int) -> tuple[int, int]:
    """A token attention mask's two values (valid key, padding) as codes at the scores' step, in int16."""
    codes = quantize_np(np.array([on_valid, on_invalid], np.float64), frac_in, CODE_RANGE)
    return int(codes[0]), int(codes[1])


def apply(fn: str, xp: IntOps, q, c, out_lo: int, out_hi: int, mask=None, valid=None, key_mask=None):
    """Output codes of ``fn`` on validated codes ``q`` with constants ``c``. Softmax: a constant ``mask``
    (codes), or ``key_mask`` = (code if valid, code if padding) chosen per key by ``valid`` [N, T], is
    added and the sum saturated to the supported input range first. masked_mean reads ``valid``."""
    if fn == "softmax":
        if mask is not None:
            q = xp.clip(q + xp.const(mask, q), CODE_RANGE.lo, CODE_RANGE.hi)
        if key_mask is not None:
            keys = valid[:, None, None, :] != 0
            q = xp.clip(q + xp.where(keys, key_mask[0], key_mask[1]), CODE_RANGE.lo, CODE_RANGE.hi)
        return softmax_codes(xp, q, c, out_lo, out_hi)
    if fn == "gelu":
        return gelu_codes(xp, q, c, out_lo, out_hi)
    if fn == "masked_mean":
        return masked_mean_codes(xp, q, valid, c, out_lo, out_hi)
    if fn == "l2_normalize":
        return l2_normalize_codes(xp, q, c, out_lo, out_hi)
    return layer_norm_codes(xp, q, c, out_lo, out_hi)


# ---------------------------------------------------------------------------------------------
# pooling for sentence embeddings: masked mean over tokens, then L2 normalisation
# ---------------------------------------------------------------------------------------------
# Both use the operations above plus two that numpy, torch and ONNX all spell the same way:
# ``xp.sum(x, axis=1, keepdims=False)`` (ReduceSum over the token axis) and ``x[..., None]``
# (a trailing unit axis; Unsqueeze in ONNX). Supported: codes within int16, T <= 4096 tokens for the
# mean (any D), D <= 4096 for the normalisation; the bound of every intermediate is noted per line.
MEAN_MAX_LEN = 4096             # |sum_t valid * q| <= 2**12 * 2**15 = 2**27
MEAN_FRAC = (-8, 24)            # frac_in and frac_out
MEAN_MAX_GAIN_LOG2 = 24         # frac_out - frac_in <= 24: |sum| * 2**24 <= 2**51
L2_MAX_LEN = 4096               # sum(q**2) <= 2**12 * 2**30 = 2**42 (the arithmetic would allow D < 2**21)
L2_FRAC_IN = (-8, 24)           # only enters through eps, see l2_normalize_constants
L2_FRAC_OUT = (0, 24)           # |q| * scale < 2**26 (scale below), times 2**frac_out <= 2**50


@dataclass(frozen=True)
class MaskedMeanConstants:
    frac_out: int
    up_shift: int         # max(frac_out - frac_in, 0): the masked sum is multiplied by 2**up_shift...
    down_shift: int       # ...and the count by 2**down_shift = 2**max(frac_in - frac_out, 0)


def masked_mean_constants(frac_in: int, frac_out: int) -> MaskedMeanConstants:
    fn = "int_masked_mean"
    frac_in = _int_arg(fn, "frac_in", frac_in, *MEAN_FRAC)
    frac_out = _int_arg(fn, "frac_out", frac_out, *MEAN_FRAC)
    if frac_out - frac_in > MEAN_MAX_GAIN_LOG2:
        raise ValueError(f"{fn}: frac_out - frac_in = {frac_out - frac_in} is too large: at most "
                         f"{MEAN_MAX_GAIN_LOG2} keeps the scaled sum below 2**{EXACT_BITS}")
    return MaskedMeanConstants(frac_out, max(frac_out - frac_in, 0), max(frac_in - frac_out, 0))


def masked_mean_codes(xp: IntOps, q, valid, c: MaskedMeanConstants, out_lo: int, out_hi: int):
    """q [N, T, D] codes, valid [N, T] of 0/1 -> [N, D]: the exactly rounded mean over the valid tokens."""
    total = xp.sum(q * valid[..., None], axis=1, keepdims=False)   # [N, D], |.| <= T * 2**15 <= 2**27
    count = xp.clip(xp.sum(valid), 1, None)                        # [N, 1], in [1, 2**12]; 0 tokens -> 1
    if c.up_shift:                                                 # (at most one of the shifts is nonzero)
        total = total * 2 ** c.up_shift                            # |.| <= 2**27 * 2**24 = 2**51
    if c.down_shift:
        count = count * 2 ** c.down_shift                          # <= 2**12 * 2**32 = 2**44
    return xp.clip(round_div(xp, total, count), out_lo, out_hi)


def _valid_mask(fn: str, xp: IntOps, valid, shape: tuple):
    if isinstance(valid, torch.Tensor) and valid.dtype == torch.bool:
        valid = valid.to(torch.int64)
    elif not isinstance(valid, torch.Tensor) and np.asarray(valid).dtype == np.bool_:
        valid = np.asarray(valid, np.int64)
    try:
        valid = xp.codes(valid, fn)
    except ValueError as e:
        raise ValueError(f"{e} (for the valid mask)") from None
    if tuple(valid.shape) != shape:
        raise ValueError(f"{fn}: valid must have shape {shape} (the codes' [N, T]), got {tuple(valid.shape)}")
    if min(shape) > 0:
        lo, hi = xp.bounds(valid)
        if lo < 0 or hi > 1:
            raise ValueError(f"{fn}: valid must hold only 0 and 1, got values in [{lo}, {hi}]")
    return valid


def int_masked_mean(q, valid, frac_in: int, frac_out: int, out_lo: int, out_hi: int, xp: IntOps | None = None):
    """Mean of codes ``q`` [N, T, D] at ``frac_in`` over the tokens t with ``valid`` [N, T] = 1 (0/1 integers,
    or bool), as codes [N, D] at ``frac_out``: round(sum_t valid q * 2**(frac_out - frac_in) / max(count, 1))
    rounded half to even and clamped, computed exactly. Rows without a valid token give 0.

    This is torch's ``(x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)`` on the dequantized
    input, then rounded: at most 0.5 output steps off, and exactly the nearest code (ties to even).
    """
    fn = "int_masked_mean"
    c = masked_mean_constants(frac_in, frac_out)
    lo, hi = _out_range(fn, out_lo, out_hi)
    xp = xp or ops_for(q)
    q = xp.codes(q, fn)
    if q.ndim != 3:
        raise ValueError(f"{fn}: codes must have shape [N, T, D], got {tuple(q.shape)}")
    if q.shape[1] == 0:
        raise ValueError(f"{fn}: the token axis (1) is empty")
    if q.shape[1] > MEAN_MAX_LEN:
        raise ValueError(f"{fn}: the token axis has {q.shape[1]} elements, at most {MEAN_MAX_LEN} are supported")
    xp, q = _codes(fn, xp, q, math.inf)                            # D >= 1, codes within int16
    valid = _valid_mask(fn, xp, valid, tuple(q.shape[:2]))
    return masked_mean_codes(xp, q, valid, c, lo, hi)


@dataclass(frozen=True)
class L2NormalizeConstants:
    n: int                # D, the length of the last axis
    frac_out: int
    gain: int             # 2**frac_out


def l2_normalize_constants(frac_in: int, frac_out: int, n: int, eps: float = 1e-12) -> L2NormalizeConstants:
    """x / max(||x||, eps) does not depend on frac_in except through eps; a row that is not all zero has
    ||x|| >= 2**-frac_in, so for eps <= 2**-frac_in (required; eps = 1e-12 qualifies at every supported
    frac_in, 1e-6 up to frac_in 19) eps only acts on all-zero rows, whose output is 0 (torch gives 0 too,
    and NaN for eps = 0, where the kernel still gives 0)."""
    fn = "int_l2_normalize"
    frac_in = _int_arg(fn, "frac_in", frac_in, *L2_FRAC_IN)
    frac_out = _int_arg(fn, "frac_out", frac_out, *L2_FRAC_OUT)
    n = _int_arg(fn, "the last axis length", n, 1, L2_MAX_LEN)
    if isinstance(eps, bool) or not (isinstance(eps, (int, float, np.integer, np.floating))
                                     and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps!r}")
    if Fraction(float(eps)) > Fraction(2) ** -frac_in:
        raise ValueError(f"{fn}: eps={eps} exceeds 2**-{frac_in}, the smallest nonzero norm at frac_in={frac_in}: "
                         f"only eps <= 2**-frac_in is supported (then it only matters for all-zero rows)")
    return L2NormalizeConstants(n, frac_out, 2 ** frac_out)


def l2_normalize_codes(xp: IntOps, q, c: L2NormalizeConstants, out_lo: int, out_hi: int):
    """round(q * 2**frac_out * scale / isqrt(sum(q**2) * scale**2)), 0 for all-zero rows."""
    s = xp.sum(q * q)                                              # <= D * 2**30 <= 2**42
    x, scale = _normalize_pow4(xp, xp.clip(s, 1, None))            # s * scale**2 in [2**50, 2**52), exact
    root = isqrt(xp, x)                                            # in [2**25, 2**26); sqrt(x) - root in [0, 1)
    # q**2 <= s, so |q| * scale <= sqrt(x) < 2**26 and the numerator is below 2**(26 + frac_out) <= 2**50;
    # an all-zero row has q = 0 (its s was clipped to 1 only to keep the division defined)
    gain = scale * c.gain if c.gain != 1 else scale                # [..., 1], <= 2**25 * 2**24
    return xp.clip(round_div(xp, q * gain, root), out_lo, out_hi)


def int_l2_normalize(q, frac_in: int, frac_out: int, out_lo: int, out_hi: int, eps: float = 1e-12,
                     xp: IntOps | None = None):
    """L2 normalisation over the last axis, like ``torch.nn.functional.normalize(x, dim=-1, eps=eps)``: codes
    at ``frac_in`` in, codes at ``frac_out`` out (|code| <= 2**frac_out), all-zero rows give 0.

    sum(q**2) is exact and scaled by a power of four into [2**50, 2**52), so its integer root r has
    relative error below 1 / r <= 2**-25 and only ever too small. The rounded quotient is therefore within
    0.5 + 2**(frac_out - 25) output steps of x / ||x|| * 2**frac_out (clamped): 0.5 + 2**-18 at
    frac_out 7, 0.5 + 2**-10 at 15. eps must be at most 2**-frac_in (see ``l2_normalize_constants``).
    """
    fn = "int_l2_normalize"
    lo, hi = _out_range(fn, out_lo, out_hi)
    xp, q = _codes(fn, xp, q, L2_MAX_LEN)
    c = l2_normalize_constants(frac_in, frac_out, q.shape[-1], eps)
    return l2_normalize_codes(xp, q, c, lo, hi)
