"""Checks shared by the integer-kernel tests (fxq.int_nonlinear and its ONNX spelling).

``run_all`` runs a kernel in every spelling and asserts they agree, one of them a float64 array that
fails on any intermediate reaching 2**52 (the module's exactness claim); ``StandInBuilder`` is what
backends.onnx_int_nonlinear.emit needs of the exporter's builder; ``ort_outputs`` runs a standalone
model under both ONNX Runtime settings the exporter is checked in.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from fxq import int_nonlinear as inl
from fxq.backends.onnx_qdq import IR_VERSION, OPSET
from fxq.formats import int_range

FORMATS = {"int8": int_range(8, True), "uint8": int_range(8, False), "int16": int_range(16, True)}
LIMIT = 2 ** 52


class Bounded(np.ndarray):
    """float64 array that fails every ufunc whose result reaches 2**52 in magnitude: the module's claim."""
    peak = 0.0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = [x.view(np.ndarray) if isinstance(x, Bounded) else x for x in inputs]
        return bounded(getattr(ufunc, method)(*inputs, **kwargs))


def bounded(out):
    if isinstance(out, np.ndarray) and out.dtype != bool:
        if out.size:
            Bounded.peak = max(Bounded.peak, float(np.abs(out).max()))
            assert Bounded.peak < LIMIT, f"an intermediate reached {Bounded.peak:.3g} >= 2**52"
        return out.view(Bounded)
    return out


class BoundedOps(inl.Float64Ops):
    def codes(self, q, fn):
        return super().codes(q, fn).view(Bounded)

    def const(self, v, like):
        return super().const(v, like).view(Bounded)

    @staticmethod
    def where(c, a, b):
        return bounded(np.where(np.asarray(c), a, b))


BOUNDED = BoundedOps()


def run_all(fn, arrays, *args, **kw):
    """fn on int64 ``arrays`` (one array or a tuple) in numpy; asserts torch int64, float64 and the
    bounded float64 spelling agree with it. Returns numpy's codes."""
    arrays = arrays if isinstance(arrays, tuple) else (arrays,)
    ref = fn(*arrays, *args, **kw)
    assert ref.dtype == np.int64
    from_torch = fn(*[torch.as_tensor(a) for a in arrays], *args, **kw)
    assert from_torch.dtype == torch.int64
    f64 = [a.astype(np.float64) for a in arrays]
    for name, out in [("torch", from_torch.numpy()), ("float64", fn(*f64, *args, **kw, xp=inl.FLOAT64)),
                      ("bounded", fn(*f64, *args, **kw, xp=BOUNDED).view(np.ndarray))]:
        bad = np.argwhere(out != ref)
        assert bad.size == 0, f"{name} differs from numpy at {len(bad)} positions, first {bad[:3].tolist()}"
    return ref


def steps_off(codes, ref, frac_out, lo, hi):
    """|code - exact value| in output steps, the exact value clamped to the output range."""
    return np.abs(codes - np.clip(ref * 2.0 ** frac_out, lo, hi))


class StandInBuilder:
    """What emit needs of backends.onnx_qdq._Builder: node, f64 and const, shared by name (a name reused
    for another value is a bug, as in the exporter)."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}

    def const(self, name, value):
        value = np.asarray(value)
        if name in self.inits:
            assert np.array_equal(numpy_helper.to_array(self.inits[name]), value), f"{name} redefined"
        else:
            self.inits[name] = numpy_helper.from_array(value, name)
        return name

    def f64(self, name, value):
        return self.const(name, np.asarray(value, np.float64))

    def node(self, op, inputs, output, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def model_of(b: StandInBuilder, inputs: dict, y: str, out_dims) -> onnx.ModelProto:
    """float64 ``inputs`` (name -> dims) -> b's nodes -> output ``y`` (float64), checked in full."""
    graph = helper.make_graph(
        b.nodes, "kernel", [helper.make_tensor_value_info(k, TensorProto.DOUBLE, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(y, TensorProto.DOUBLE, out_dims)], list(b.inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    assert len({n.name for n in model.graph.node}) == len(model.graph.node)
    return model


def ort_outputs(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """The model's float64 output under default session options and with graph optimisations disabled."""
    outs = {}
    for mode, level in (("optimized", None), ("unoptimized", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)):
        so = ort.SessionOptions()
        if level is not None:
            so.graph_optimization_level = level
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        out = sess.run(None, {k: np.asarray(v).astype(np.float64) for k, v in feeds.items()})[0]
        assert out.dtype == np.float64
        outs[mode] = out
    return outs


def assert_ort_exact(model: onnx.ModelProto, feeds: dict, ref: np.ndarray) -> None:
    for mode, out in ort_outputs(model, feeds).items():
        assert out.shape == ref.shape
        bad = np.argwhere(out != ref)
        assert bad.size == 0, f"{mode}: ORT differs from numpy at {len(bad)} positions, first {bad[:3].tolist()}"
