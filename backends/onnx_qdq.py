"""ONNX QDQ exporter: the integer IR as a QuantizeLinear/DequantizeLinear model ONNX Runtime runs exactly.

Every narrow tensor is an ONNX int8 tensor with scale 2**-frac. Unsigned codes 0..255 travel as int8
with zero point -128 (same values): with uint8 activations ONNX Runtime fuses Conv into a u8s8 kernel
whose int16 pairwise sums saturate on CPUs without AVX-VNNI (DESIGN §3), while s8s8 is exact under the
default session options; tests/test_exact.py covers full-range codes.

ORT's fused integer kernels are still not trusted in general: on these CPUs a QLinearConv with s8
activations was found off by a code (a 1x1 conv with 4 input channels; hypothesis found it). So a layer
goes to ORT's int8 kernels only where no int16 pairwise sum can saturate, i.e. 255 * (the two largest
|weight codes| of a filter) <= 32767; otherwise its weight codes travel as int16, which ORT has no
integer kernel for, and it runs DequantizeLinear -> float Conv/Gemm -> QuantizeLinear: exact below 2**24.

Exactness rests on two facts the verifier supplies: every scale is a power of two, and every
accumulator stays below 2**24, so ORT's float32 requantization and float32 fallback paths hold
the exact integer. Clamps narrower than the dtype are Clip nodes on exact float values (rounding is
monotonic, so clip-then-round equals round-then-clip).

The int8 target's dyadic scales (mant * 2**-frac) and zero points export the same way: tensors are
dequantized at the power-of-two part of their step (so float32 sums stay exact integers times 2**-f),
and each requant is float64 arithmetic that is exact by the verifier's bounds: Mul by M * 2**-n, Round
(half to even), Add the zero point, Clip, Cast. Only the graph's output uses the true step.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fxq import int_nonlinear as inl
from fxq import islands
from fxq.errors import ExportError
from fxq.formats import DTYPE_RANGES, FP32_EXACT_BITS, Twin, codes_of, exp2, onnx_exact_rounding
from fxq.ir import (CLUSTER_OPS, CONV_OPS, INT_NONLINEAR_FN, WEIGHTED_OPS, Graph, Node, Op, TensorType,
                    int_nonlinear_constants, weight_codes)

from . import onnx_int_nonlinear

OPSET = 21
IR_VERSION = 10
ONNX_INPUT = "input"
ONNX_OUTPUT = "output"
# How each IR code dtype travels in ONNX: (ONNX element type, numpy dtype, zero point).
CARRIERS = {"int8": (TensorProto.INT8, np.int8, 0), "uint8": (TensorProto.INT8, np.int8, -128),
            "int16": (TensorProto.INT16, np.int16, 0),        # twin-uniform fine codes, wide outputs
            "uint16": (TensorProto.INT16, np.int16, -32768)}  # wide outputs after a ReLU
INT16_MAX = 2**15 - 1
FP32_EXACT_LIMIT = 2**FP32_EXACT_BITS
ACT_CODE_SPAN = 255      # largest |code| an int8 kernel may see after re-biasing activations to u8


def exact_parts(acc: Node, x: TensorType) -> list[tuple[int, int]]:
    """Input-channel slices of a weighted node whose partial sums provably stay within 2**24 (float32 exact).

    One slice when the whole accumulator fits; otherwise greedy contiguous slices. Grouped convolutions
    are not sliced (their channels interleave groups): they must fit whole.
    """
    w = np.abs(weight_codes(acc)).astype(np.float64)
    cols = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2) * x.max_abs          # [O, C]
    if cols.sum(axis=1).max() <= FP32_EXACT_LIMIT:
        return [(0, w.shape[1])]
    if acc.attrs.get("groups", 1) != 1:
        raise ExportError(f"IR node %{acc.name}: a grouped convolution whose accumulator can pass 2**24; ONNX "
                          f"Runtime's float32 Conv could round it")
    unit = int(acc.attrs.get("cluster_size", 1))          # slices keep clusters whole ...
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


class _Builder:
    def __init__(self, g: Graph):
        self.g = g
        self.types = g.types()
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.dq_cache: dict[str, str] = {}

    # -- constants ---------------------------------------------------------------------------
    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer, shared by name; a name reused for a different value is a bug, not a cache hit."""
        value = np.asarray(value)
        if name in self.inits:
            old = numpy_helper.to_array(self.inits[name])
            if old.dtype != value.dtype or not np.array_equal(old, value):
                raise ExportError(f"internal: ONNX initializer {name!r} defined twice with different values")
            return name
        self.inits[name] = numpy_helper.from_array(value, name)
        return name

    def scale(self, frac) -> str:
        if isinstance(frac, tuple):
            key = "scale_ch_" + "_".join(str(f) for f in frac)
            return self.const(key, np.array([exp2(-f) for f in frac], np.float32))
        return self.const(f"scale_{frac}".replace("-", "m"), np.array(exp2(-frac), np.float32))

    def zero_point(self, dtype: str, zp: int = 0) -> str:
        """The ONNX zero point of codes whose own zero point is ``zp`` (plus the carrier's re-bias)."""
        _, np_t, carrier = self._carrier(dtype)
        return self.const(f"zp_{dtype}_{zp + carrier}".replace("-", "m"), np.array(zp + carrier, np_t))

    def f64(self, name: str, value) -> str:
        return self.const(name, np.asarray(value, np.float64))

    def _carrier(self, dtype: str):
        if dtype not in CARRIERS:
            raise ExportError(f"codes of dtype {dtype} have no exact ONNX QDQ form here; supported: {sorted(CARRIERS)}")
        return CARRIERS[dtype]

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    # -- QDQ building blocks -------------------------------------------------------------------
    def dq(self, tensor: str) -> str:
        """Float view of an integer tensor (one DequantizeLinear per tensor, shared by its users)."""
        if tensor not in self.dq_cache:
            self.dq_cache[tensor] = self.dq_of(tensor, self.types[tensor])
        return self.dq_cache[tensor]

    def dq_of(self, codes: str, t: TensorType, frac=None, tag: str = "_dq") -> str:
        """(code - zp) * 2**-frac (default: the tensor's own frac; a dyadic step's mantissa stays out, so
        float32 sums of these values are exact integers times a power of two)."""
        scale = self.scale(t.frac if frac is None else frac)
        return self.node("DequantizeLinear", [codes, scale, self.zero_point(t.dtype, t.zp)], f"{codes}{tag}")

    def q(self, value: str, out: TensorType, name: str) -> str:
        """Quantize a float tensor to ``out``: Clip first where the code range is narrower than the dtype."""
        full = DTYPE_RANGES[out.dtype]
        if (out.lo, out.hi) != (full.lo, full.hi):
            lo = self.const(f"{name}_clip_lo", np.array(out.lo * exp2(-out.frac), np.float32))
            hi = self.const(f"{name}_clip_hi", np.array(out.hi * exp2(-out.frac), np.float32))
            value = self.node("Clip", [value, lo, hi], f"{name}_clip")
        return self.node("QuantizeLinear", [value, self.scale(out.frac), self.zero_point(out.dtype, out.zp)], name)

    def code_const(self, name: str, t: TensorType, code: int) -> str:
        """A scalar in ``t``'s carrier domain for the integer ``code`` (for Pad and Clip on codes)."""
        _, np_t, carrier = self._carrier(t.dtype)
        return self.const(name, np.array(code + carrier, np_t))

    # -- ops -------------------------------------------------------------------------------------
    def emit(self, n: Node, consumers: dict[str, list[Node]]) -> None:
        ins = n.inputs
        if n.op is Op.QUANTIZE and n.out.dyadic:
            x = self.node("Cast", [ONNX_INPUT], f"{n.name}_f64", to=TensorProto.DOUBLE)
            x = self.node("Mul", [x, self.f64(f"{n.name}_pow2", exp2(n.out.frac))], f"{n.name}_times_pow2")
            x = self.node("Div", [x, self.f64(f"{n.name}_mant", n.out.mant)], f"{n.name}_over_mant")
            self.q_double(x, n.out, n.name, 1.0)
        elif n.op is Op.QUANTIZE:
            self.q(ONNX_INPUT, n.out, n.name)
        elif n.op in WEIGHTED_OPS or n.op is Op.MATMUL_INT:
            users = consumers.get(n.name, [])
            if len(users) != 1 or users[0].op is not Op.REQUANT:
                raise ExportError(f"IR node %{n.name}: an accumulator must feed exactly one requant to export as QDQ")
        elif n.op is Op.REQUANT and self.g.node(ins[0]).op is Op.MATMUL_INT:
            self.matmul(self.g.node(ins[0]), n)
        elif n.op is Op.REQUANT:
            self.weighted(self.g.node(ins[0]), n)
        elif n.op is Op.FLOAT_ISLAND:
            self.island(n)
        elif n.op in INT_NONLINEAR_FN:
            self.int_nonlinear(n)
        elif n.op in (Op.TWIN_QUANT, Op.TWIN_EXPAND):
            self.twin(n)
        elif n.op is Op.GATHER:
            carrier = self._carrier(n.out.dtype)
            table = self.const(f"{n.name}_table", (n.consts["table"].astype(np.int64) + carrier[2]).astype(carrier[1]))
            self.node("Gather", [table, ONNX_INPUT if ins[0] == self.g.input_name else ins[0]], n.name, axis=0)
        elif n.op is Op.TOKEN_MASK:
            compare = {"ne": "Equal", "eq": "Equal", "gt": "Greater", "ge": "GreaterOrEqual", "lt": "Less",
                       "le": "LessOrEqual"}[n.attrs["compare"]]
            value = self.const(f"{n.name}_value", np.array(n.attrs["value"], np.int64))
            hit = self.node(compare, [ONNX_INPUT, value], f"{n.name}_bool")
            if n.attrs["compare"] == "ne":
                hit = self.node("Not", [hit], f"{n.name}_not")
            self.node("Cast", [hit], n.name, to=TensorProto.DOUBLE)     # 0/1, read only by masked ops
        elif n.op is Op.CONST:
            carrier = self._carrier(n.out.dtype)
            self.const(n.name, (n.consts["codes"].astype(np.int64) + carrier[2]).astype(carrier[1]))
        elif n.op is Op.PERMUTE:
            self.node("Transpose", [ins[0]], n.name, perm=list(n.attrs["perm"]))
        elif n.op is Op.SELECT:
            index = self.const(f"{n.name}_index", np.array(n.attrs["index"], np.int64))
            self.node("Gather", [ins[0], index], n.name, axis=int(n.attrs["axis"]))
        elif n.op is Op.EXPAND_BATCH:
            batch = self.node("Shape", [ins[1]], f"{n.name}_batch", start=0, end=1)
            rest = self.const(f"{n.name}_dims", np.array(n.out.shape[1:], np.int64))
            shape = self.node("Concat", [batch, rest], f"{n.name}_shape", axis=0)
            self.node("Expand", [ins[0], shape], n.name)
        elif n.op is Op.ADD_INT and "multipliers" in n.attrs:
            terms = []
            for i, (x, m) in enumerate(zip(ins, n.attrs["multipliers"])):
                codes = self.node("Cast", [self.dq_of(x, self.types[x], 0, f"_{n.name}_int")], f"{n.name}_in{i}_f64",
                                  to=TensorProto.DOUBLE)
                terms.append(self.node("Mul", [codes, self.f64(f"{n.name}_m{i}", m * exp2(-n.attrs["shift"]))],
                                       f"{n.name}_in{i}_scaled"))
            self.q_double(self.node("Add", terms, f"{n.name}_sum"), n.out, n.name, 1.0)
        elif n.op is Op.ADD_INT:
            total = self.node("Add", [self.dq(ins[0]), self.dq(ins[1])], f"{n.name}_sum")
            self.q(total, n.out, n.name)
        elif n.op is Op.AVGPOOL_INT:
            self.avgpool(n)
        elif n.op is Op.MAXPOOL_INT:
            a = n.attrs
            (ph, pw) = a["padding"]
            self.node("MaxPool", [ins[0]], n.name, kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
                      pads=[ph, pw, ph, pw], dilations=list(a["dilation"]), ceil_mode=int(a["ceil_mode"]))
        elif n.op is Op.RESHAPE:
            shape = self.const(f"{n.name}_shape", np.array(n.attrs["shape"], np.int64))
            self.node("Reshape", [ins[0], shape], n.name)
        elif n.op is Op.CONCAT_INT:
            self.node("Concat", list(ins), n.name, axis=int(n.attrs["axis"]))
        elif n.op is Op.PAD_INT:
            p, rank = n.attrs["pads"], len(n.out.shape)
            begin, end = [0] * rank, [0] * rank
            for i in range(len(p) // 2):
                begin[rank - 1 - i], end[rank - 1 - i] = p[2 * i], p[2 * i + 1]
            pads = self.const(f"{n.name}_pads", np.array(begin + end, np.int64))
            self.node("Pad", [ins[0], pads, self.code_const(f"{n.name}_zero", n.out, n.out.zp)], n.name, mode="constant")
        elif n.op is Op.CLAMP_INT:
            lo = self.code_const(f"{n.name}_lo", n.out, n.attrs["lo"])
            hi = self.code_const(f"{n.name}_hi", n.out, n.attrs["hi"])
            self.node("Clip", [ins[0], lo, hi], n.name)
        elif n.op is Op.DEQUANTIZE:
            t = self.types[ins[0]]
            step = self.const(f"step_{ins[0]}", np.array(t.step, np.float32))      # mant < 2**12: exact
            self.node("DequantizeLinear", [ins[0], step, self.zero_point(t.dtype, t.zp)], ONNX_OUTPUT)
        else:
            raise ExportError(f"IR node %{n.name}: the ONNX exporter has no form for op {n.op.value}")

    def matmul(self, acc: Node, rq: Node) -> None:
        """Both operands' exact values (codes times powers of two) multiplied in float64, where every
        partial sum is exact below 2**53; then the requant's rounding, in float64 as well."""
        a, b = (self.node("Cast", [self.dq(i)], f"{acc.name}_{tag}_f64", to=TensorProto.DOUBLE)
                for i, tag in zip(acc.inputs, "ab"))
        product = self.node("MatMul", [a, b], f"{acc.name}_f64")
        self.q_double(product, rq.out, rq.name, self.requant_factor(rq, int(acc.out.frac)))

    def island(self, n: Node) -> None:
        """Dequantize, the function in float64 with fxq.islands' formula, quantize (see fxq.islands)."""
        x = self.node("Cast", [self.dq(n.inputs[0])], f"{n.name}_in_f64", to=TensorProto.DOUBLE)
        mant = int(self.types[n.inputs[0]].mant)
        if mant != 1:                  # dq leaves a dyadic step's mantissa out; the function needs the value
            x = self.node("Mul", [x, self.f64(f"{n.name}_in_mant", float(mant))], f"{n.name}_in_value")
        fn = n.attrs["fn"]
        if fn == "softmax" and "on_invalid" in n.attrs:
            bias = self.key_bias(n, n.attrs["on_valid"], n.attrs["on_invalid"])
            y = self.node("Softmax", [self.node("Add", [x, bias], f"{n.name}_masked")], f"{n.name}_f64", axis=-1)
        elif fn == "masked_mean":
            m = self.node("Unsqueeze", [n.inputs[1], self.axes(-1)], f"{n.name}_m")
            total = self.node("ReduceSum", [self.node("Mul", [x, m], f"{n.name}_xm"), self.axes(1)],
                              f"{n.name}_sum", keepdims=0)
            count = self.node("ReduceSum", [m, self.axes(1)], f"{n.name}_count", keepdims=0)
            count = self.node("Max", [count, self.f64("one_f64", 1.0)], f"{n.name}_count_1")
            y = self.node("Div", [total, count], f"{n.name}_f64")
        elif fn == "l2_normalize":
            sq = self.node("ReduceSum", [self.node("Mul", [x, x], f"{n.name}_sq"), self.axes(-1)],
                           f"{n.name}_sumsq", keepdims=1)
            norm = self.node("Max", [self.node("Sqrt", [sq], f"{n.name}_norm"), self.f64(f"{n.name}_eps", n.attrs["eps"])],
                             f"{n.name}_norm_eps")
            y = self.node("Div", [x, norm], f"{n.name}_f64")
        elif fn == "softmax":
            if "mask" in n.consts:
                x = self.node("Add", [x, self.f64(f"{n.name}_mask", n.consts["mask"])], f"{n.name}_masked")
            y = self.node("Softmax", [x], f"{n.name}_f64", axis=-1)
        elif fn == "layer_norm":
            width = self.types[n.inputs[0]].shape[-1]
            w = n.consts.get("weight", np.ones(width))
            b = n.consts.get("bias", np.zeros(width))
            y = self.node("LayerNormalization", [x, self.f64(f"{n.name}_weight", w), self.f64(f"{n.name}_bias", b)],
                          f"{n.name}_f64", axis=-1, epsilon=float(n.attrs["eps"]))
        else:
            y = self.gelu(x, n.name, n.attrs.get("approximate", "none"))
        out = n.out
        if out.dyadic:
            y = self.node("Mul", [y, self.f64(f"{n.name}_pow2", exp2(out.frac))], f"{n.name}_times_pow2")
            self.q_double(self.node("Div", [y, self.f64(f"{n.name}_mant", out.mant)], f"{n.name}_over_mant"),
                          out, n.name, 1.0)
        else:
            self.q_double(y, out, n.name, exp2(out.frac))

    def codes_f64(self, tensor: str, tag: str) -> str:
        """A tensor's integer codes (minus its zero point) as float64 values."""
        dq = self.dq_of(tensor, self.types[tensor], 0, f"_{tag}_int")
        return self.node("Cast", [dq], f"{tag}_in_f64", to=TensorProto.DOUBLE)

    def twin(self, n: Node) -> None:
        """fxq.formats.twin_compress / twin_expand as float64 ops on integer values (exact)."""
        def op(kind, *ins, tag):
            return self.node(kind, list(ins), f"{n.name}_{tag}")
        x = self.codes_f64(n.inputs[0], n.name)
        if n.op is Op.TWIN_QUANT:
            bits, m, signed = n.out.twin
            t = Twin(bits, m, signed)
            half = self.f64(f"twin_half_{bits}", float(t.half))
            x = op("Clip", x, self.f64(f"{n.name}_fine_lo", float(t.fine_range.lo)),
                   self.f64(f"{n.name}_fine_hi", float(t.fine_range.hi)), tag="fine")
            coarse = op("Round", op("Mul", x, self.f64(f"twin_down_{m}", exp2(-m)), tag="scaled"), tag="coarse")
            low = 0 if signed else t.half >> m                   # see fxq.formats.twin_compress
            r2 = op("Add", half, op("Clip", coarse, self.f64(f"twin_low_{low}", float(low)),
                                    self.f64(f"twin_top_{bits}", float(t.half - 1)), tag="mag"), tag="r2")
            in_r1 = op("Less", x, self.f64("twin_zero", 0.0) if signed else half, tag="in_r1")
            r1 = op("Neg", x, tag="r1") if signed else x
            self.q_double(op("Where", in_r1, r1, r2, tag="codes"), n.out, n.name, 1.0)
        else:
            bits, m, signed = self.types[n.inputs[0]].twin
            half = self.f64(f"twin_half_{bits}", float(2 ** (bits - 1)))
            in_r2 = op("GreaterOrEqual", x, half, tag="in_r2")
            mag = op("Where", in_r2, op("Sub", x, half, tag="less_half"), x, tag="mag")
            r2 = op("Mul", mag, self.f64(f"twin_up_{m}", exp2(m)), tag="r2")
            r1 = op("Neg", mag, tag="r1") if signed else mag
            self.q_double(op("Where", in_r2, r2, r1, tag="fine"), n.out, n.name, 1.0)

    def int_nonlinear(self, n: Node) -> None:
        """fxq.int_nonlinear's kernel as float64 ops on integer values (all exact below 2**53)."""
        x = self.codes_f64(n.inputs[0], n.name)
        fn = INT_NONLINEAR_FN[n.op]
        if "mask" in n.consts:
            bias = self.f64(f"{n.name}_mask", n.consts["mask"].astype(np.float64))
            x = self.int16_clip(self.node("Add", [x, bias], f"{n.name}_masked"))
        if "key_mask" in n.attrs:                  # per key token: the mask's code if valid, else padding's
            bias = self.key_bias(n, *(float(c) for c in n.attrs["key_mask"]))
            x = self.int16_clip(self.node("Add", [x, bias], f"{n.name}_keyed"))
        consts = int_nonlinear_constants(n, self.types[n.inputs[0]])
        extra = {"valid": n.inputs[1]} if n.op is Op.MASKED_MEAN_INT else None
        codes = onnx_int_nonlinear.emit(self, fn, x, consts, n.out.lo, n.out.hi, f"{n.name}_k", extra=extra)
        self.q_double(codes, n.out, n.name, 1.0)

    def axes(self, *axes: int) -> str:
        return self.const("axes_" + "_".join(str(a) for a in axes).replace("-", "m"), np.array(axes, np.int64))

    def key_bias(self, n: Node, on_valid: float, on_invalid: float) -> str:
        """The additive mask of a key-masked softmax: per key token [N, 1, 1, T], one value if valid, another
        for padding (``n.inputs[1]`` is the token_mask)."""
        keys = self.node("Unsqueeze", [n.inputs[1], self.axes(1, 2)], f"{n.name}_keys")
        return self.node("Where", [self.node("Cast", [keys], f"{n.name}_keys_bool", to=TensorProto.BOOL),
                                   self.f64(f"{n.name}_on_valid", on_valid),
                                   self.f64(f"{n.name}_on_invalid", on_invalid)], f"{n.name}_bias")

    def int16_clip(self, x: str) -> str:
        """Saturate integer values to the kernels' input range (fxq.int_nonlinear.CODE_RANGE)."""
        lo, hi = self.f64("int16_lo", float(inl.CODE_RANGE.lo)), self.f64("int16_hi", float(inl.CODE_RANGE.hi))
        return self.node("Clip", [x, lo, hi], f"{x}_clip")

    def gelu(self, x: str, name: str, approximate: str) -> str:
        """fxq.islands' GELU, op for op in the same order (ONNX Runtime has no float64 Erf)."""
        k = iter(range(100))

        def op(kind, *ins):
            return self.node(kind, list(ins), f"{name}_gelu{next(k)}")

        def c(v):
            return self.f64(f"gelu_c_{v!r}".replace("-", "m").replace(".", "p"), v)
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

    def weight_dq(self, acc: Node, lo: int = 0, hi: int | None = None, tag: str = "") -> str:
        """Float weights of input channels [lo, hi) (exact: codes times power-of-two or 8-bit fixed-point
        scales) for Conv/Gemm. Slicing happens on the constants, never between a DequantizeLinear and its use."""
        w_frac = tuple(int(f) for f in acc.attrs["w_frac"])
        if acc.op in CLUSTER_OPS:
            return self.cluster_dq(acc, w_frac, lo, hi, tag)
        w = acc.consts["w"][:, lo:hi]
        if w.dtype not in (np.int8, np.int16):
            raise ExportError(f"IR node %{acc.name}: {w.dtype} weights have no QDQ form here")
        if not int8_kernel_safe(w):
            w = w.astype(np.int16)
        zw = self.const(f"{acc.name}_w{tag}_zp", np.zeros(len(w_frac), w.dtype))
        wq = self.const(f"{acc.name}_w{tag}", w)
        return self.node("DequantizeLinear", [wq, self.scale(w_frac), zw], f"{acc.name}_w{tag}_dq", axis=0)

    def cluster_dq(self, acc: Node, w_frac: tuple, lo: int, hi: int | None, tag: str) -> str:
        """Blocked DequantizeLinear: codes along the input-channel axis in blocks of the cluster size, each
        block with its own scale alpha_code * 2**-frac (an 8-bit mantissa: exact in float32)."""
        block = int(acc.attrs["cluster_size"])
        t = acc.consts["t"][:, lo:hi]
        alpha = acc.consts["alpha"][:, lo // block:None if hi is None else -(-hi // block)].astype(np.float64)
        unit = np.exp2(-np.asarray(w_frac, np.float64))[:, None]
        # DequantizeLinear forbids a zero scale; a cluster whose scale code is 0 has all-zero codes anyway
        scale = np.where(alpha == 0, 1.0, alpha) * unit                               # [O, clusters]
        scale = np.broadcast_to(scale.reshape(scale.shape + (1,) * (t.ndim - 2)), scale.shape + t.shape[2:])
        sq = self.const(f"{acc.name}_alpha{tag}", scale.astype(np.float32))
        tq = self.const(f"{acc.name}_t{tag}", t.astype(np.int8))
        zq = self.const(f"{acc.name}_t{tag}_zp", np.zeros(scale.shape, np.int8))
        return self.node("DequantizeLinear", [tq, sq, zq], f"{acc.name}_w{tag}_dq", axis=1, block_size=block)

    def weighted(self, acc: Node, rq: Node) -> None:
        b, acc_frac = acc.consts["b"], tuple(int(f) for f in acc.out.frac)
        parts = exact_parts(acc, self.types[acc.inputs[0]])
        if len(parts) == 1 and "multiplier" not in rq.attrs:
            x, wd = self.dq(acc.inputs[0]), self.weight_dq(acc)
            zb = self.const(f"{acc.name}_b_zp", np.zeros(len(acc_frac), np.int32))
            bq = self.const(f"{acc.name}_b", b.astype(np.int32))
            bd = self.node("DequantizeLinear", [bq, self.scale(acc_frac), zb], f"{acc.name}_b_dq", axis=0)
            self.q(self.product(acc, x, wd, acc.name, bias=bd), rq.out, rq.name)
            return
        # Accumulators that may pass 2**24: float32 partial sums over input-channel slices, each provably
        # below 2**24 (so exact), added in float64 with the bias, then rounded in float64.
        sums = []
        codes = acc.inputs[0]
        for i, (lo, hi) in enumerate(parts):
            if len(parts) == 1:               # whole (a grouped conv's weights index channels per group)
                xs, ws = self.dq(codes), self.weight_dq(acc)
            else:
                xs = self.dq_of(self.slice(codes, lo, hi, f"{acc.name}_x{i}"), self.types[codes])
                ws = self.weight_dq(acc, lo, hi, tag=f"_part{i}")
            y = self.product(acc, xs, ws, f"{acc.name}_part{i}")
            sums.append(self.node("Cast", [y], f"{acc.name}_part{i}_f64", to=TensorProto.DOUBLE))
        bias = b.astype(np.float64) * np.exp2(-np.asarray(acc_frac, np.float64))
        bias = bias.reshape((-1,) + (1,) * (len(acc.out.shape) - 2))
        sums.append(self.const(f"{acc.name}_b_f64", bias))
        total = self.node("Sum", sums, f"{acc.name}_f64")
        self.q_double(total, rq.out, rq.name, self.requant_factor(rq, acc_frac))

    def requant_factor(self, rq: Node, acc_frac) -> np.ndarray | float:
        """What turns acc * 2**-f_acc into the rounded quantity: 2**f_out, or M * 2**(f_acc - n) (dyadic)."""
        if "multiplier" not in rq.attrs:
            return exp2(rq.out.frac)
        m, n = (np.atleast_1d(np.asarray(rq.attrs[k], np.float64)) for k in ("multiplier", "shift"))
        factor = m * np.exp2(np.asarray(acc_frac, np.float64) - n)
        return factor.reshape((-1,) + (1,) * (len(rq.out.shape) - 2)) if factor.size > 1 else float(factor[0])

    def product(self, acc: Node, x: str, w: str, name: str, bias: str | None = None) -> str:
        ins = [x, w] + ([bias] if bias else [])
        if acc.op in CONV_OPS:
            a = acc.attrs
            ph, pw = a["padding"]
            return self.node("Conv", ins, name, strides=list(a["stride"]), pads=[ph, pw, ph, pw],
                             dilations=list(a["dilation"]), group=int(a["groups"]))
        return self.node("Gemm", ins, name, transB=1)

    def slice(self, tensor: str, lo: int, hi: int, name: str) -> str:
        starts, ends = self.const(f"{name}_lo", np.array([lo], np.int64)), self.const(f"{name}_hi", np.array([hi], np.int64))
        return self.node("Slice", [tensor, starts, ends, self.const("axis_1", np.array([1], np.int64))], name)

    def q_double(self, value: str, out: TensorType, name: str, factor) -> str:
        """round(value * factor) + zp, saturated (round half to even, as QuantizeLinear), in exact float64 ops."""
        if not (np.ndim(factor) == 0 and float(factor) == 1.0):
            value = self.node("Mul", [value, self.f64(f"{name}_factor", factor)], f"{name}_scaled")
        codes = self.node("Round", [value], f"{name}_round")
        carrier = self._carrier(out.dtype)[2]
        shift = out.zp + carrier                 # zero point, then the carrier's re-bias (uint8 as int8)
        if shift:
            codes = self.node("Add", [codes, self.f64(f"zp_f64_{shift}".replace("-", "m"), shift)], f"{name}_zp")
        lo, hi = self.f64(f"{name}_lo", out.lo + carrier), self.f64(f"{name}_hi", out.hi + carrier)
        codes = self.node("Clip", [codes, lo, hi], f"{name}_clip")
        return self.node("Cast", [codes], name, to=self._carrier(out.dtype)[0])

    def avgpool(self, n: Node) -> None:
        """Window sum times 2**-k as a depthwise QDQ Conv with weight codes 1 at scale 2**-k.

        Float constant weights are not safe: ONNX Runtime quantizes them itself, with a scale that is
        not a power of two. Integer codes of 1 leave it nothing to approximate.
        """
        a, x = n.attrs, self.types[n.inputs[0]]
        channels = x.shape[1]
        kh, kw = a["kernel"]
        dyadic = "multiplier" in a
        ones = self.const(f"{n.name}_window", np.ones((channels, 1, kh, kw), np.int8))
        zero = self.const("zp_weight", np.array(0, np.int8))
        k = 0 if dyadic else a["divisor_log2"]          # dyadic: sum the integers, the multiplier divides
        window = self.node("DequantizeLinear", [ones, self.scale(k), zero], f"{n.name}_window_dq")
        ph, pw = a["padding"]
        xd = self.dq_of(n.inputs[0], x, 0, f"_{n.name}_int") if dyadic else self.dq(n.inputs[0])
        y = self.node("Conv", [xd, window], f"{n.name}_sum", group=channels,
                      kernel_shape=[kh, kw], strides=list(a["stride"]), pads=[ph, pw, ph, pw])
        if not dyadic:
            self.q(y, n.out, n.name)
            return
        total = self.node("Cast", [y], f"{n.name}_sum_f64", to=TensorProto.DOUBLE)
        self.q_double(total, n.out, n.name, a["multiplier"] * exp2(-a["shift"]))


def build(g: Graph, allow_inexact: bool = False, debug_outputs: bool = False) -> onnx.ModelProto:
    """The QDQ model; ``debug_outputs`` adds every integer tensor as an output named after its IR node
    (its carrier codes), to find where executors part ways. Extra outputs can change ORT's fusions."""
    rounding = g.target.get("rounding", "half_even") if g.target else "half_even"
    if not onnx_exact_rounding(rounding):
        raise ExportError(f"target rounding {rounding!r}: ONNX QuantizeLinear rounds half to even only, so this "
                          f"model cannot be exported exactly; compile with rounding='half_even'")
    # Weighted nodes split their sums (exact_parts); any other op past 2**24 cannot be exported exactly.
    risky = [name for name in g.fp32_inexact() if g.node(name).op not in WEIGHTED_OPS]
    if risky and not allow_inexact:
        raise ExportError(f"accumulators of {risky} can exceed 2**24, where ONNX Runtime's float32 requantization "
                          f"could round; pass allow_inexact=True to export anyway")
    b = _Builder(g)
    consumers: dict[str, list[Node]] = {}
    for n in g.nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)
    for n in g.nodes:
        b.emit(n, consumers)
    in_t, out_t = g.input_type, g.types()[g.output]
    dims = lambda s: ["N" if d is None else d for d in s]  # noqa: E731
    graph = helper.make_graph(
        b.nodes, "fxq", [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.INT64 if in_t.dtype == "int64"
                                                       else TensorProto.FLOAT, dims(in_t.shape))],
        [helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, dims(out_t.shape))], list(b.inits.values()))
    if debug_outputs:
        produced = {o for nd in b.nodes for o in nd.output}
        for n in g.nodes:
            if n.name in produced and n.out.dtype in CARRIERS and n.op is not Op.TOKEN_MASK:
                graph.output.append(helper.make_tensor_value_info(n.name, CARRIERS[n.out.dtype][0], dims(n.out.shape)))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fxq")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def export(g: Graph, path, allow_inexact: bool = False, debug_outputs: bool = False) -> onnx.ModelProto:
    model = build(g, allow_inexact, debug_outputs)
    onnx.save(model, str(path))
    return model


def output_codes(g: Graph, onnx_output: np.ndarray) -> np.ndarray:
    """Codes of ORT's float output: exact, because the output is (code - zp) * 2**-frac in float32."""
    t = g.output_codes().out
    return codes_of(onnx_output, t.frac, t.mant, t.zp)


def session(model_or_path, optimized: bool = True, threads: int = 1):
    """An ONNX Runtime CPU session with the default graph optimisations (the setting exactness is tested in)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def session_codes(g: Graph, sess, x) -> np.ndarray:
    """Output codes of ``g``'s export run by an existing session."""
    return output_codes(g, sess.run([ONNX_OUTPUT], {ONNX_INPUT: onnx_input(g, x)})[0])


def onnx_input(g: Graph, x) -> np.ndarray:
    """The array the export's input takes: float32 values, or int64 token ids."""
    x = x.numpy() if hasattr(x, "numpy") else x
    return np.asarray(x, np.int64 if g.input_type.dtype == "int64" else np.float32)


def run_codes(g: Graph, model_or_path, x: np.ndarray, optimized: bool = True) -> np.ndarray:
    return session_codes(g, session(model_or_path, optimized), x)


def debug_codes(g: Graph, x: np.ndarray, optimized: bool = True) -> dict[str, np.ndarray]:
    """Every integer tensor's codes as ONNX Runtime computes them (from a debug_outputs export)."""
    sess = session(build(g, debug_outputs=True), optimized)
    names = [o.name for o in sess.get_outputs() if o.name != ONNX_OUTPUT]
    outs = sess.run(names, {ONNX_INPUT: onnx_input(g, x)})
    types = g.types()
    return {n: o.astype(np.int64) - CARRIERS[types[n].dtype][2] for n, o in zip(names, outs)}
