"""twin_quant (fine codes -> b-bit twin-uniform codes: a range bit and a magnitude) and twin_expand (twin
codes -> fine codes at the small step, R2 magnitudes shifted left by m); PTQ4ViT's twin uniform format."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats import TWIN_FINE_DTYPE, Twin, exp2, storage_dtype, twin_compress, twin_expand
from .base import Attrs, OpSpec
from .checks import rounding_ok


def twin_of(t) -> Twin:
    bits, m, signed = t.twin
    return Twin(bits, m, signed)


@dataclass(frozen=True, kw_only=True)
class TwinQuantAttrs(Attrs):
    rounding: str


class TwinQuant(OpSpec):
    name = "twin_quant"
    doc = "fine codes -> b-bit twin-uniform codes (range bit + magnitude)"
    Attrs = TwinQuantAttrs

    def verify(self, n, ins, chk, ctx):
        chk(len(ins) == 1, "twin_quant takes one input")
        x = ins[0]
        rounding_ok(chk, n.attrs.rounding)
        chk(n.out.twin is not None and x.twin is None, "twin_quant turns fine codes into twin codes")
        bits = n.out.twin[0]
        fine = twin_of(n.out).fine_range
        chk(x.dtype == TWIN_FINE_DTYPE and x.lo >= fine.lo and x.hi <= fine.hi,
            f"fine codes {x.short()} [{x.lo}, {x.hi}] outside the twin's fine range [{fine.lo}, {fine.hi}]")
        chk(n.out.dtype == storage_dtype(bits, False) and (n.out.lo, n.out.hi) == (0, 2 ** bits - 1),
            f"twin codes must be u{bits}")
        chk(n.out.frac == x.frac, "twin codes keep the small step's fractional length")

    def text(self, n, args, types):
        bits, m, signed = n.out.twin
        return args + [f"{'neg' if signed else f'<{2 ** (bits - 1)}'} -> R1, else R2 >>{m} {n.attrs.rounding}"]

    def run(self, n, x, t=None):
        return twin_compress(x.astype(np.int64), twin_of(n.out))

    def emit(self, b, n):
        """fxq.formats.twin_compress as float64 ops on integer values (exact)."""
        def op(kind, *ins, tag):
            return b.node(kind, list(ins), f"{n.name}_{tag}")
        x = b.codes_f64(n.inputs[0], n.name)
        bits, m, signed = n.out.twin
        t = twin_of(n.out)
        half = b.f64(f"twin_half_{bits}", float(t.half))
        x = op("Clip", x, b.f64(f"{n.name}_fine_lo", float(t.fine_range.lo)),
               b.f64(f"{n.name}_fine_hi", float(t.fine_range.hi)), tag="fine")
        coarse = op("Round", op("Mul", x, b.f64(f"twin_down_{m}", exp2(-m)), tag="scaled"), tag="coarse")
        low = 0 if signed else t.half >> m                   # see fxq.formats.twin_compress
        r2 = op("Add", half, op("Clip", coarse, b.f64(f"twin_low_{low}", float(low)),
                                b.f64(f"twin_top_{bits}", float(t.half - 1)), tag="mag"), tag="r2")
        in_r1 = op("Less", x, b.f64("twin_zero", 0.0) if signed else half, tag="in_r1")
        r1 = op("Neg", x, tag="r1") if signed else x
        b.q_double(op("Where", in_r1, r1, r2, tag="codes"), n.out, n.name, 1.0)


class TwinExpand(OpSpec):
    name = "twin_expand"
    doc = "twin codes -> fine codes at the small step (R2 magnitudes << m)"
    reads_input_type = True
    reads_twin = True             # the one op that may read twin codes

    def verify(self, n, ins, chk, ctx):
        chk(len(ins) == 1, "twin_expand takes one input")
        x = ins[0]
        chk(x.twin is not None, "twin_expand reads twin codes")
        fine = twin_of(x).fine_range
        chk(n.out.twin is None and n.out.dtype == TWIN_FINE_DTYPE and (n.out.lo, n.out.hi) == (fine.lo, fine.hi),
            f"expanded codes must be {TWIN_FINE_DTYPE} in [{fine.lo}, {fine.hi}]")
        chk(n.out.frac == x.frac, "twin codes keep the small step's fractional length")

    def text(self, n, args, types):
        return args + [f"R2 <<{types[n.inputs[0]].twin[1]}"]

    def run(self, n, codes, t=None):
        return twin_expand(codes.astype(np.int64), twin_of(t))

    def emit(self, b, n):
        """fxq.formats.twin_expand as float64 ops on integer values (exact)."""
        def op(kind, *ins, tag):
            return b.node(kind, list(ins), f"{n.name}_{tag}")
        x = b.codes_f64(n.inputs[0], n.name)
        bits, m, signed = b.types[n.inputs[0]].twin
        half = b.f64(f"twin_half_{bits}", float(2 ** (bits - 1)))
        in_r2 = op("GreaterOrEqual", x, half, tag="in_r2")
        mag = op("Where", in_r2, op("Sub", x, half, tag="less_half"), x, tag="mag")
        r2 = op("Mul", mag, b.f64(f"twin_up_{m}", exp2(m)), tag="r2")
        r1 = op("Neg", mag, tag="r1") if signed else mag
        b.q_double(op("Where", in_r2, r2, r1, tag="fine"), n.out, n.name, 1.0)
