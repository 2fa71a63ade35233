"""The verifier's building blocks that several op rules share: shifts equal to format differences,
nearest dyadic multipliers, accumulator bounds, code ranges."""
from __future__ import annotations

import numpy as np

from ..errors import VerifyError
from ..formats import ACC_RANGE, FP64_EXACT_BITS, Rounding

NARROW = ("int8", "uint8", "int16", "uint16")
MAX_SHIFT = 31
MAX_DYADIC_SHIFT = 62          # acc * M >> n with n < 64 on int64
ROUNDING_NAMES = tuple(r.value for r in Rounding)


class Check:
    """``chk(ok, why)`` raises a VerifyError naming the node when ``ok`` is false."""

    def __init__(self, node):
        self.node = node

    def __call__(self, ok: bool, why: str) -> None:
        if not ok:
            n = self.node
            raise VerifyError(f"IR node '%{n.name}' ({getattr(n.op, 'value', n.op)}): {why}")


def fracs(t) -> list:
    return list(t.frac) if isinstance(t.frac, tuple) else [t.frac]


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def rounding_ok(chk: Check, name) -> None:
    chk(name in ROUNDING_NAMES, f"unknown rounding {name!r}; known: {list(ROUNDING_NAMES)}")


def positive_pair(chk: Check, v, what: str, minimum: int = 1) -> None:
    v = v if isinstance(v, tuple) else (v,)
    chk(len(v) == 2 and all(is_int(x) and x >= minimum for x in v),
        f"{what} {list(v)} must be two integers >= {minimum}")


def shift_ok(chk: Check, shift, expected) -> None:
    shift, expected = np.atleast_1d(np.asarray(shift)), np.atleast_1d(np.asarray(expected))
    chk(np.issubdtype(shift.dtype, np.integer), f"shift {shift.tolist()} is not an integer")
    chk(shift.shape == expected.shape or shift.size == 1 or expected.size == 1,
        f"shift has {shift.size} entries, expected {expected.size}")
    chk(bool(np.all(shift == expected)), f"shift {shift.tolist()} != frac_in - frac_out {expected.tolist()}")
    chk(bool(np.all(np.abs(shift) <= MAX_SHIFT)), f"shift {shift.tolist()} outside [-{MAX_SHIFT}, {MAX_SHIFT}]")


def multiplier_ok(chk: Check, multiplier, shift, ratio, magnitude: int) -> None:
    """M * 2**-n approximates the ratio of steps to the nearest integer M, and acc * M is exact in float64."""
    m, n = np.atleast_1d(np.asarray(multiplier)), np.atleast_1d(np.asarray(shift))
    ratio = np.atleast_1d(np.asarray(ratio, np.float64))
    chk(np.issubdtype(m.dtype, np.integer) and np.issubdtype(n.dtype, np.integer), "multiplier and shift must be integers")
    chk(m.size in (1, ratio.size) and n.size in (1, ratio.size), f"multiplier/shift have {m.size}/{n.size} entries, "
                                                                  f"expected {ratio.size}")
    chk(bool(np.all((n >= 0) & (n <= MAX_DYADIC_SHIFT))), f"shift {n.tolist()} outside [0, {MAX_DYADIC_SHIFT}]")
    err = np.abs(m - ratio * np.exp2(n.astype(np.float64)))
    chk(bool(np.all(err <= 0.5 + 1e-9 * m)), f"multiplier {m.tolist()} x 2^-{n.tolist()} is not the nearest dyadic "
                                               f"to the ratio of steps {ratio.tolist()}")
    chk(int(m.max()) * magnitude < 2**FP64_EXACT_BITS, f"accumulator x multiplier can reach 2^53 ({magnitude} x {m.max()})")


def same_step(chk: Check, t, out) -> None:
    chk(bool(np.all(t.mant_array == out.mant_array)), f"mantissas {t.mant} -> {out.mant} differ, which a shift cannot "
                                                      f"rescale (a multiplier is needed)")


def acc_fits(chk: Check, bound, declared, what: str) -> None:
    bound = int(np.max(bound))
    chk(bound <= ACC_RANGE.hi, f"{what} can reach {bound} > int32 max {ACC_RANGE.hi}: the accumulator can overflow")
    if declared is not None:
        chk(declared.max_abs >= bound, f"declared accumulator range {declared.max_abs} < provable bound {bound}")


def codes_in(chk: Check, a: np.ndarray, r, what: str) -> None:
    chk(np.issubdtype(a.dtype, np.integer) and a.min(initial=0) >= r.lo and a.max(initial=0) <= r.hi,
        f"{what} outside [{r.lo}, {r.hi}]")


def narrow_in_out(chk: Check, ins: list, n, what: str) -> None:
    chk(bool(ins) and ins[0].dtype in NARROW and n.out.dtype in NARROW, f"{what} takes and gives narrow codes")
