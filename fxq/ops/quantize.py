"""quantize (the float graph input -> codes) and dequantize (codes -> the float graph output)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats import Rounding, exp2, quantize_np
from .base import Attrs, OpSpec
from .checks import NARROW, rounding_ok
from .kernels import out_range


@dataclass(frozen=True, kw_only=True)
class QuantizeAttrs(Attrs):
    rounding: str


class Quantize(OpSpec):
    name = "quantize"
    doc = "float input -> codes: round(x * 2**frac), saturate"
    Attrs = QuantizeAttrs

    def verify(self, n, ins, chk, ctx):
        chk(len(ins) == 1 and ins[0].dtype == "float32", "quantize takes the float graph input")
        chk(n.out.dtype in NARROW, "quantize must produce narrow codes")
        rounding_ok(chk, n.attrs.rounding)

    def text(self, n, args, types):
        return args + [n.attrs.rounding]

    def run(self, n, x, t=None):
        o = n.out
        return quantize_np(x.astype(np.float32), o.frac, out_range(n), Rounding(n.attrs.rounding), o.mant, o.zp)

    def emit(self, b, n):
        if not n.out.dyadic:
            b.q(b.tensor(n.inputs[0]), n.out, n.name)
            return
        x = b.cast(b.tensor(n.inputs[0]), f"{n.name}_f64")
        x = b.node("Mul", [x, b.f64(f"{n.name}_pow2", exp2(n.out.frac))], f"{n.name}_times_pow2")
        x = b.node("Div", [x, b.f64(f"{n.name}_mant", n.out.mant)], f"{n.name}_over_mant")
        b.q_double(x, n.out, n.name, 1.0)


class Dequantize(OpSpec):
    name = "dequantize"
    doc = "codes -> the float output"
    reads_input_type = True

    def verify(self, n, ins, chk, ctx):
        chk(len(ins) == 1 and ins[0].dtype in NARROW, "dequantize takes narrow codes")
        chk(n.out.dtype == "float32", "dequantize produces float32")

    def run(self, n, x, t=None):
        return (x.astype(np.float64) - t.zp) * t.step

    def emit(self, b, n):
        t = b.types[n.inputs[0]]
        step = b.const(f"step_{n.inputs[0]}", np.array(t.step, np.float32))      # mant < 2**12: exact
        b.node("DequantizeLinear", [n.inputs[0], step, b.zero_point(t.dtype, t.zp)], b.output_name)
