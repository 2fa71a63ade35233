"""matmul_int: int32 accumulate of codes x codes (two activations, batched over leading axes)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import AccumulatorSpec, Attrs
from .checks import NARROW, acc_fits
from .kernels import exact_matmul


@dataclass(frozen=True, kw_only=True)
class MatmulAttrs(Attrs):
    a_zp: int = 0
    b_zp: int = 0


class MatmulInt(AccumulatorSpec):
    name = "matmul_int"
    doc = "int32 accumulate of codes x codes (two activations, batched over leading axes)"
    Attrs = MatmulAttrs

    def verify(self, n, ins, chk, ctx):
        chk(len(ins) == 2 and all(t.dtype in NARROW for t in ins), "matmul_int takes two narrow code tensors")
        ta, tb = ins
        chk(len(ta.shape) == len(tb.shape) and ta.shape[-1] == tb.shape[-2],
            f"shapes {ta.short()} and {tb.short()} do not multiply")
        chk(n.out.dtype == "int32", "accumulator output must be int32")
        chk(n.out.frac == int(ta.frac) + int(tb.frac), f"accumulator frac {n.out.frac} != f_a + f_b {int(ta.frac) + int(tb.frac)}")
        chk(n.out.mant == int(ta.mant) * int(tb.mant), "accumulator mantissa != the product of the inputs' mantissas")
        chk((n.attrs.a_zp, n.attrs.b_zp) == (ta.zp, tb.zp), "a_zp/b_zp differ from the inputs' zero points")
        acc_fits(chk, int(ta.shape[-1]) * ta.max_abs * tb.max_abs, n.out, "a dot product")

    def text(self, n, args, types):
        zps = (n.attrs.a_zp, n.attrs.b_zp)
        return [f"({t}{-z:+d})" if z else t for t, z in zip(args, zps)]

    def run(self, n, a, b, t=None):
        return exact_matmul(a - n.attrs.a_zp, b - n.attrs.b_zp, n.out.max_abs)

    def emit_requantized(self, b, acc, rq) -> None:
        """Both operands' exact values (codes times powers of two) multiplied in float64, where every
        partial sum is exact below 2**53; then the requant's rounding, in float64 as well."""
        x, y = (b.cast(b.dq(i), f"{acc.name}_{tag}_f64") for i, tag in zip(acc.inputs, "ab"))
        product = b.node("MatMul", [x, y], f"{acc.name}_f64")
        b.q_double(product, rq.out, rq.name, b.requant_factor(rq, int(acc.out.frac)))
