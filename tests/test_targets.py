"""Targets are data: a user's own accelerator compiles, runs and exports through the same passes."""
import numpy as np
import pytest
import torch

import fxq
from fxq.ir import WEIGHTED_OPS
from conftest import assert_three_executors, tiny
from fxq.targets import _REGISTRY

X = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def my_npu():
    t = fxq.register_target(fxq.Target(name="test-npu-a6", a_bits=6, w_granularity="tensor",
                                       description="6-bit activations, one weight scale per layer"))
    yield t
    _REGISTRY.pop(t.name, None)


def test_user_target_compiles_runs_and_exports(my_npu, tmp_path):
    assert "test-npu-a6" in fxq.targets()
    qm = fxq.compile(tiny("residual"), X, target="test-npu-a6", progress=False)
    for n in qm.ir.nodes:
        if n.out.dtype == "uint8":
            assert n.out.hi <= 63
        if n.out.dtype == "int8":
            assert -32 <= n.out.lo and n.out.hi <= 31
        if n.op in WEIGHTED_OPS:
            assert len(set(n.attrs.w_frac)) == 1, "per-tensor weights: one fractional length per layer"
    assert_three_executors(qm, X * 3)
    qm.export_onnx(tmp_path / "npu.onnx")


@pytest.mark.parametrize("field,value", [("a_bits", 1), ("w_bits", 17), ("w_granularity", "cluster7"),
                                         ("rounding", "stochastic"), ("acc_bits", 20), ("float_islands", {"sigmoid"})])
def test_invalid_target_names_the_field(field, value):
    with pytest.raises(fxq.TargetError, match=field):
        fxq.Target(name="bad", **{field: value})


def test_overrides_make_a_new_named_target_and_keep_the_registered_one():
    t = fxq.get_target("shift-int", a_bits=6)
    assert t.a_bits == 6 and t.name == "shift-int[a_bits=6]"
    assert fxq.get_target("shift-int").a_bits == 8


def test_non_half_even_rounding_compiles_but_refuses_inexact_export(tmp_path):
    qm = fxq.compile(tiny("concat"), X, rounding="half_up", progress=False)
    c = qm.run_codes(X)
    np.testing.assert_array_equal(c, qm.fake_codes(X))
    with pytest.raises(fxq.ExportError, match="half to even"):
        qm.export_onnx(tmp_path / "m.onnx")


def test_registering_twice_needs_replace(my_npu):
    with pytest.raises(fxq.TargetError, match="exists"):
        fxq.register_target(fxq.Target(name="test-npu-a6"))
