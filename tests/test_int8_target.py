"""The int8 target: dyadic scales, zero points and integer-multiplier requants, checked against their
definitions (exactness on every tiny model is in test_builtin_targets)."""
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxq
from conftest import tiny
from fxq.errors import VerifyError
from fxq.formats import IntRange, Rounding, dyadic, dyadic_requant_np, int_range, quantize_np
from fxq.ir import Graph, Op
from fxq.targets import TargetError

X = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def residual_int8():
    return fxq.compile(tiny("residual"), X, target="int8", progress=False)


@given(st.floats(1e-12, 1e12), st.integers(2, 21))
def test_dyadic_is_the_nearest_mantissa(x, bits):
    m, f = (int(v) for v in dyadic(x, bits))
    assert 2 ** (bits - 1) <= m < 2**bits
    # m is round(x * 2**f), up to the carry into the next power of two
    exact = Fraction(x) * Fraction(2) ** f
    assert abs(Fraction(m) - exact) <= Fraction(1, 2) or m == 2 ** (bits - 1)
    assert abs(Fraction(m, 1) / Fraction(2) ** f / Fraction(x) - 1) <= Fraction(1, 2 ** (bits - 1))


@settings(max_examples=300)
@given(st.integers(-(2**31), 2**31 - 1), st.integers(1, 2**21 - 1), st.integers(0, 62), st.integers(0, 255),
       st.sampled_from(list(Rounding)))
def test_dyadic_requant_matches_rational_rounding(acc, mult, shift, zp, mode):
    got = int(dyadic_requant_np(np.array([acc]), mult, shift, zp, IntRange(-(2**62), 2**62), mode)[0])
    exact = Fraction(acc * mult, 2**shift)
    floor = exact.numerator // exact.denominator
    rem = exact - floor
    half = Fraction(1, 2)
    up = {Rounding.FLOOR: False, Rounding.HALF_UP: rem >= half,
          Rounding.HALF_EVEN: rem > half or (rem == half and floor % 2 == 1),
          Rounding.HALF_AWAY: rem > half or (rem == half and exact > 0)}[mode]
    assert got == floor + int(up) + zp


def test_affine_activations_carry_zero_points_and_relu_outputs_do_not(residual_int8):
    ir = residual_int8.ir
    types = ir.types()
    assert types["x_q"].dtype == "uint8" and types["x_q"].zp > 0              # the input is signed data
    assert types["stem_0_rq"].zp == 0                                        # after ReLU: min is 0
    assert any(t.zp > 0 for name, t in types.items() if name.endswith("_rq") and name != "fc_rq")


def test_requant_multipliers_approximate_the_step_ratio(residual_int8):
    ir, bits = residual_int8.ir, fxq.get_target("int8").multiplier_bits
    types = ir.types()
    checked = 0
    for n in ir.nodes:
        if n.op is Op.REQUANT:
            ratio = types[n.inputs[0]].step / n.out.step
            m, s = np.asarray(n.attrs.multiplier), np.asarray(n.attrs.shift)
            assert np.all(m < 2**bits) and np.all(m >= 2 ** (bits - 1))
            assert np.all(np.abs(m * np.exp2(-s.astype(float)) / ratio - 1) <= 2.0 ** -(bits - 1))
            checked += 1
    assert checked == 6                 # stem, a, b, c, down, fc


def test_int8_codes_follow_the_affine_definition(residual_int8):
    """The model input's codes are round(x / step) + zp, saturated, with step = mant * 2**-frac."""
    from backends import reference
    x = (X[:2] * 3).numpy()
    env = reference.execute(residual_int8.ir, x, keep=True)
    t = residual_int8.ir.types()["x_q"]
    step = t.mant * 2.0 ** -t.frac
    expected = np.clip(np.rint(x.astype(np.float64) / step) + t.zp, 0, 255)
    assert np.array_equal(env["x_q"], expected)


def test_int8_ir_prints_multipliers_and_zero_points(residual_int8):
    text = str(residual_int8.ir)
    assert "zp=" in text and " x" in text and "s=" in text
    rq = next(line for line in text.splitlines() if line.startswith("%b_0_rq"))
    assert ">>" in rq and "+" in rq                                          # multiply, shift, add zp


def test_int8_round_trips_through_save_and_load(residual_int8, tmp_path):
    residual_int8.save(tmp_path / "m.fxq")
    loaded = fxq.load(tmp_path / "m.fxq")
    assert np.array_equal(loaded.run_codes(X), residual_int8.run_codes(X))


def test_verifier_rejects_a_wrong_multiplier(residual_int8, tmp_path):
    ir = Graph.load(_saved(residual_int8, tmp_path))
    rq = ir.node("fc_rq")
    rq.attrs = rq.attrs.replace(multiplier=tuple(m + 3 for m in rq.attrs.multiplier))
    with pytest.raises(VerifyError, match="fc_rq.*not the nearest dyadic"):
        ir.verify()


def test_verifier_rejects_a_shift_between_different_mantissas(residual_int8, tmp_path):
    ir = Graph.load(_saved(residual_int8, tmp_path))
    rq = ir.node("fc_rq")
    rq.attrs = rq.attrs.replace(multiplier=None)
    with pytest.raises(VerifyError, match="fc_rq.*mantissas"):
        ir.verify()


def _saved(qm, tmp_path):
    path = tmp_path / "copy.fxq"
    qm.save(path)
    return path


@pytest.mark.parametrize("overrides, field", [
    ({"requant": "shift"}, "scale_kind='dyadic' with requant='shift'"),
    ({"w_granularity": "cluster"}, "w_granularity='cluster' with scale_kind='dyadic'"),
    ({"multiplier_bits": 30}, "multiplier_bits=30"),
    ({"scale_mant_bits": 0}, "scale_mant_bits=0"),
    ({"act_range_search": (1.5,)}, "act_range_search"),
])
def test_bad_int8_overrides_name_the_field(overrides, field):
    with pytest.raises(TargetError, match=field.replace("(", r"\(").replace(")", r"\)")):
        fxq.get_target("int8", **overrides)


@pytest.mark.parametrize("overrides, field", [({"multiplier_bits": 12}, "multiplier_bits"),
                                              ({"a_affine": True}, "a_affine")])
def test_dyadic_fields_on_a_shift_target_are_rejected(overrides, field):
    with pytest.raises(TargetError, match=field):
        fxq.get_target("shift-int", **overrides)


def test_int8_weights_are_per_channel_symmetric(residual_int8):
    conv = residual_int8.ir.node("a_0")
    w = conv.consts["w"].astype(np.int64)
    assert np.all(np.abs(w).reshape(len(w), -1).max(axis=1) >= 126)           # max|w| maps to ~127
    assert len(set(conv.attrs.w_mant)) > 1                                 # one dyadic step per channel


def test_int8_quantize_matches_quantize_np():
    v = np.array([-1.0, -0.37, 0.0, 0.5, 2.0])
    codes = quantize_np(v, 10, int_range(8, False), Rounding.HALF_EVEN, mant=181, zp=100)
    assert codes.tolist() == np.clip(np.rint(v * 1024 / 181) + 100, 0, 255).astype(int).tolist()


def test_int8_float_mode_keeps_the_fused_activations(residual_int8):
    """With quantization off, the fake-quant graph is the float model (the report's reference and the
    calibration passes rely on it), although dyadic FakeQuants replace the fused ReLUs."""
    from fxq.fakequant import set_quantization
    model = tiny("residual")
    set_quantization(residual_int8.fake, False)
    try:
        with torch.no_grad():
            assert torch.allclose(residual_int8.fake(X), model(X), atol=1e-4)
    finally:
        set_quantization(residual_int8.fake, True)
    sqnr = [float(r["SQNR dB"]) for r in residual_int8.report(X).rows]
    assert min(sqnr) > 20
