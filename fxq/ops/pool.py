"""avgpool_int (window sum, a shift by log2 of the divisor, requant) and maxpool_int (max of codes)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..formats import exp2
from .base import Attrs, OpSpec
from .checks import NARROW, acc_fits, is_int, multiplier_ok, positive_pair, rounding_ok, same_step, shift_ok
from .kernels import rescale
from .layout import same_format_ok
from .requant import rescale_text
from .text import pair_text


@dataclass(frozen=True, kw_only=True)
class AvgPoolAttrs(Attrs):
    kernel: tuple
    stride: tuple
    padding: tuple
    divisor_log2: int               # the window's divisor is 2**divisor_log2 (a shift)
    shift: int
    rounding: str
    multiplier: int | None = None   # dyadic targets: the sum times M >> shift
    x_zp: int = 0


@dataclass(frozen=True, kw_only=True)
class MaxPoolAttrs(Attrs):
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    ceil_mode: bool


def _window_ok(chk, a) -> None:
    positive_pair(chk, a.kernel, "kernel")
    positive_pair(chk, a.stride, "stride")
    positive_pair(chk, a.padding, "padding", minimum=0)


class AvgPoolInt(OpSpec):
    name = "avgpool_int"
    doc = "window sum, divide by 2**k as a shift, requant"
    Attrs = AvgPoolAttrs
    requantizing = True

    def verify(self, n, ins, chk, ctx):
        a = n.attrs
        chk(len(ins) == 1 and ins[0].dtype in NARROW, "avgpool_int takes narrow codes")
        _window_ok(chk, a)
        rounding_ok(chk, a.rounding)
        chk(is_int(a.divisor_log2) and a.divisor_log2 >= 0, f"divisor_log2 {a.divisor_log2!r} must be >= 0")
        window = a.kernel[0] * a.kernel[1] * ins[0].max_abs
        acc_fits(chk, window, None, "the window sum")
        chk(a.x_zp == ins[0].zp, f"x_zp {a.x_zp} != the input's zero point {ins[0].zp}")
        if a.multiplier is not None:
            ratio = ins[0].step * 2.0 ** -int(a.divisor_log2) / n.out.step
            multiplier_ok(chk, a.multiplier, a.shift, ratio, window)
            return
        same_step(chk, ins[0], n.out)
        shift_ok(chk, a.shift, int(ins[0].frac) + int(a.divisor_log2) - int(n.out.frac))

    def text(self, n, args, types):
        return rescale_text(n, args + [f"k={pair_text(n.attrs.kernel)} sum/2^{n.attrs.divisor_log2}"])

    def run(self, n, x, t=None):
        a = n.attrs
        (kh, kw), (sh, sw), (ph, pw) = a.kernel, a.stride, a.padding
        xp = np.pad(x - a.x_zp, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        sums = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw].sum(axis=(-1, -2), dtype=np.int64)
        return rescale(n, sums)

    def emit(self, b, n):
        """Window sum times 2**-k as a depthwise QDQ Conv with weight codes 1 at scale 2**-k.

        Float constant weights are not safe: ONNX Runtime quantizes them itself, with a scale that is
        not a power of two. Integer codes of 1 leave it nothing to approximate.
        """
        a, x = n.attrs, b.types[n.inputs[0]]
        channels = x.shape[1]
        kh, kw = a.kernel
        dyadic = a.multiplier is not None
        ones = b.const(f"{n.name}_window", np.ones((channels, 1, kh, kw), np.int8))
        zero = b.const("zp_weight", np.array(0, np.int8))
        k = 0 if dyadic else a.divisor_log2          # dyadic: sum the integers, the multiplier divides
        window = b.node("DequantizeLinear", [ones, b.scale(k), zero], f"{n.name}_window_dq")
        ph, pw = a.padding
        xd = b.dq_of(n.inputs[0], x, 0, f"_{n.name}_int") if dyadic else b.dq(n.inputs[0])
        y = b.node("Conv", [xd, window], f"{n.name}_sum", group=channels,
                   kernel_shape=[kh, kw], strides=list(a.stride), pads=[ph, pw, ph, pw])
        if not dyadic:
            b.q(y, n.out, n.name)
            return
        b.q_double(b.cast(y, f"{n.name}_sum_f64"), n.out, n.name, a.multiplier * exp2(-a.shift))


class MaxPoolInt(OpSpec):
    name = "maxpool_int"
    doc = "max of codes (same format in and out)"
    Attrs = MaxPoolAttrs
    same_format = True

    def verify(self, n, ins, chk, ctx):
        _window_ok(chk, n.attrs)
        positive_pair(chk, n.attrs.dilation, "dilation")
        same_format_ok(chk, n, ins)

    def text(self, n, args, types):
        a = n.attrs
        return args + [f"k={pair_text(a.kernel)} s={pair_text(a.stride)} p={pair_text(a.padding)}"]

    def run(self, n, x, t=None):
        a = n.attrs
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = a.kernel, a.stride, a.padding, a.dilation
        if a.ceil_mode:
            h, w = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
            eh, ew = (-(h - (kh - 1) * dh - 1)) % sh, (-(w - (kw - 1) * dw - 1)) % sw
        else:
            eh = ew = 0
        pad_value = np.iinfo(np.int64).min          # never wins a max, like -inf in float
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph + eh), (pw, pw + ew)), constant_values=pad_value)
        win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
        oh, ow = n.out.shape[2], n.out.shape[3]
        return win.max(axis=(-1, -2))[:, :, :oh, :ow]

    def emit(self, b, n):
        a = n.attrs
        ph, pw = a.padding
        b.node("MaxPool", [n.inputs[0]], n.name, kernel_shape=list(a.kernel), strides=list(a.stride),
               pads=[ph, pw, ph, pw], dilations=list(a.dilation), ceil_mode=int(a.ceil_mode))
