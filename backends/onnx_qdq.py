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
from fxq.errors import ExportError
from fxq.formats import DTYPE_RANGES, codes_of, exp2, onnx_exact_rounding
from fxq.ir import WEIGHTED_OPS, Graph, Node, Op, TensorType

from . import onnx_int_nonlinear

OPSET = 21
IR_VERSION = 10
ONNX_INPUT = "input"
ONNX_OUTPUT = "output"
# How each IR code dtype travels in ONNX: (ONNX element type, numpy dtype, zero point).
CARRIERS = {"int8": (TensorProto.INT8, np.int8, 0), "uint8": (TensorProto.INT8, np.int8, -128),
            "int16": (TensorProto.INT16, np.int16, 0),        # twin-uniform fine codes, wide outputs
            "uint16": (TensorProto.INT16, np.int16, -32768)}  # wide outputs after a ReLU

class _Builder:
    """The QDQ building blocks each op's ``emit`` (fxq.ops) builds its ONNX form from."""
    output_name = ONNX_OUTPUT

    def __init__(self, g: Graph):
        self.g = g
        self.types = g.types()
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.dq_cache: dict[str, str] = {}
        self.consumers: dict[str, list[Node]] = {}
        for n in g.nodes:
            for i in n.inputs:
                self.consumers.setdefault(i, []).append(n)

    def tensor(self, name: str) -> str:
        """The ONNX name of an IR tensor (the graph input has its fixed name)."""
        return ONNX_INPUT if name == self.g.input_name else name

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

    def cast(self, x: str, output: str, to: int = TensorProto.DOUBLE) -> str:
        return self.node("Cast", [x], output, to=to)

    def carrier_codes(self, codes: np.ndarray, dtype: str) -> np.ndarray:
        """Integer codes of ``dtype`` as the ONNX carrier holds them (uint8 re-biased into int8)."""
        _, np_t, carrier = self._carrier(dtype)
        return (codes.astype(np.int64) + carrier).astype(np_t)

    def trace_int_kernel(self, fn: str, x: str, consts, lo: int, hi: int, prefix: str, extra=None) -> str:
        """fxq.int_nonlinear's kernel ``fn`` traced to ONNX ops on float64 integer values."""
        return onnx_int_nonlinear.emit(self, fn, x, consts, lo, hi, prefix, extra=extra)

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

    def codes_f64(self, tensor: str, tag: str) -> str:
        """A tensor's integer codes (minus its zero point) as float64 values."""
        dq = self.dq_of(tensor, self.types[tensor], 0, f"_{tag}_int")
        return self.node("Cast", [dq], f"{tag}_in_f64", to=TensorProto.DOUBLE)

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

    def requant_factor(self, rq: Node, acc_frac) -> np.ndarray | float:
        """What turns acc * 2**-f_acc into the rounded quantity: 2**f_out, or M * 2**(f_acc - n) (dyadic)."""
        if rq.attrs.multiplier is None:
            return exp2(rq.out.frac)
        m, n = (np.atleast_1d(np.asarray(v, np.float64)) for v in (rq.attrs.multiplier, rq.attrs.shift))
        factor = m * np.exp2(np.asarray(acc_frac, np.float64) - n)
        return factor.reshape((-1,) + (1,) * (len(rq.out.shape) - 2)) if factor.size > 1 else float(factor[0])

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
    for n in g.nodes:
        n.spec.emit(b, n)
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
