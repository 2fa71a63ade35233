"""Reference backend: executes the integer IR in numpy, bit-exactly, one small class per op.

Codes travel as int64 arrays. Integer GEMMs run in float32 BLAS when the verifier's accumulator bound
proves every partial sum is an integer below 2**24, in float64 below 2**53, and in int64 otherwise:
each is exact, whatever order BLAS sums in.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fxq.errors import InputError
from fxq.formats import (FP32_EXACT_BITS, FP64_EXACT_BITS, IntRange, Rounding, Twin, dyadic_requant_np, quantize_np,
                         requant_np, twin_compress, twin_expand)
from fxq import islands
from fxq import int_nonlinear as inl
from fxq.ir import INT_NONLINEAR_FN, Graph, Node, Op, int_nonlinear_constants, weight_codes

BLAS_EXACT_LIMIT = 2 ** FP64_EXACT_BITS


COLUMN_BUDGET = 1 << 22          # im2col elements per chunk (32 MiB in float64)


def exact_dtype(bound: int):
    """The fastest dtype whose GEMM is exact for integer sums up to ``bound`` (the verifier's bound)."""
    if bound < 2 ** FP32_EXACT_BITS:
        return np.float32
    if bound < BLAS_EXACT_LIMIT:
        return np.float64
    return np.int64


def _to_int(acc: np.ndarray) -> np.ndarray:
    return acc.astype(np.int64) if acc.dtype == np.int64 else np.rint(acc).astype(np.int64)


def _exact_matmul(a: np.ndarray, b: np.ndarray, bound: int) -> np.ndarray:
    """a @ b for integer arrays, in the fastest dtype that is provably exact for the bound."""
    dtype = exact_dtype(bound)
    return _to_int(np.matmul(a.astype(dtype), b.astype(dtype)))


class OpRun:
    op: Op
    also: tuple = ()          # further ops the same kernel executes
    reads_input_type = False  # run() also gets t=, the first input's TensorType (its step, twin spec, ...)

    def run(self, node: Node, *xs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def out_range(node: Node) -> IntRange:
        return IntRange(node.out.lo, node.out.hi)


class Quantize(OpRun):
    op = Op.QUANTIZE

    def run(self, node, x):
        o = node.out
        return quantize_np(x.astype(np.float32), o.frac, self.out_range(node), Rounding(node.attrs["rounding"]), o.mant, o.zp)


class Dequantize(OpRun):
    op = Op.DEQUANTIZE
    reads_input_type = True

    def run(self, node, x, t=None):
        return (x.astype(np.float64) - t.zp) * t.step


class Conv2dInt(OpRun):
    """im2col + one GEMM per group, in batch chunks so the column matrix stays small."""
    op = Op.CONV2D_INT
    also = (Op.CONV2D_CLUSTER,)       # per-cluster sums times scale codes == sums with effective weights

    def run(self, node, x):
        a, w, b = node.attrs, weight_codes(node), node.consts["b"].astype(np.int64)
        (ph, pw), (sh, sw), (dh, dw), groups = a["padding"], a["stride"], a["dilation"], a["groups"]
        out_c, cg, kh, kw = w.shape
        dtype = exact_dtype(node.out.max_abs)
        oh, ow = node.out.shape[2], node.out.shape[3]
        og = out_c // groups
        wg = w.astype(dtype).reshape(groups, og, cg * kh * kw).transpose(0, 2, 1)     # [G, C/G*KH*KW, O/G]
        chunk = max(1, COLUMN_BUDGET // max(1, oh * ow * cg * kh * kw * groups))
        outs = []
        x = x - a.get("x_zp", 0)                     # products see code - zp; padding is then 0.0
        for start in range(0, x.shape[0], chunk):
            xp = np.pad(x[start:start + chunk].astype(dtype), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
            win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
            win = win[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :oh, :ow]                  # [n, C, OH, OW, KH, KW]
            n = win.shape[0]
            cols = win.reshape(n, groups, cg, oh, ow, kh * kw).transpose(1, 0, 3, 4, 2, 5).reshape(groups, n * oh * ow, -1)
            acc = np.matmul(cols, wg)                                               # [G, n*OH*OW, O/G]
            outs.append(acc.reshape(groups, n, oh, ow, og).transpose(1, 0, 4, 2, 3).reshape(n, out_c, oh, ow))
        acc = np.concatenate(outs)
        return _to_int(acc) + b[None, :, None, None]


class LinearInt(OpRun):
    op = Op.LINEAR_INT
    also = (Op.LINEAR_CLUSTER,)

    def run(self, node, x):
        w, b = weight_codes(node), node.consts["b"].astype(np.int64)
        return _exact_matmul(x - node.attrs.get("x_zp", 0), w.T, node.out.max_abs) + b


def _channels(node: Node, key: str, x: np.ndarray) -> np.ndarray:
    v = np.asarray(node.attrs[key], dtype=np.int64)
    return v.reshape((1, -1) + (1,) * (x.ndim - 2)) if v.ndim else v


def _rescale(node: Node, acc: np.ndarray) -> np.ndarray:
    """A shift (power-of-two targets) or a multiply then a shift (dyadic), round, add the zero point, clamp."""
    rng, mode = IntRange(node.out.lo, node.out.hi), Rounding(node.attrs["rounding"])
    if "multiplier" in node.attrs:
        return dyadic_requant_np(acc, _channels(node, "multiplier", acc), _channels(node, "shift", acc), node.out.zp,
                                 rng, mode)
    return requant_np(acc, _channels(node, "shift", acc), rng, mode)


class Requant(OpRun):
    op = Op.REQUANT

    def run(self, node, acc):
        return _rescale(node, acc)


class AddInt(OpRun):
    op = Op.ADD_INT

    def run(self, node, a, b):
        a, b = a.astype(np.int64), b.astype(np.int64)
        if "multipliers" in node.attrs:
            (ma, mb), (za, zb) = node.attrs["multipliers"], node.attrs["in_zp"]
            total = (a - za) * ma + (b - zb) * mb
            return dyadic_requant_np(total, 1, node.attrs["shift"], node.out.zp, self.out_range(node),
                                     Rounding(node.attrs["rounding"]))
        sa, sb = node.attrs["align"]
        total = (a << sa) + (b << sb)
        return requant_np(total, node.attrs["shift"], self.out_range(node), Rounding(node.attrs["rounding"]))


class AvgPoolInt(OpRun):
    op = Op.AVGPOOL_INT

    def run(self, node, x):
        a = node.attrs
        (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
        xp = np.pad(x - a.get("x_zp", 0), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        sums = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw].sum(axis=(-1, -2), dtype=np.int64)
        return _rescale(node, sums)


class MaxPoolInt(OpRun):
    op = Op.MAXPOOL_INT

    def run(self, node, x):
        a = node.attrs
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = a["kernel"], a["stride"], a["padding"], a["dilation"]
        if a["ceil_mode"]:
            h, w = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
            eh, ew = (-(h - (kh - 1) * dh - 1)) % sh, (-(w - (kw - 1) * dw - 1)) % sw
        else:
            eh = ew = 0
        pad_value = np.iinfo(np.int64).min          # never wins a max, like -inf in float
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph + eh), (pw, pw + ew)), constant_values=pad_value)
        win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
        oh, ow = node.out.shape[2], node.out.shape[3]
        return win.max(axis=(-1, -2))[:, :, :oh, :ow]


class ConcatInt(OpRun):
    op = Op.CONCAT_INT

    def run(self, node, *xs):
        return np.concatenate(xs, axis=node.attrs["axis"])


class PadInt(OpRun):
    op = Op.PAD_INT

    def run(self, node, x):
        p = node.attrs["pads"]                      # torch order: last dim first, (before, after) pairs
        widths = [(0, 0)] * x.ndim
        for i in range(len(p) // 2):
            widths[x.ndim - 1 - i] = (p[2 * i], p[2 * i + 1])
        return np.pad(x, widths, constant_values=node.out.zp)       # the code of 0.0


class ClampInt(OpRun):
    op = Op.CLAMP_INT

    def run(self, node, x):
        return np.clip(x, node.attrs["lo"], node.attrs["hi"])


class Reshape(OpRun):
    op = Op.RESHAPE

    def run(self, node, x):
        return x.reshape(node.attrs["shape"])


class Permute(OpRun):
    op = Op.PERMUTE

    def run(self, node, x):
        return x.transpose(node.attrs["perm"])


class Select(OpRun):
    op = Op.SELECT

    def run(self, node, x):
        return np.take(x, node.attrs["index"], axis=node.attrs["axis"])


class ExpandBatch(OpRun):
    op = Op.EXPAND_BATCH

    def run(self, node, const, like):
        return np.broadcast_to(const, (like.shape[0],) + const.shape[1:])


class Const(OpRun):
    op = Op.CONST

    def run(self, node):
        return node.consts["codes"].astype(np.int64)


class MatmulInt(OpRun):
    op = Op.MATMUL_INT

    def run(self, node, a, b):
        a, b = a - node.attrs.get("a_zp", 0), b - node.attrs.get("b_zp", 0)
        return _exact_matmul(a, b, node.out.max_abs)


class FloatIsland(OpRun):
    """Dequantize, the function in float64 (fxq.islands, as every executor computes it), quantize."""
    op = Op.FLOAT_ISLAND
    reads_input_type = True

    def run(self, node, x, valid=None, t=None):
        a = node.attrs
        v = (x.astype(np.float64) - t.zp) * t.step
        if a["fn"] == "softmax" and "on_invalid" in a:
            y = islands.softmax_np(v + islands.token_mask_bias_np(valid, a["on_valid"], a["on_invalid"]))
        elif a["fn"] == "softmax":
            y = islands.softmax_np(v, node.consts.get("mask"))
        elif a["fn"] == "masked_mean":
            y = islands.masked_mean_np(v, valid)
        elif a["fn"] == "l2_normalize":
            y = islands.l2_normalize_np(v, a["eps"])
        elif a["fn"] == "gelu":
            y = islands.gelu_np(v, a.get("approximate", "none"))
        else:
            y = islands.layer_norm_np(v, node.consts.get("weight"), node.consts.get("bias"), a["eps"])
        o = node.out
        return quantize_np(y, o.frac, self.out_range(node), Rounding(a["rounding"]), o.mant, o.zp)


class IntNonlinear(OpRun):
    """Integer-only softmax/GELU/LayerNorm/masked mean/L2 norm: fxq.int_nonlinear on int64 codes."""
    op = Op.SOFTMAX_INT
    also = (Op.GELU_INT, Op.LAYERNORM_INT, Op.MASKED_MEAN_INT, Op.L2NORM_INT)
    reads_input_type = True

    def run(self, node, x, valid=None, t=None):
        c = int_nonlinear_constants(node, t)
        return inl.apply(INT_NONLINEAR_FN[node.op], inl.NUMPY, x.astype(np.int64), c, node.out.lo, node.out.hi,
                         node.consts.get("mask"), None if valid is None else valid.astype(np.int64),
                         node.attrs.get("key_mask"))


class Gather(OpRun):
    op = Op.GATHER

    def run(self, node, ids):
        table = node.consts["table"].astype(np.int64)
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= len(table):
            raise InputError(f"token ids outside [0, {len(table)}) at IR node %{node.name}")
        return table[ids]


class TokenMask(OpRun):
    op = Op.TOKEN_MASK
    COMPARE = {"ne": np.not_equal, "eq": np.equal, "gt": np.greater, "ge": np.greater_equal, "lt": np.less,
               "le": np.less_equal}

    def run(self, node, ids):
        return self.COMPARE[node.attrs["compare"]](ids, node.attrs["value"]).astype(np.int64)


def _twin(t) -> Twin:
    bits, m, signed = t.twin
    return Twin(bits, m, signed)


class TwinQuant(OpRun):
    op = Op.TWIN_QUANT

    def run(self, node, x):
        return twin_compress(x.astype(np.int64), _twin(node.out))


class TwinExpand(OpRun):
    op = Op.TWIN_EXPAND
    reads_input_type = True

    def run(self, node, codes, t=None):
        return twin_expand(codes.astype(np.int64), _twin(t))


OPS = {op: kernel for kernel in (cls() for cls in (Quantize, Dequantize, Conv2dInt, LinearInt, Requant, AddInt,
                                                   AvgPoolInt, MaxPoolInt, ConcatInt, PadInt, ClampInt, Reshape,
                                                   Permute, Select, ExpandBatch, Const, MatmulInt, FloatIsland,
                                                   IntNonlinear, TwinQuant, TwinExpand, Gather, TokenMask))
       for op in (kernel.op, *kernel.also)}


def check_input_spec(g: Graph, shape: tuple, dtype) -> None:
    want = g.input_type.shape
    if len(shape) != len(want) or any(w is not None and w != s for w, s in zip(want, shape)):
        dims = ", ".join("N" if d is None else str(d) for d in want)
        raise InputError(f"input '{g.input_name}' has shape {list(shape)}; this model takes [{dims}]")
    if g.input_type.dtype == "int64":
        if not np.issubdtype(np.dtype(dtype), np.integer):
            raise InputError(f"input '{g.input_name}' has dtype {np.dtype(dtype)}; this model takes integer token ids")
    elif not np.issubdtype(np.dtype(dtype), np.floating):
        raise InputError(f"input '{g.input_name}' has dtype {np.dtype(dtype)}; pass float values (they are quantized inside)")


def check_input(g: Graph, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    check_input_spec(g, x.shape, x.dtype)
    return x


def execute(g: Graph, x: np.ndarray, keep: bool = False) -> dict[str, np.ndarray]:
    """Run the graph; returns the output (float64) and, with ``keep``, every tensor's codes by name."""
    env = {g.input_name: check_input(g, x)}
    types = g.types()
    for node in g.nodes:
        missing = [i for i in node.inputs if i not in env]
        if missing:
            raise InputError(f"IR node %{node.name} reads {missing}, not yet computed")
        if node.op not in OPS:
            raise NotImplementedError(f"reference backend has no kernel for op {node.op!r}; known: {sorted(o.value for o in OPS)}")
        xs = [env[i] for i in node.inputs]
        kernel = OPS[node.op]
        extra = {"t": types[node.inputs[0]]} if kernel.reads_input_type else {}
        env[node.name] = kernel.run(node, *xs, **extra)
    return env if keep else {g.output: env[g.output], "codes": env[g.output_codes().name]}


def run(g: Graph, x: np.ndarray) -> np.ndarray:
    return execute(g, x)[g.output]


def run_codes(g: Graph, x: np.ndarray) -> np.ndarray:
    """Integer codes of the tensor the graph dequantizes at its output."""
    return execute(g, x)["codes"]
