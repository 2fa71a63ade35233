"""The IR verifier: the invariants both backends and the exporter rely on.

Every fractional length is an integer (so every scale is an exact power of two), every rescale is a
shift equal to the difference of fractional lengths, no int32 accumulator can overflow for any input
codes in the declared ranges, and float values exist only at the graph's quantize and dequantize and
inside the float islands the target declares (which take and give codes).
On the int8 target scales are dyadic (mant * 2**-frac) and a rescale is an integer multiplier M and a
shift n: M is then the nearest integer to the true ratio of steps times 2**n, and acc * M stays exact.

This module checks what holds for every node (names, inputs, dtypes, formats); each op's own rule is
its spec's ``verify`` in fxq.ops.
"""
from __future__ import annotations

import numpy as np

from .errors import VerifyError
from .formats import DTYPE_RANGES, FRAC_LIMITS
from .ops import OPS, Op, VerifyContext
from .ops.checks import MAX_SHIFT, Check, fracs  # noqa: F401  (MAX_SHIFT: read by passes.fit_shift_range)


def _check_type(chk: Check, t, what: str) -> None:
    if t.dtype == "float32":
        return
    chk(t.dtype in DTYPE_RANGES, f"{what} has unknown dtype {t.dtype!r}")
    for f in fracs(t):
        chk(isinstance(f, (int, np.integer)) and not isinstance(f, bool),
            f"{what} fractional length {f!r} is not an integer, so its scale is not a power of two")
        chk(FRAC_LIMITS[0] <= f <= FRAC_LIMITS[1], f"{what} fractional length {f} outside {FRAC_LIMITS}")
    mant = np.atleast_1d(np.asarray(t.mant))
    chk(np.issubdtype(mant.dtype, np.integer) and bool(np.all(mant >= 1)),
        f"{what} scale mantissa {mant.tolist()} must be positive integers")
    r = DTYPE_RANGES[t.dtype]
    chk(isinstance(t.zp, (int, np.integer)) and r.lo <= t.zp <= r.hi, f"{what} zero point {t.zp!r} outside {t.dtype}")
    chk(t.lo is not None and t.hi is not None and r.lo <= t.lo <= t.hi <= r.hi,
        f"{what} code range [{t.lo}, {t.hi}] is not inside {t.dtype} [{r.lo}, {r.hi}]")


def context(g) -> VerifyContext:
    declared = str((g.target or {}).get("float islands", "-"))
    return VerifyContext(frozenset() if declared == "-" else frozenset(declared.split(",")))


def verify(g) -> None:
    """Check every node of the integer graph ``g`` (an fxq.ir.Graph); raise VerifyError naming the first
    node that breaks an invariant."""
    ctx = context(g)
    types = {g.input_name: g.input_type}
    for n in g.nodes:
        chk = Check(n)
        chk(isinstance(n.op, Op), f"unknown op {n.op!r}")
        spec = OPS[n.op]
        chk(n.name not in types, "duplicate node name")
        for i in n.inputs:
            chk(i in types, f"input %{i} is not defined before this node")
        ins = [types[i] for i in n.inputs]
        if n.out.dtype == "float32":
            chk(n.op is Op.DEQUANTIZE, "a float tensor outside the graph's dequantize (no float islands are declared)")
        if n.op is not Op.QUANTIZE:
            chk(all(t.dtype != "float32" for t in ins), "float input outside the graph's quantize")
        if not spec.reads_twin:
            chk(all(t.twin is None for t in ins), "twin codes may only be read by twin_expand")
        chk(isinstance(n.attrs, spec.Attrs), f"attributes {type(n.attrs).__name__} are not {spec.Attrs.__name__}")
        chk(n.out.dtype == "float32" or n.out.dtype in DTYPE_RANGES, f"output has unknown dtype {n.out.dtype!r}")
        spec.verify(n, ins, chk, ctx)     # op rules first: they explain *why* a range is out of bounds
        _check_type(chk, n.out, "output")
        types[n.name] = n.out
    if g.output not in types:
        raise VerifyError(f"graph output %{g.output} is not defined")
    if types[g.output].dtype != "float32":
        raise VerifyError(f"graph output %{g.output} must be dequantized to float32")
