"""conv2d_int, linear_int and their cluster forms: int32 accumulation of codes x constant weights, + bias.

A cluster op holds ternary or 4-bit codes ``t`` and one scale code ``alpha`` per cluster of N input
channels; integer sums are associative, so the effective weights t * alpha give exactly the per-cluster
sums times their scales (weight_codes), and backends may use either form.

ONNX form: the accumulator is emitted with the requant that reads it (``emit_requantized``): a QDQ
Conv/Gemm whose float32 sums are exact below 2**24, or, past that bound, float32 partial sums over
input-channel slices that each stay below it, added in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..clusters import expand
from ..errors import ExportError
from ..formats import FP32_EXACT_BITS, int_range
from .base import AccumulatorSpec, Attrs
from .checks import NARROW, acc_fits, codes_in, fracs, is_int, positive_pair
from .kernels import exact_dtype, exact_matmul, to_int
from .text import frac_text, pair_text

COLUMN_BUDGET = 1 << 22          # im2col elements per chunk (32 MiB in float64)
FP32_EXACT_LIMIT = 2**FP32_EXACT_BITS
INT16_MAX = 2**15 - 1
ACT_CODE_SPAN = 255      # largest |code| an int8 kernel may see after re-biasing activations to u8


@dataclass(frozen=True, kw_only=True)
class LinearAttrs(Attrs):
    w_bits: int
    w_frac: tuple                   # per output channel
    w_mant: tuple | None = None     # int8 target: per-channel integer mantissas of the weight step
    w_full_range: bool = False      # codes reach -2**(w_bits-1)
    x_zp: int = 0                   # the input's zero point: products see code - zp


@dataclass(frozen=True, kw_only=True)
class ConvAttrs(LinearAttrs):
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int


@dataclass(frozen=True, kw_only=True)
class ClusterLinearAttrs(LinearAttrs):
    cluster_size: int
    alpha_bits: int


@dataclass(frozen=True, kw_only=True)
class ClusterConvAttrs(ConvAttrs):
    cluster_size: int
    alpha_bits: int


def weight_codes(n) -> np.ndarray:
    """The integer weights a weighted node multiplies by (int64): for a cluster op, code * scale code."""
    if isinstance(n.attrs, (ClusterLinearAttrs, ClusterConvAttrs)):
        t = n.consts["t"].astype(np.int64)
        return t * expand(n.consts["alpha"].astype(np.int64), t.shape, int(n.attrs.cluster_size))
    return n.consts["w"].astype(np.int64)


class _Weighted(AccumulatorSpec):
    weighted = True

    def verify(self, n, ins, chk, ctx):
        a = n.attrs
        chk(len(ins) == 1, "takes one input")
        x = ins[0]
        if self.cluster:
            self._verify_clusters(n, chk)
        w, b = n.consts.get("t" if self.cluster else "w"), n.consts.get("b")
        chk(w is not None and b is not None, "missing weight or bias constants")
        chk(x.dtype in NARROW, f"input dtype {x.dtype} is not a narrow code type")
        chk(is_int(a.w_bits) and 2 <= a.w_bits <= 16, f"w_bits {a.w_bits!r} outside [2, 16]")
        codes_in(chk, w, int_range(a.w_bits, signed=True, symmetric=not a.w_full_range), f"{a.w_bits}-bit weight codes")
        chk(b.dtype == np.int32 and b.shape == (w.shape[0],), f"bias must be int32[{w.shape[0]}], got {b.dtype}{list(b.shape)}")
        chk(n.out.dtype == "int32", "accumulator output must be int32")
        chk(isinstance(a.w_frac, tuple) and len(a.w_frac) == w.shape[0] and all(is_int(f) for f in a.w_frac),
            f"w_frac must hold one integer per output channel ({w.shape[0]})")
        expected = tuple(int(x.frac) + int(f) for f in a.w_frac)
        chk(tuple(fracs(n.out)) == expected, f"accumulator frac {fracs(n.out)} != f_x + f_w {list(expected)}")
        w_mant = np.asarray(1 if a.w_mant is None else a.w_mant, np.int64)
        chk(bool(np.all(n.out.mant_array == w_mant * int(x.mant))), "accumulator mantissa != input mantissa x weight mantissa")
        chk(a.x_zp == x.zp, f"x_zp {a.x_zp} != the input's zero point {x.zp}")
        in_ch = x.shape[1]
        if self.conv:
            g = a.groups
            for what in ("stride", "dilation"):
                positive_pair(chk, getattr(a, what), what)
            positive_pair(chk, a.padding, "padding", minimum=0)
            chk(is_int(g) and g >= 1, f"groups {g!r} must be a positive integer")
            chk(w.ndim == 4 and w.shape[1] * g == in_ch and w.shape[0] % g == 0,
                f"weight shape {list(w.shape)} with groups={g} does not fit {in_ch} input channels")
        else:
            chk(w.ndim == 2 and w.shape[1] == x.shape[-1], f"weight shape {list(w.shape)} does not fit input {list(x.shape)}")
        l1 = np.abs(weight_codes(n)).reshape(w.shape[0], -1).sum(axis=1)
        acc_fits(chk, l1 * x.max_abs + np.abs(b.astype(np.int64)), n.out, "a per-channel sum")

    @staticmethod
    def _verify_clusters(n, chk):
        t, alpha = n.consts.get("t"), n.consts.get("alpha")
        chk(t is not None and alpha is not None, "missing cluster codes 't' or scale codes 'alpha'")
        block = n.attrs.cluster_size
        chk(is_int(block) and block >= 1, f"cluster_size {block!r} must be a positive integer")
        expected = (t.shape[0], -(-t.shape[1] // block))
        chk(alpha.shape == expected, f"scale codes have shape {list(alpha.shape)}, expected {list(expected)} "
                                     f"(one per cluster of {block} input channels)")
        codes_in(chk, alpha, int_range(n.attrs.alpha_bits, signed=False), f"{n.attrs.alpha_bits}-bit scale codes")

    def text(self, n, args, types):
        a = n.attrs
        if self.cluster:
            t, alpha = n.consts["t"], n.consts["alpha"]
            codes = "tern" if a.w_bits == 2 else f"i{a.w_bits}"
            args.append(f"t:{codes}[{','.join(map(str, t.shape))}]")
            args.append(f"sum/{a.cluster_size}ch x a:u{a.alpha_bits}[{','.join(map(str, alpha.shape))}] "
                        f"f={frac_text(a.w_frac)}")
        else:
            step = f"f={frac_text(a.w_frac)}"
            if a.w_mant is not None:
                step = f"s={frac_text(a.w_mant)}*2^-{frac_text(a.w_frac)}"
            args.append(f"w:i{a.w_bits}[{','.join(map(str, n.consts['w'].shape))}] {step}")
        args.append(f"b:i32 f={frac_text(n.out.frac)}")
        if self.conv:
            args += [f"s={pair_text(a.stride)}", f"p={pair_text(a.padding)}"]
            args += [f"d={pair_text(a.dilation)}"] if tuple(a.dilation) != (1, 1) else []
            args += [f"g={a.groups}"] if a.groups != 1 else []
        return args

    # -- ONNX: the accumulator with the requant that reads it ---------------------------------------
    def emit_requantized(self, b, acc, rq) -> None:
        bias, acc_frac = acc.consts["b"], tuple(int(f) for f in acc.out.frac)
        parts = exact_parts(acc, b.types[acc.inputs[0]])
        if len(parts) == 1 and rq.attrs.multiplier is None:
            x, wd = b.dq(acc.inputs[0]), self.weight_dq(b, acc)
            zb = b.const(f"{acc.name}_b_zp", np.zeros(len(acc_frac), np.int32))
            bq = b.const(f"{acc.name}_b", bias.astype(np.int32))
            bd = b.node("DequantizeLinear", [bq, b.scale(acc_frac), zb], f"{acc.name}_b_dq", axis=0)
            b.q(self.product(b, acc, x, wd, acc.name, bias=bd), rq.out, rq.name)
            return
        # Accumulators that may pass 2**24: float32 partial sums over input-channel slices, each provably
        # below 2**24 (so exact), added in float64 with the bias, then rounded in float64.
        sums = []
        codes = acc.inputs[0]
        for i, (lo, hi) in enumerate(parts):
            if len(parts) == 1:               # whole (a grouped conv's weights index channels per group)
                xs, ws = b.dq(codes), self.weight_dq(b, acc)
            else:
                xs = b.dq_of(b.slice(codes, lo, hi, f"{acc.name}_x{i}"), b.types[codes])
                ws = self.weight_dq(b, acc, lo, hi, tag=f"_part{i}")
            y = self.product(b, acc, xs, ws, f"{acc.name}_part{i}")
            sums.append(b.cast(y, f"{acc.name}_part{i}_f64"))
        fbias = bias.astype(np.float64) * np.exp2(-np.asarray(acc_frac, np.float64))
        fbias = fbias.reshape((-1,) + (1,) * (len(acc.out.shape) - 2))
        sums.append(b.const(f"{acc.name}_b_f64", fbias))
        total = b.node("Sum", sums, f"{acc.name}_f64")
        b.q_double(total, rq.out, rq.name, b.requant_factor(rq, acc_frac))

    def weight_dq(self, b, acc, lo: int = 0, hi: int | None = None, tag: str = "") -> str:
        """Float weights of input channels [lo, hi) (exact: codes times power-of-two or 8-bit fixed-point
        scales) for Conv/Gemm. Slicing happens on the constants, never between a DequantizeLinear and its use."""
        w_frac = tuple(int(f) for f in acc.attrs.w_frac)
        if self.cluster:
            return self.cluster_dq(b, acc, w_frac, lo, hi, tag)
        w = acc.consts["w"][:, lo:hi]
        if w.dtype not in (np.int8, np.int16):
            raise ExportError(f"IR node %{acc.name}: {w.dtype} weights have no QDQ form here")
        if not int8_kernel_safe(w):
            w = w.astype(np.int16)
        zw = b.const(f"{acc.name}_w{tag}_zp", np.zeros(len(w_frac), w.dtype))
        wq = b.const(f"{acc.name}_w{tag}", w)
        return b.node("DequantizeLinear", [wq, b.scale(w_frac), zw], f"{acc.name}_w{tag}_dq", axis=0)

    @staticmethod
    def cluster_dq(b, acc, w_frac: tuple, lo: int, hi: int | None, tag: str) -> str:
        """Blocked DequantizeLinear: codes along the input-channel axis in blocks of the cluster size, each
        block with its own scale alpha_code * 2**-frac (an 8-bit mantissa: exact in float32)."""
        block = int(acc.attrs.cluster_size)
        t = acc.consts["t"][:, lo:hi]
        alpha = acc.consts["alpha"][:, lo // block:None if hi is None else -(-hi // block)].astype(np.float64)
        unit = np.exp2(-np.asarray(w_frac, np.float64))[:, None]
        # DequantizeLinear forbids a zero scale; a cluster whose scale code is 0 has all-zero codes anyway
        scale = np.where(alpha == 0, 1.0, alpha) * unit                               # [O, clusters]
        scale = np.broadcast_to(scale.reshape(scale.shape + (1,) * (t.ndim - 2)), scale.shape + t.shape[2:])
        sq = b.const(f"{acc.name}_alpha{tag}", scale.astype(np.float32))
        tq = b.const(f"{acc.name}_t{tag}", t.astype(np.int8))
        zq = b.const(f"{acc.name}_t{tag}_zp", np.zeros(scale.shape, np.int8))
        return b.node("DequantizeLinear", [tq, sq, zq], f"{acc.name}_w{tag}_dq", axis=1, block_size=block)

    def product(self, b, acc, x: str, w: str, name: str, bias: str | None = None) -> str:
        ins = [x, w] + ([bias] if bias else [])
        if self.conv:
            a = acc.attrs
            ph, pw = a.padding
            return b.node("Conv", ins, name, strides=list(a.stride), pads=[ph, pw, ph, pw],
                          dilations=list(a.dilation), group=int(a.groups))
        return b.node("Gemm", ins, name, transB=1)


class Conv2dInt(_Weighted):
    name = "conv2d_int"
    doc = "int32 accumulate of codes x weight codes over a window, + int32 bias"
    Attrs = ConvAttrs
    conv = True

    def run(self, n, x, t=None):
        """im2col + one GEMM per group, in batch chunks so the column matrix stays small."""
        a, w, bias = n.attrs, weight_codes(n), n.consts["b"].astype(np.int64)
        (ph, pw), (sh, sw), (dh, dw), groups = a.padding, a.stride, a.dilation, a.groups
        out_c, cg, kh, kw = w.shape
        dtype = exact_dtype(n.out.max_abs)
        oh, ow = n.out.shape[2], n.out.shape[3]
        og = out_c // groups
        wg = w.astype(dtype).reshape(groups, og, cg * kh * kw).transpose(0, 2, 1)     # [G, C/G*KH*KW, O/G]
        chunk = max(1, COLUMN_BUDGET // max(1, oh * ow * cg * kh * kw * groups))
        outs = []
        x = x - a.x_zp                               # products see code - zp; padding is then 0.0
        for start in range(0, x.shape[0], chunk):
            xp = np.pad(x[start:start + chunk].astype(dtype), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
            win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
            win = win[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :oh, :ow]                  # [n, C, OH, OW, KH, KW]
            m = win.shape[0]
            cols = win.reshape(m, groups, cg, oh, ow, kh * kw).transpose(1, 0, 3, 4, 2, 5).reshape(groups, m * oh * ow, -1)
            acc = np.matmul(cols, wg)                                               # [G, n*OH*OW, O/G]
            outs.append(acc.reshape(groups, m, oh, ow, og).transpose(1, 0, 4, 2, 3).reshape(m, out_c, oh, ow))
        return to_int(np.concatenate(outs)) + bias[None, :, None, None]


class LinearInt(_Weighted):
    name = "linear_int"
    doc = "int32 accumulate of a matrix product of codes x weight codes, + int32 bias"
    Attrs = LinearAttrs

    def run(self, n, x, t=None):
        w, bias = weight_codes(n), n.consts["b"].astype(np.int64)
        return exact_matmul(x - n.attrs.x_zp, w.T, n.out.max_abs) + bias


class Conv2dCluster(Conv2dInt):
    name = "conv2d_cluster"
    doc = "per cluster of N input channels: sum of code x input (adds for ternary), times the cluster's scale"
    Attrs = ClusterConvAttrs
    cluster = True


class LinearCluster(LinearInt):
    name = "linear_cluster"
    doc = "linear_int with cluster codes and per-cluster scale codes"
    Attrs = ClusterLinearAttrs
    cluster = True


def exact_parts(acc, x) -> list[tuple[int, int]]:
    """Input-channel slices of a weighted node whose partial sums provably stay within 2**24 (float32 exact).

    One slice when the whole accumulator fits; otherwise greedy contiguous slices. Grouped convolutions
    are not sliced (their channels interleave groups): they must fit whole.
    """
    w = np.abs(weight_codes(acc)).astype(np.float64)
    cols = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2) * x.max_abs          # [O, C]
    if cols.sum(axis=1).max() <= FP32_EXACT_LIMIT:
        return [(0, w.shape[1])]
    if getattr(acc.attrs, "groups", 1) != 1:
        raise ExportError(f"IR node %{acc.name}: a grouped convolution whose accumulator can pass 2**24; ONNX "
                          f"Runtime's float32 Conv could round it")
    unit = int(getattr(acc.attrs, "cluster_size", 1))       # slices keep clusters whole ...
    unit = 1 if unit >= w.shape[1] else unit               # ... unless one cluster spans the filter
    parts, start, running = [], 0, np.zeros(w.shape[0])
    for c in range(0, w.shape[1], unit):
        col = cols[:, c:c + unit].sum(axis=1)
        if col.max() > FP32_EXACT_LIMIT:
            raise ExportError(f"IR node %{acc.name}: input channels {c}..{c + unit - 1} alone can pass 2**24")
        if (running + col).max() > FP32_EXACT_LIMIT:
            parts.append((start, c))
            start, running = c, np.zeros(w.shape[0])
        running += col
    return parts + [(start, w.shape[1])]


def int8_kernel_safe(w: np.ndarray) -> bool:
    """True when no pair of products of a filter can saturate an int16 (ORT's u8s8/s8s8 kernels)."""
    mags = np.sort(np.abs(w.astype(np.int64)).reshape(w.shape[0], -1), axis=1)
    top2 = mags[:, -2:].sum(axis=1) if mags.shape[1] > 1 else mags[:, -1]
    return bool(np.all(ACT_CODE_SPAN * top2 <= INT16_MAX))
