"""add_int: two code tensors aligned by left shifts (or dyadic multipliers), added in int32, requantized."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats import Rounding, dyadic_requant_np, exp2, requant_np
from .base import Attrs, OpSpec
from .checks import NARROW, acc_fits, multiplier_ok, rounding_ok, same_step, shift_ok
from .kernels import out_range
from .requant import rescale_text


@dataclass(frozen=True, kw_only=True)
class AddAttrs(Attrs):
    shift: int
    rounding: str
    align: tuple | None = None          # power-of-two targets: left shift of each input to the common frac
    multipliers: tuple | None = None    # dyadic targets: each input's integer multiplier ...
    in_zp: tuple | None = None          # ... after its zero point is taken off


class AddInt(OpSpec):
    name = "add_int"
    doc = "align by left shifts (or multipliers), add in int32, then requant"
    Attrs = AddAttrs
    requantizing = True

    def verify(self, n, ins, chk, ctx):
        a = n.attrs
        chk(len(ins) == 2 and all(t.dtype in NARROW for t in ins), "add_int takes two narrow code tensors")
        rounding_ok(chk, a.rounding)
        chk((a.align is None) != (a.multipliers is None), "add_int has either align shifts or multipliers")
        if a.multipliers is not None:
            chk(a.in_zp is not None and tuple(a.in_zp) == tuple(t.zp for t in ins),
                f"in_zp {a.in_zp} != the inputs' zero points")
            for t, m in zip(ins, a.multipliers):
                multiplier_ok(chk, m, a.shift, t.step / n.out.step, 2 * t.max_abs)
            acc_fits(chk, sum(t.max_abs * m for t, m in zip(ins, a.multipliers)), None, "the scaled sum")
            return
        for t in ins:
            same_step(chk, t, n.out)
        common = max(int(t.frac) for t in ins)
        chk(tuple(a.align) == tuple(common - int(t.frac) for t in ins), f"align shifts {a.align} do not reach frac {common}")
        shift_ok(chk, a.shift, common - int(n.out.frac))
        acc_fits(chk, sum(t.max_abs << s for t, s in zip(ins, a.align)), None, "the aligned sum")

    def text(self, n, args, types):
        a = n.attrs
        if a.multipliers is not None:
            args = [f"({t}{-z:+d}) x{m}" if z else f"{t} x{m}" for t, z, m in zip(args, a.in_zp, a.multipliers)]
        else:
            args = [f"{t} <<{s}" if s else t for t, s in zip(args, a.align)]
        return rescale_text(n, args)

    def run(self, n, x, y, t=None):
        a = n.attrs
        x, y = x.astype(np.int64), y.astype(np.int64)
        if a.multipliers is not None:
            (mx, my), (zx, zy) = a.multipliers, a.in_zp
            total = (x - zx) * mx + (y - zy) * my
            return dyadic_requant_np(total, 1, a.shift, n.out.zp, out_range(n), Rounding(a.rounding))
        sx, sy = a.align
        return requant_np((x << sx) + (y << sy), a.shift, out_range(n), Rounding(a.rounding))

    def emit(self, b, n):
        a = n.attrs
        if a.multipliers is None:
            total = b.node("Add", [b.dq(n.inputs[0]), b.dq(n.inputs[1])], f"{n.name}_sum")
            b.q(total, n.out, n.name)
            return
        terms = []
        for i, (x, m) in enumerate(zip(n.inputs, a.multipliers)):
            codes = b.cast(b.dq_of(x, b.types[x], 0, f"_{n.name}_int"), f"{n.name}_in{i}_f64")
            terms.append(b.node("Mul", [codes, b.f64(f"{n.name}_m{i}", m * exp2(-a.shift))], f"{n.name}_in{i}_scaled"))
        b.q_double(b.node("Add", terms, f"{n.name}_sum"), n.out, n.name, 1.0)
