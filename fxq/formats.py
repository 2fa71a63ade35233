"""Every number format and rounding rule of fxq, in one place.

A quantized value is ``code * 2**-frac``; on the ``int8`` target, ``(code - zp) * mant * 2**-frac`` with an
integer mantissa ``mant`` (a dyadic scale) and a zero point ``zp``. The fake-quant torch model, the numpy reference backend and
the ONNX exporter all call the functions here, so they cannot disagree on a tie or a saturation.
Nothing else in fxq should write ``round(``, ``>>`` or an integer limit such as 127. Over 400 lines on
purpose: it is that one place.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import torch


class Rounding(str, enum.Enum):
    HALF_EVEN = "half_even"   # banker's rounding: what ONNX QuantizeLinear and torch.round do
    HALF_UP = "half_up"       # ties toward +inf: cheapest in hardware (add half, shift)
    HALF_AWAY = "half_away"   # ties away from zero
    FLOOR = "floor"           # plain arithmetic shift, no rounding adder


# ONNX QuantizeLinear rounds half to even, so this default is what makes the QDQ export exact.
DEFAULT_ROUNDING = Rounding.HALF_EVEN

ACC_BITS = 32            # accumulator width of every built-in target
FP32_EXACT_BITS = 24     # float32 holds every integer of magnitude <= 2**24 exactly
FP64_EXACT_BITS = 53     # float64 likewise, for BLAS-backed exact integer GEMM
FRAC_LIMITS = (-64, 96)  # fractional lengths outside this are a bug, not a format
FLOAT_SHIFT_LIMIT = 2**51  # below this, acc * 2**-s and acc * 2**-s + 0.5 are exact float64 values


@dataclass(frozen=True)
class IntRange:
    lo: int
    hi: int

    def clip_np(self, codes: np.ndarray) -> np.ndarray:
        return np.clip(codes, self.lo, self.hi)

    @property
    def max_abs(self) -> int:
        return max(abs(self.lo), abs(self.hi))


def int_range(bits: int, signed: bool, symmetric: bool = False) -> IntRange:
    """Code range of a ``bits``-wide integer; ``symmetric`` drops -2**(bits-1) (weights use it)."""
    if bits < 1 or bits > 32:
        raise ValueError(f"bit width must be in 1..32, got {bits}")
    if not signed:
        return IntRange(0, 2**bits - 1)
    hi = 2 ** (bits - 1) - 1
    return IntRange(-hi if symmetric else -hi - 1, hi)


ACC_RANGE = int_range(ACC_BITS, signed=True)

# The storage dtype each code width lives in; narrower codes (4-bit, ternary) are stored in 8 bits.
def storage_dtype(bits: int, signed: bool) -> str:
    if bits <= 8:
        return "int8" if signed else "uint8"
    if bits <= 16:
        return "int16" if signed else "uint16"
    return "int32"


DTYPE_RANGES = {
    "int8": int_range(8, True), "uint8": int_range(8, False),
    "int16": int_range(16, True), "uint16": int_range(16, False),
    "int32": int_range(32, True),
}


def exp2(n: int) -> float:
    """2**n as an exact float (ldexp never rounds for the exponents fxq uses)."""
    return math.ldexp(1.0, int(n))


# ---------------------------------------------------------------------------------------------
# rounding of real numbers (torch and numpy): used by quantize and by the fake-quant model
# ---------------------------------------------------------------------------------------------
def round_torch(x: torch.Tensor, mode: Rounding = DEFAULT_ROUNDING) -> torch.Tensor:
    mode = Rounding(mode)
    if mode is Rounding.HALF_EVEN:
        return torch.round(x)
    if mode is Rounding.HALF_UP:
        return torch.floor(x + 0.5)
    if mode is Rounding.HALF_AWAY:
        return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)
    return torch.floor(x)


def round_np(x: np.ndarray, mode: Rounding = DEFAULT_ROUNDING) -> np.ndarray:
    mode = Rounding(mode)
    if mode is Rounding.HALF_EVEN:
        return np.rint(x)
    if mode is Rounding.HALF_UP:
        return np.floor(x + 0.5)
    if mode is Rounding.HALF_AWAY:
        return np.sign(x) * np.floor(np.abs(x) + 0.5)
    return np.floor(x)


def quantize_np(x: np.ndarray, frac, rng: IntRange, mode: Rounding = DEFAULT_ROUNDING, mant=1, zp=0) -> np.ndarray:
    """Float values to int64 codes: round(x * 2**frac / mant) + zp, saturated.

    Multiplying by 2**frac is exact and the division is IEEE float64 (correctly rounded) in numpy and
    torch alike, so the fake-quant model and the reference backend round the same ties.
    """
    scaled = np.asarray(x, dtype=np.float64) * np.exp2(np.asarray(frac, dtype=np.float64))
    if np.any(np.asarray(mant) != 1):
        scaled = scaled / np.asarray(mant, dtype=np.float64)
    return rng.clip_np(round_np(scaled, mode) + np.asarray(zp, dtype=np.int64)).astype(np.int64)


def fake_quant(x: torch.Tensor, frac, rng: IntRange, mode: Rounding = DEFAULT_ROUNDING,
               ste: bool = False, mant=1, zp: int = 0) -> torch.Tensor:
    """The value the integer graph will hold for ``x``: (codes - zp) * mant * 2**-frac, rounded and saturated.

    ``frac`` and ``mant`` are ints or tensors broadcastable to ``x`` (per-channel). With ``ste`` the
    gradient passes straight through, which calibration passes use to optimise through the rounding.
    """
    scale = torch.exp2(torch.as_tensor(frac, dtype=x.dtype, device=x.device))
    if isinstance(mant, torch.Tensor) or mant != 1 or zp:
        mant = torch.as_tensor(mant, dtype=x.dtype, device=x.device)
        codes = torch.clamp(round_torch(x * scale / mant, mode) + zp, rng.lo, rng.hi)
        q = (codes - zp) * mant / scale
    else:
        q = torch.clamp(round_torch(x * scale, mode), rng.lo, rng.hi) / scale
    return x + (q - x).detach() if ste else q


def codes_of(values: np.ndarray, frac, mant=1, zp=0) -> np.ndarray:
    """The codes behind exact dequantized values (value = (code - zp) * mant * 2**-frac)."""
    scaled = np.asarray(values, np.float64) * np.exp2(np.asarray(frac, np.float64)) / np.asarray(mant, np.float64)
    return (np.rint(scaled) + np.asarray(zp, np.int64)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# dyadic numbers: the int8 target's scales (mant * 2**-frac) and requant multipliers (M * 2**-n)
# ---------------------------------------------------------------------------------------------
def dyadic(x, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest m * 2**-f to each positive ``x`` with m a ``bits``-wide integer in [2**(bits-1), 2**bits).

    Zero or non-finite entries (a dead channel) get m * 2**-f = 1, so their scales stay ordinary.
    """
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x) & (x > 0)
    safe = np.where(ok, x, 1.0)
    f = bits - 1 - np.floor(np.log2(safe))
    m = np.rint(safe * np.exp2(f))
    carry = m >= 2**bits                       # rounding up to the next power of two
    m, f = np.where(carry, m / 2, m), np.where(carry, f - 1, f)
    return m.astype(np.int64), f.astype(np.int64)


def dyadic_requant_np(acc: np.ndarray, multiplier, shift, zp, rng: IntRange, mode: Rounding = DEFAULT_ROUNDING) -> np.ndarray:
    """round(acc * M * 2**-n) + zp, saturated: the int8 target's requantization, in integers."""
    prod = np.asarray(acc, np.int64) * np.asarray(multiplier, np.int64)
    return rng.clip_np(shift_round_np(prod, shift, mode) + np.asarray(zp, np.int64))


# ---------------------------------------------------------------------------------------------
# integer shifts: requantization of accumulators
# ---------------------------------------------------------------------------------------------
def shift_round_np(acc: np.ndarray, shift, mode: Rounding = DEFAULT_ROUNDING) -> np.ndarray:
    """acc * 2**-shift rounded to an integer, on int64 codes; negative shifts are exact left shifts.

    ``shift`` is an int or an int array broadcastable to ``acc`` (per-channel requant).
    """
    acc = np.asarray(acc, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if acc.size and np.abs(acc).max() < FLOAT_SHIFT_LIMIT and shift.max(initial=0) < 64 and shift.min(initial=0) > -32:
        # acc * 2**-shift is exact in float64 here, so rounding it is the same as the integer rule below.
        return round_np(acc * np.exp2(-shift.astype(np.float64)), mode).astype(np.int64)
    right = np.maximum(shift, 0)
    left = np.maximum(-shift, 0)
    q = acc >> right                                   # floor division by 2**right
    rem = acc - (q << right)                           # in [0, 2**right)
    half = np.where(right > 0, np.int64(1) << np.maximum(right - 1, 0), np.int64(0))
    mode = Rounding(mode)
    positive_rem = right > 0
    if mode is Rounding.HALF_EVEN:
        up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    elif mode is Rounding.HALF_UP:
        up = rem >= half
    elif mode is Rounding.HALF_AWAY:
        up = (rem > half) | ((rem == half) & (acc >= 0))
    else:
        up = np.zeros_like(rem, dtype=bool)
    q = q + (up & positive_rem)                        # a zero shift has nothing to round
    return q << left


def requant_np(acc: np.ndarray, shift, rng: IntRange, mode: Rounding = DEFAULT_ROUNDING) -> np.ndarray:
    """Shift, round, saturate: the one requantization every executor performs."""
    return rng.clip_np(shift_round_np(acc, shift, mode))


# Integer-only rounding over an array adapter ``xp`` (fxq.intops: numpy int64, torch, float64
# values, or the ONNX tracer), so the integer kernels round exactly as shift_round_np's HALF_EVEN.
def _round_up(xp, q, rem, div):
    """q, plus one where rem / div (0 <= rem < div) is above a half, or exactly a half and q is odd."""
    odd = q - xp.shift_right_floor(q, 1) * 2
    up = (rem * 2 > div) | ((rem * 2 == div) & (odd == 1))
    return xp.where(up, q + 1, q)


def round_shift(xp, x, k: int):
    """x * 2**-k rounded half to even, for a constant k >= 0: shift_round_np's HALF_EVEN."""
    if k == 0:
        return x
    q = xp.shift_right_floor(x, k)
    return _round_up(xp, q, x - q * 2 ** k, 2 ** k)


def round_div(xp, a, b):
    """a / b rounded half to even, for a positive integer (tensor) b."""
    q = xp.floor_div(a, b)
    return _round_up(xp, q, a - q * b, b)


def max_bias_code(acc_bits: int) -> float:
    """Largest |bias code| fxq allows: half the accumulator's range stays free for the products."""
    return exp2(acc_bits - 2)


def bias_frac_cap(bias: np.ndarray, in_step: float, w_mant: np.ndarray, acc_bits: int) -> np.ndarray:
    """Per output channel, the largest weight frac at which the bias code |b| / (in_step * w_step) stays
    within max_bias_code(acc_bits), leaving half the accumulator to the products. A channel whose weights
    vanish (a BN with gamma ~ 0) would otherwise pick a tiny step that no int32 bias can follow."""
    b = np.abs(np.asarray(bias, np.float64))
    limit = max_bias_code(acc_bits) * in_step * np.asarray(w_mant, np.float64)
    with np.errstate(divide="ignore"):
        cap = np.where(b > 0, np.floor(np.log2(limit / np.where(b > 0, b, 1.0))), FRAC_LIMITS[1])
    return np.clip(cap, FRAC_LIMITS[0], FRAC_LIMITS[1]).astype(np.int64)


def fit_bias_frac(frac: np.ndarray, bias: np.ndarray, in_step: float, w_mant: np.ndarray, acc_bits: int) -> np.ndarray:
    """Weight fractional lengths with every channel above its bias_frac_cap brought down to it."""
    return np.minimum(np.asarray(frac, np.int64), bias_frac_cap(bias, in_step, w_mant, acc_bits))


def step_of(frac, mant=1) -> np.ndarray:
    """The real step of a format, mant * 2**-frac (float64, exact)."""
    return np.asarray(mant, np.float64) * np.exp2(-np.asarray(frac, np.float64))


def affine_range(lo: float, hi: float, bits: int, mant_bits: int) -> tuple[int, int, int]:
    """(mant, frac, zp) of unsigned ``bits``-wide codes covering [min(lo, 0), max(hi, 0)], zero exact."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    top = 2**bits - 1
    m, f = dyadic((hi - lo) / top if hi > lo else 0.0, mant_bits)
    zp = int(np.clip(np.rint(-lo / step_of(f, m)), 0, top))
    return int(m), int(f), zp


def search_affine(sample: np.ndarray, bits: int, mant_bits: int, shrink: tuple, mode: Rounding = DEFAULT_ROUNDING):
    """(mant, frac, zp) with the least squared error on ``sample`` among the min/max range shrunk by each
    factor in ``shrink`` (1.0: no clipping)."""
    sample = np.asarray(sample, np.float64)
    lo, hi = float(sample.min(initial=0.0)), float(sample.max(initial=0.0))
    rng = int_range(bits, signed=False)
    best, best_err = None, np.inf
    for k in shrink:
        m, f, zp = affine_range(lo * k, hi * k, bits, mant_bits)
        q = (quantize_np(sample, f, rng, mode, m, zp) - zp) * step_of(f, m)
        err = float(((q - sample) ** 2).sum())
        if err < best_err:
            best, best_err = (m, f, zp), err
    return best


def onnx_exact_rounding(mode: Rounding) -> bool:
    """ONNX QuantizeLinear only rounds half to even; other modes cannot be exported exactly."""
    return Rounding(mode) is Rounding.HALF_EVEN


# ---------------------------------------------------------------------------------------------
# choosing a power-of-two step: the no-clip exponent and its finer neighbours, by squared error
# ---------------------------------------------------------------------------------------------
def noclip_frac(lo_val: np.ndarray, hi_val: np.ndarray, rng: IntRange) -> np.ndarray:
    """Largest fractional length at which [lo_val, hi_val] fits in the code range (per row).

    A row that is all zeros (a ReLU that never fires, a pruned filter) has no scale to fit; it gets
    the format of values in [-1, 1), so its shifts stay ordinary.
    """
    lo_val, hi_val = np.asarray(lo_val, np.float64), np.asarray(hi_val, np.float64)
    with np.errstate(divide="ignore"):
        f_hi = np.where(hi_val > 0, np.floor(np.log2(rng.hi / np.where(hi_val > 0, hi_val, 1.0))), np.inf)
        f_lo = np.where((lo_val < 0) & (rng.lo < 0),
                        np.floor(np.log2(abs(rng.lo) / np.where(lo_val < 0, -lo_val, 1.0))), np.inf)
    f = np.minimum(f_hi, f_lo)
    f = np.where(np.isinf(f), rng.hi.bit_length() - 1, f)
    return np.clip(f, FRAC_LIMITS[0], FRAC_LIMITS[1] - 8).astype(np.int64)


def std_frac(std: np.ndarray, coeff: float, bits: int) -> np.ndarray:
    """F8Net's fractional length from a tensor's standard deviation: floor(log2(c / std)).

    ``coeff`` is c for 8-bit codes; other widths scale it by 2**(bits - 8) so the clip stays at the same
    multiple of std. A zero spread (dead channel) gets the neutral format of values in [-1, 1).
    """
    std = np.asarray(std, np.float64)
    c = coeff * exp2(bits - 8)
    with np.errstate(divide="ignore"):
        f = np.where(std > 0, np.floor(np.log2(c / np.where(std > 0, std, 1.0))), bits - 1)
    return np.clip(f, FRAC_LIMITS[0], FRAC_LIMITS[1] - 8).astype(np.int64)


def search_frac(values: np.ndarray, rng: IntRange, radius: int, mode: Rounding = DEFAULT_ROUNDING,
                weights: np.ndarray | None = None) -> np.ndarray:
    """Per row of ``values`` (shape [rows, n]), the fractional length with the least (weighted) squared
    quantization error among the no-clip one and the ``radius`` finer ones (finer: less rounding
    error, more clipping). ``weights`` (same shape) lets a caller weight errors, e.g. by a Hessian.
    """
    values = np.atleast_2d(np.asarray(values, np.float64))
    f0 = noclip_frac(values.min(axis=1), values.max(axis=1), rng)
    best_err = np.full(values.shape[0], np.inf)
    best = f0.copy()
    for step in range(radius + 1):
        f = f0 + step
        q = quantize_np(values, f[:, None], rng, mode) * np.exp2(-f[:, None].astype(np.float64))
        err = (q - values) ** 2
        err = (err if weights is None else err * weights).sum(axis=1)
        better = err < best_err
        best[better], best_err[better] = f[better], err[better]
    return best


# The float steps reconstruction starts from: max|w| / qmax shrunk by each factor (BRECQ's 80 candidates).
MSE_STEP_SHRINK = tuple(1.0 - 0.01 * i for i in range(80))


def mse_step(rows: np.ndarray, rng: IntRange, mode: Rounding = DEFAULT_ROUNDING) -> np.ndarray:
    """Per row, the float step (max|w| / qmax times a shrink factor) with the least squared error.

    An all-zero row gets the step noclip_frac gives it, so its exponent stays ordinary."""
    rows = np.atleast_2d(np.asarray(rows, np.float64))
    top = np.abs(rows).max(axis=1)
    dead = top == 0
    top = np.where(dead, 1.0, top)
    best = top / rng.hi
    best_err = np.full(rows.shape[0], np.inf)
    for k in MSE_STEP_SHRINK:
        step = top * k / rng.hi
        q = rng.clip_np(round_np(rows / step[:, None], mode)) * step[:, None]
        err = ((q - rows) ** 2).sum(axis=1)
        better = err < best_err
        best[better], best_err[better] = step[better], err[better]
    return np.where(dead, exp2(-(rng.hi.bit_length() - 1)), best)


# ---------------------------------------------------------------------------------------------
# twin-uniform codes (PTQ4ViT): b-bit codes whose top bit selects one of two ranges, steps 2**m apart
# ---------------------------------------------------------------------------------------------
# Post-GELU values reach down to GELU's minimum, about -0.16997: the fine range must hold it.
GELU_MIN = -0.16997
TWIN_FINE_DTYPE = "int16"  # fine codes (magnitude * 2**m) must fit it


def twin_max_shift(bits: int) -> int:
    """The largest ratio exponent m: R1's top edge 2**(bits-1) must be an R2 code (m <= bits - 1, so no gap
    opens between the ranges), and fine codes (2**(bits-1) - 1) * 2**m must fit TWIN_FINE_DTYPE."""
    fits = int(math.floor(math.log2(DTYPE_RANGES[TWIN_FINE_DTYPE].hi / (2 ** (bits - 1) - 1))))
    return min(bits - 1, fits)


@dataclass(frozen=True)
class Twin:
    """How b-bit twin codes map to "fine" codes at the small step 2**-frac (what consumers multiply).

    ``signed`` False (post-softmax): fine codes 0..half-1 keep R1 (the small step); larger ones go to
    R2, the step 2**m times coarser. ``signed`` True (post-GELU): negative fine codes use R1 (down to
    -(half-1)), non-negative ones R2. half = 2**(bits-1); a twin code is range_bit * half + magnitude.
    """
    bits: int
    shift: int            # m: R2's step is 2**m times R1's
    signed: bool

    @property
    def half(self) -> int:
        return 2 ** (self.bits - 1)

    @property
    def fine_range(self) -> IntRange:
        top = (self.half - 1) * 2 ** self.shift
        return IntRange(-(self.half - 1) if self.signed else 0, top)

    @property
    def code_range(self) -> IntRange:
        return int_range(self.bits, signed=False)


def twin_compress(fine, t: Twin, xp=np):
    """Fine codes -> twin codes. R2 magnitudes round (DEFAULT_ROUNDING, half to even) and saturate at half - 1 (no overflow
    into the next code at R2's top edge); R1 codes are exact."""
    fine = xp.clip(fine, t.fine_range.lo, t.fine_range.hi)
    coarse = _round_shift(fine, t.shift, xp)
    in_r1 = fine < 0 if t.signed else fine < t.half
    r1 = -fine if t.signed else fine
    # post-softmax: R2 starts at R1's top edge (magnitude half >> m), so the codes stay monotonic
    r2 = t.half + xp.clip(coarse, 0 if t.signed else t.half >> t.shift, t.half - 1)
    return xp.where(in_r1, r1, r2)


def twin_expand(codes, t: Twin, xp=np):
    """Twin codes -> fine codes at R1's step: R2 magnitudes shift left by m."""
    r2 = codes >= t.half
    mag = xp.where(r2, codes - t.half, codes)
    return xp.where(r2, mag * 2 ** t.shift, -mag if t.signed else mag)


def _round_shift(x, k: int, xp):
    """x * 2**-k rounded half to even, on integer-valued arrays (float64 exact below 2**52)."""
    if xp is np:
        return np.rint(np.asarray(x, np.float64) * 2.0 ** -k).astype(np.int64)
    return torch.round(x.double() * 2.0 ** -k).to(x.dtype)


def fake_twin(x: torch.Tensor, frac: int, t: Twin, ste: bool = False) -> torch.Tensor:
    """The value twin codes hold for ``x``: fine codes at 2**-frac, compressed and expanded."""
    fine = torch.round(x.double() * 2.0 ** frac).clamp(t.fine_range.lo, t.fine_range.hi).to(torch.int64)
    q = (twin_expand(twin_compress(fine, t, torch), t, torch).double() * 2.0 ** -frac).to(x.dtype)
    return x + (q - x).detach() if ste else q


def twin_gelu_frac(bits: int) -> int:
    """R1's fractional length for post-GELU values: the finest whose half - 1 codes still reach GELU's minimum."""
    return int(math.floor(math.log2((2 ** (bits - 1) - 1) / -GELU_MIN)))
