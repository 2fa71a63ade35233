"""float_island: codes -> float64 -> softmax/GELU/LayerNorm/masked mean/L2 norm -> codes, only where the
target declares the function (fxq.islands holds the formulas every executor computes)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import islands
from ..formats import Rounding, exp2, quantize_np
from .base import Attrs, OpSpec
from .checks import NARROW, rounding_ok
from .kernels import out_range


@dataclass(frozen=True, kw_only=True)
class IslandAttrs(Attrs):
    fn: str
    rounding: str
    eps: float | None = None            # layer_norm, l2_normalize
    approximate: str = "none"           # gelu: "none" (erf) or "tanh"
    on_valid: float | None = None       # softmax with a token (key) mask: the additive bias of valid keys ...
    on_invalid: float | None = None     # ... and of padding


class FloatIsland(OpSpec):
    name = "float_island"
    doc = "declared by the target: codes -> float64 -> softmax/GELU/LayerNorm -> codes"
    Attrs = IslandAttrs
    reads_input_type = True

    def verify(self, n, ins, chk, ctx):
        a = n.attrs
        needs_mask = a.fn == "masked_mean" or a.on_invalid is not None
        chk(len(ins) == (2 if needs_mask else 1), "a token mask input goes with masked_mean and a key-masked softmax")
        chk(a.fn in islands.ISLAND_FUNCTIONS, f"unknown float island function {a.fn!r}; known: {list(islands.ISLAND_FUNCTIONS)}")
        chk(a.fn in ctx.float_islands, f"the target does not declare {a.fn!r} as a float island "
                                       f"(it allows {sorted(ctx.float_islands) or 'none'})")
        rounding_ok(chk, a.rounding)
        chk(ins[0].dtype in NARROW and n.out.dtype in NARROW, "a float island takes and gives narrow codes")
        if a.fn in ("layer_norm", "l2_normalize"):
            chk(isinstance(a.eps, (int, float)) and a.eps >= 0, f"eps {a.eps!r} must be a number >= 0")
        if "mask" in n.consts:
            shape = tuple(1 if d is None else d for d in ins[0].shape)
            try:
                fits = np.broadcast_shapes(n.consts["mask"].shape, shape) == shape
            except ValueError:
                fits = False
            chk(fits, f"the softmax mask of shape {list(n.consts['mask'].shape)} does not broadcast to {ins[0].short()}")
        for k in ("weight", "bias"):
            if k in n.consts:
                chk(n.consts[k].shape == (ins[0].shape[-1],), f"LayerNorm {k} has shape {list(n.consts[k].shape)}, "
                                                               f"expected [{ins[0].shape[-1]}]")

    def text(self, n, args, types):
        a = n.attrs
        fn = a.fn + (f"[{a.approximate}]" if a.approximate != "none" else "")
        args += [f"{fn} in f64"] + ([f"key mask {a.on_valid:g}|{a.on_invalid:g}"] if a.on_invalid is not None else [])
        return args + [a.rounding, f"clamp[{n.out.lo},{n.out.hi}]"]

    def run(self, n, x, valid=None, t=None):
        a = n.attrs
        v = (x.astype(np.float64) - t.zp) * t.step
        if a.fn == "softmax" and a.on_invalid is not None:
            y = islands.softmax_np(v + islands.token_mask_bias_np(valid, a.on_valid, a.on_invalid))
        elif a.fn == "softmax":
            y = islands.softmax_np(v, n.consts.get("mask"))
        elif a.fn == "masked_mean":
            y = islands.masked_mean_np(v, valid)
        elif a.fn == "l2_normalize":
            y = islands.l2_normalize_np(v, a.eps)
        elif a.fn == "gelu":
            y = islands.gelu_np(v, a.approximate)
        else:
            y = islands.layer_norm_np(v, n.consts.get("weight"), n.consts.get("bias"), a.eps)
        o = n.out
        return quantize_np(y, o.frac, out_range(n), Rounding(a.rounding), o.mant, o.zp)

    def emit(self, b, n):
        """Dequantize, the function in float64 with fxq.islands' formula, quantize."""
        a = n.attrs
        x = b.cast(b.dq(n.inputs[0]), f"{n.name}_in_f64")
        mant = int(b.types[n.inputs[0]].mant)
        if mant != 1:                  # dq leaves a dyadic step's mantissa out; the function needs the value
            x = b.node("Mul", [x, b.f64(f"{n.name}_in_mant", float(mant))], f"{n.name}_in_value")
        if a.fn == "softmax" and a.on_invalid is not None:
            bias = b.key_bias(n, a.on_valid, a.on_invalid)
            y = b.node("Softmax", [b.node("Add", [x, bias], f"{n.name}_masked")], f"{n.name}_f64", axis=-1)
        elif a.fn == "masked_mean":
            m = b.node("Unsqueeze", [n.inputs[1], b.axes(-1)], f"{n.name}_m")
            total = b.node("ReduceSum", [b.node("Mul", [x, m], f"{n.name}_xm"), b.axes(1)], f"{n.name}_sum", keepdims=0)
            count = b.node("ReduceSum", [m, b.axes(1)], f"{n.name}_count", keepdims=0)
            count = b.node("Max", [count, b.f64("one_f64", 1.0)], f"{n.name}_count_1")
            y = b.node("Div", [total, count], f"{n.name}_f64")
        elif a.fn == "l2_normalize":
            sq = b.node("ReduceSum", [b.node("Mul", [x, x], f"{n.name}_sq"), b.axes(-1)], f"{n.name}_sumsq", keepdims=1)
            norm = b.node("Max", [b.node("Sqrt", [sq], f"{n.name}_norm"), b.f64(f"{n.name}_eps", a.eps)],
                          f"{n.name}_norm_eps")
            y = b.node("Div", [x, norm], f"{n.name}_f64")
        elif a.fn == "softmax":
            if "mask" in n.consts:
                x = b.node("Add", [x, b.f64(f"{n.name}_mask", n.consts["mask"])], f"{n.name}_masked")
            y = b.node("Softmax", [x], f"{n.name}_f64", axis=-1)
        elif a.fn == "layer_norm":
            width = b.types[n.inputs[0]].shape[-1]
            w = n.consts.get("weight", np.ones(width))
            bias = n.consts.get("bias", np.zeros(width))
            y = b.node("LayerNormalization", [x, b.f64(f"{n.name}_weight", w), b.f64(f"{n.name}_bias", bias)],
                       f"{n.name}_f64", axis=-1, epsilon=float(a.eps))
        else:
            y = _gelu(b, x, n.name, a.approximate)
        out = n.out
        if out.dyadic:
            y = b.node("Mul", [y, b.f64(f"{n.name}_pow2", exp2(out.frac))], f"{n.name}_times_pow2")
            b.q_double(b.node("Div", [y, b.f64(f"{n.name}_mant", out.mant)], f"{n.name}_over_mant"), out, n.name, 1.0)
        else:
            b.q_double(y, out, n.name, exp2(out.frac))


def _gelu(b, x: str, name: str, approximate: str) -> str:
    """fxq.islands' GELU, op for op in the same order (ONNX Runtime has no float64 Erf)."""
    k = iter(range(100))

    def op(kind, *ins):
        return b.node(kind, list(ins), f"{name}_gelu{next(k)}")

    def c(v):
        return b.f64(f"gelu_c_{v!r}".replace("-", "m").replace(".", "p"), v)
    if approximate == "tanh":
        cube = op("Mul", op("Mul", op("Mul", c(islands.GELU_TANH_K), x), x), x)
        inner = op("Mul", c(islands.GELU_TANH_C), op("Add", x, cube))
        return op("Mul", op("Mul", c(0.5), x), op("Add", c(1.0), op("Tanh", inner)))
    z = op("Mul", x, c(islands.SQRT_HALF))
    az = op("Abs", z)
    t = op("Div", c(1.0), op("Add", c(1.0), op("Mul", c(islands.ERF_P), az)))
    poly = c(islands.ERF_A[4])
    for a in islands.ERF_A[3::-1]:
        poly = op("Add", c(a), op("Mul", t, poly))
    y = op("Sub", c(1.0), op("Mul", op("Mul", t, poly), op("Exp", op("Neg", op("Mul", az, az)))))
    erf = op("Where", op("Less", z, c(0.0)), op("Neg", y), y)
    return op("Mul", op("Mul", c(0.5), x), op("Add", c(1.0), erf))
