"""Integer-only softmax, GELU, LayerNorm, masked mean and L2 norm: fxq.int_nonlinear's kernels, written
once over an array adapter, run on int64 codes by the reference backend and traced to ONNX ops."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import int_nonlinear as inl
from .base import Attrs, NoAttrs, OpSpec
from .checks import NARROW


@dataclass(frozen=True, kw_only=True)
class SoftmaxAttrs(Attrs):
    key_mask: tuple | None = None       # (code added for valid keys, code for padding), with a token mask input


@dataclass(frozen=True, kw_only=True)
class LayerNormAttrs(Attrs):
    n: int
    var_shift: int
    eps: int
    norm_shift: int
    norm_max: int
    gamma_frac: int
    out_shift: int


class _IntNonlinear(OpSpec):
    fn: str = ""                  # fxq.int_nonlinear's function name
    reads_input_type = True
    masked = False                # reads a token mask as its second input

    def constants(self, n, x):
        raise NotImplementedError

    def verify(self, n, ins, chk, ctx):
        x = ins[0] if ins else None
        needs_mask = self.masked or getattr(n.attrs, "key_mask", None) is not None
        chk(len(ins) == (2 if needs_mask else 1), "a token mask input goes with masked_mean and a key-masked softmax")
        chk(x.dtype in NARROW and n.out.dtype in NARROW, "an integer nonlinearity takes and gives narrow codes")
        chk(x.mant == 1 and x.zp == 0 and n.out.mant == 1 and n.out.zp == 0, "needs power-of-two formats (no mantissa "
                                                                              "or zero point)")
        try:
            self.constants(n, x)
        except (ValueError, KeyError) as exc:
            chk(False, f"no integer kernel for these formats: {exc}")

    def run(self, n, x, valid=None, t=None):
        return inl.apply(self.fn, inl.NUMPY, x.astype(np.int64), self.constants(n, t), n.out.lo, n.out.hi,
                         n.consts.get("mask"), None if valid is None else valid.astype(np.int64),
                         getattr(n.attrs, "key_mask", None))

    def emit(self, b, n):
        """The kernel as float64 ops on integer values (all exact below 2**53)."""
        x = b.codes_f64(n.inputs[0], n.name)
        if "mask" in n.consts:
            bias = b.f64(f"{n.name}_mask", n.consts["mask"].astype(np.float64))
            x = b.int16_clip(b.node("Add", [x, bias], f"{n.name}_masked"))
        key_mask = getattr(n.attrs, "key_mask", None)
        if key_mask is not None:                  # per key token: the mask's code if valid, else padding's
            bias = b.key_bias(n, *(float(c) for c in key_mask))
            x = b.int16_clip(b.node("Add", [x, bias], f"{n.name}_keyed"))
        consts = self.constants(n, b.types[n.inputs[0]])
        extra = {"valid": n.inputs[1]} if self.masked else None
        codes = b.trace_int_kernel(self.fn, x, consts, n.out.lo, n.out.hi, f"{n.name}_k", extra=extra)
        b.q_double(codes, n.out, n.name, 1.0)


class SoftmaxInt(_IntNonlinear):
    name, fn = "softmax_int", "softmax"
    doc = "integer-only softmax over the last axis"
    Attrs = SoftmaxAttrs

    def constants(self, n, x):
        return inl.softmax_constants(int(x.frac), int(n.out.frac))

    def text(self, n, args, types):
        args += ["exp2 poly5, /sum"] + (["+mask"] if "mask" in n.consts else [])
        return args + ([f"key mask {n.attrs.key_mask[0]}|{n.attrs.key_mask[1]}"] if n.attrs.key_mask else [])


class GeluInt(_IntNonlinear):
    name, fn = "gelu_int", "gelu"
    doc = "integer-only GELU"
    Attrs = NoAttrs

    def constants(self, n, x):
        return inl.gelu_constants(int(x.frac), int(n.out.frac))

    def text(self, n, args, types):
        return args + ["relu - poly8"]


class LayerNormInt(_IntNonlinear):
    name, fn = "layernorm_int", "layer_norm"
    doc = "integer-only LayerNorm over the last axis (integer sqrt)"
    Attrs = LayerNormAttrs

    def constants(self, n, x):
        a = n.attrs
        return inl.LayerNormConstants(int(a.n), int(a.var_shift), int(a.eps), int(a.norm_shift), int(a.norm_max),
                                      int(a.gamma_frac), n.consts["gamma"].astype(np.int64),
                                      n.consts["beta"].astype(np.int64), int(a.out_shift))

    def verify(self, n, ins, chk, ctx):
        chk(len(ins) == 1, "layernorm_int takes one input")
        chk("gamma" in n.consts and "beta" in n.consts, "missing gamma/beta constants")
        chk(n.attrs.n == ins[0].shape[-1], f"n={n.attrs.n} != the last axis {ins[0].shape[-1]}")
        chk(n.consts["gamma"].shape == n.consts["beta"].shape == (ins[0].shape[-1],), "gamma/beta shape != the last axis")
        super().verify(n, ins, chk, ctx)

    def text(self, n, args, types):
        a = n.attrs
        return args + [f"isqrt, g:i16[{a.n}] f={a.gamma_frac}, >>{a.out_shift}"]


class MaskedMeanInt(_IntNonlinear):
    name, fn = "masked_mean_int", "masked_mean"
    doc = "integer mean over the valid tokens (axis 1), a rounded division"
    Attrs = NoAttrs
    masked = True

    def constants(self, n, x):
        return inl.masked_mean_constants(int(x.frac), int(n.out.frac))

    def text(self, n, args, types):
        return args + ["sum/count"]


class L2NormInt(_IntNonlinear):
    name, fn = "l2norm_int", "l2_normalize"
    doc = "integer x / ||x|| over the last axis (integer sqrt, rounded division)"
    Attrs = NoAttrs

    def constants(self, n, x):
        return inl.l2_normalize_constants(int(x.frac), int(n.out.frac), int(x.shape[-1]))

    def text(self, n, args, types):
        return args + ["isqrt, /norm"]
