"""fit_clamp_range: the clamp lands on the top code, the function is unchanged, and only where it may be."""
from __future__ import annotations

import pytest
import torch

import fxq
from conftest import assert_three_executors, tiny
from fxq import meta
from fxq.fakequant import set_quantization
from passes.fit_clamp_range import clamp_scale

X = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("hi, bits, signed, expected", [
    (6.0, 8, False, 255 / 32 / 6),      # ReLU6, u8: 7.96875 at 2**-5
    (6.0, 4, False, 7.5 / 6),           # u4: 15 codes at 2**-1
    (1.0, 8, True, 127 / 64),           # hardtanh(0, 1) in signed codes
    (4.0, 8, False, 255 / 32 / 4),
])
def test_clamp_scale(hi, bits, signed, expected):
    s = clamp_scale(hi, bits, signed)
    assert s == pytest.approx(expected) and 1.0 <= s < 2.0


def test_exact_fit_needs_no_scale():
    assert clamp_scale(255 / 32, 8, False) == 1.0


def _clamps(qm):
    return {n.name: n for n in qm.fake.graph.nodes if n.meta.get(meta.KIND) == "clamp"}


def _float_out(qm, x):
    set_quantization(qm.fake, False)
    try:
        with torch.no_grad():
            return qm.fake(x)
    finally:
        set_quantization(qm.fake, True)


def test_inverted_residual_clamps_end_on_the_top_code_and_the_function_stays():
    model = tiny("inverted_residual")
    qm = fxq.compile(model, X, "shift-int", progress=False, fit_clamps=True)
    with torch.no_grad():
        assert torch.allclose(_float_out(qm, X), model(X), atol=1e-5)
    fitted = [n for n in qm.notes if n.startswith("fit_clamp_range")]
    assert len(fitted) == 1 and "3 clamp(s)" in fitted[0]      # expand, depthwise and head; not the stem
    bounds = {name: node.args[2] for name, node in _clamps(qm).items()}
    assert sorted(bounds.values()) == pytest.approx([6.0, 255 / 32, 255 / 32, 255 / 32])
    # the stem's ReLU6 also feeds the residual add, which cannot absorb a factor: left at 6
    assert [n.args[0].target for n in _clamps(qm).values() if n.args[2] == 6.0] == ["stem.0"]
    assert_three_executors(qm, X[:8])


def test_off_by_default_and_on_dyadic_targets():
    # int8 folds each (fused) ReLU6 into its affine FakeQuant, so no clamp node is left there to read: only
    # the notes show that the pass did nothing
    for target, overrides, clamps in (("shift-int", {}, 4), ("int8", {"fit_clamps": True}, 0)):
        qm = fxq.compile(tiny("inverted_residual"), X, target, progress=False, **overrides)
        assert len(_clamps(qm)) == clamps, target
        assert all(n.args[2] == 6.0 for n in _clamps(qm).values())
        assert not [n for n in qm.notes if n.startswith("fit_clamp_range")]


def test_the_last_layers_input_takes_the_edge_bits():
    """At W4A4 with 8-bit edges the head's clamp (read by the last linear) fits 8-bit codes, the others 4-bit."""
    qm = fxq.compile(tiny("inverted_residual"), X, "shift-int", progress=False, fit_clamps=True, w_bits=4, a_bits=4,
                     edge_w_bits=8, edge_a_bits=8)
    bounds = sorted(n.args[2] for n in _clamps(qm).values())
    assert bounds == pytest.approx([6.0, 7.5, 7.5, 255 / 32])
    assert_three_executors(qm, X[:8])


def test_data_free_formats_see_the_scaled_bn_statistics():
    """Without calibration data the formats come from the folded BN's statistics, which scale with the
    producer: the fitted clamps still choose the step whose top code is the bound."""
    qm = fxq.compile(tiny("inverted_residual"), None, "shift-int", progress=False, fit_clamps=True,
                     input_shape=(1, 1, 28, 28), input_range=(-3.0, 3.0))
    fitted = [n for n in _clamps(qm).values() if n.args[2] != 6.0]
    assert len(fitted) == 3
    for node in fitted:
        fmt = node.meta[meta.ACT_FMT]
        assert (fmt.frac, fmt.range.hi) == (5, 255) and fmt.range.hi * 2.0**-fmt.frac == node.args[2]
    assert_three_executors(qm, X[:8])
