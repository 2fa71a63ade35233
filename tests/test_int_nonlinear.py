"""Integer softmax, GELU and LayerNorm: numpy int64, torch int64 and float64 (the ONNX model) agree bit for
bit, no intermediate reaches 2**52, and the output stays within a stated bound of the float function.

The bounds (in output steps, against torch in float64 on the dequantized input, clamped to the range):
  softmax    0.5 + 2**frac_out * (6e-7 + (N + 1) * 2**-28)   relative exp error 2.4e-7 in the numerator and
                                                              the sum, then the floors of N exps at 2**-28
  GELU       0.5 + 2**frac_out * 1.28e-4                      polynomial 1.227e-4, cutoff at 4: 1.267e-4
  LayerNorm  0.5 + 2**frac_out * dy, per element (``ln_bound``): the root's relative error, the rounding
             of the normalised value at 2**-17 and of gamma at half its step.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxq import int_nonlinear as inl
from fxq.formats import Rounding, shift_round_np
from kernel_checks import BOUNDED, FORMATS, Bounded, run_all, steps_off

def random_codes(rng, fmt, rows, n):
    """Uniform codes over the whole range, both boundary codes in every row, plus peaked and constant rows."""
    r = FORMATS[fmt]
    q = rng.integers(r.lo, r.hi + 1, (rows, n))
    q[:, 0], q[:, -1] = r.lo, r.hi
    peaked = np.clip(np.rint(rng.normal(rng.integers(r.lo, r.hi + 1, (rows, 1)), (r.hi - r.lo) / 40, (rows, n))),
                     r.lo, r.hi).astype(np.int64)
    const = np.repeat(rng.integers(r.lo, r.hi + 1, (2, 1)), n, axis=1)
    return np.concatenate([q, peaked, const, np.full((1, n), r.lo), np.full((1, n), r.hi)])


def extreme_rows(fmt, n):
    """All-min, all-max, alternating, one max among mins and one min among maxes."""
    r = FORMATS[fmt]
    alt = np.where(np.arange(n) % 2 == 0, r.lo, r.hi)
    one_hi = np.full(n, r.lo)
    one_hi[0] = r.hi
    one_lo = np.full(n, r.hi)
    one_lo[-1] = r.lo
    return np.stack([np.full(n, r.lo), np.full(n, r.hi), alt, one_hi, one_lo]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def test_round_shift_and_round_div_are_half_even():
    a = np.arange(-4100, 4100)
    for k in range(0, 7):
        want = shift_round_np(a, k, Rounding.HALF_EVEN)
        for xp, x in [(inl.NUMPY, a), (inl.FLOAT64, a.astype(np.float64)), (inl.TORCH, torch.as_tensor(a))]:
            assert np.array_equal(np.asarray(inl.round_shift(xp, x, k)), want), (xp, k)
    for b in (1, 2, 3, 7, 10, 255):
        want = np.array([round(Fraction(int(v), b)) for v in a])      # Fraction rounds half to even
        assert np.array_equal(inl.round_div(inl.NUMPY, a, b), want), b
        assert np.array_equal(inl.round_div(inl.FLOAT64, a.astype(np.float64), float(b)), want), b


def test_isqrt_is_exact_up_to_2_52():
    r = np.arange(1, 2 ** 26, 9973, dtype=np.int64)
    edges = np.concatenate([[0, 1, 2, 3, 4, 2 ** 52 - 1, 2 ** 50, 2 ** 50 - 1], r * r, r * r - 1, r * r + r,
                            (r + 1) * (r + 1) - 1, np.random.default_rng(0).integers(0, 2 ** 52, 5000)])
    edges = edges[(edges >= 0) & (edges < 2 ** 52)]
    want = np.array([math.isqrt(int(v)) for v in edges])
    assert np.array_equal(inl.isqrt(inl.NUMPY, edges), want)
    assert np.array_equal(inl.isqrt(inl.TORCH, torch.as_tensor(edges)).numpy(), want)
    assert np.array_equal(inl.isqrt(BOUNDED, edges.astype(np.float64).view(Bounded)).view(np.ndarray), want)


def test_polynomial_constants():
    """The integer constants are what their comments say, so an exporter may bake them as they are."""
    assert abs(inl.LOG2E_Q - math.log2(math.e) * 2 ** inl.LOG2E_FRAC) < 0.5 + 1e-5
    f = inl.EXP_POLY_FRAC
    r = np.arange(0, 2 ** f, 61, dtype=np.int64)
    p = inl._horner(inl.NUMPY, inl.EXP2_POLY, r, f)
    assert inl.EXP2_POLY[0] == 2 ** f and np.abs(p / 2.0 ** f / np.exp2(r / 2.0 ** f) - 1).max() <= 1.96e-7
    g = inl.GELU_FRAC
    s = np.arange(0, 2 ** g + 1, 61, dtype=np.int64)
    res = inl._horner(inl.NUMPY, inl.GELU_POLY, 2 * s - 2 ** g, g)
    t = s / 2.0 ** g * 2 ** inl.GELU_CUTOFF_LOG2
    exact = t * 0.5 * np.array([math.erfc(v / math.sqrt(2)) for v in t])
    assert res[0] == 0 and np.abs(res / 2.0 ** g - exact).max() <= 1.227e-4


def test_constants_are_plain_integers():
    c = inl.softmax_constants(4, 8)
    assert all(isinstance(v, int) for k, v in vars(c).items() if k != "poly")
    g = inl.gelu_constants(4, 5)
    assert all(isinstance(v, int) for k, v in vars(g).items() if k != "poly")
    ln = inl.layer_norm_constants(64, 3, np.linspace(0.5, 1.5, 64), np.linspace(-0.2, 0.2, 64), 1e-5, 5)
    again = inl.layer_norm_constants(64, 3, np.linspace(0.5, 1.5, 64), np.linspace(-0.2, 0.2, 64), 1e-5, 5)
    assert ln.gamma.dtype == np.int64 and np.array_equal(ln.gamma, again.gamma) and ln.eps == again.eps
    assert ln.gamma_frac == 14 and np.abs(ln.gamma).max() <= 2 ** 15     # max|gamma| = 1.5 < 2**1


# ---------------------------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------------------------
SOFTMAX_CASES = [("int8", 3, 8, 0, 255), ("int8", 4, 8, 0, 255), ("int8", 5, 8, 0, 255), ("uint8", 0, 8, 0, 255),
                 ("int8", -2, 7, -128, 127), ("int16", 8, 15, 0, 65535), ("int16", 12, 16, 0, 65535),
                 ("int16", 24, 22, 0, 2 ** 22)]


def softmax_bound(n, frac_out):
    return 0.5 + 2.0 ** frac_out * (6e-7 + (n + 1) * 2.0 ** -inl.EXP_FRAC)


@pytest.mark.parametrize("fmt,fi,fo,lo,hi", SOFTMAX_CASES)
@pytest.mark.parametrize("n", [1, 7, 197])
def test_softmax_executors_and_error(fmt, fi, fo, lo, hi, n):
    q = random_codes(np.random.default_rng([n, fi + 8]), fmt, 12, n)
    out = run_all(inl.int_softmax, q, fi, fo, lo, hi)
    ref = torch.softmax(torch.tensor(q * 2.0 ** -fi), -1).numpy()
    assert steps_off(out, ref, fo, lo, hi).max() <= softmax_bound(n, fo)
    assert out.min() >= lo and out.max() <= hi


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("fi,fo", [(-8, 0), (-8, 22), (24, 22), (0, 8)])
def test_softmax_extremes(fmt, fi, fo):
    for n in (1, 2, 4096):
        q = extreme_rows(fmt, n)
        out = run_all(inl.int_softmax, q, fi, fo, 0, 2 ** fo)
        ref = torch.softmax(torch.tensor(q * 2.0 ** -fi), -1).numpy()
        assert steps_off(out, ref, fo, 0, 2 ** fo).max() <= softmax_bound(n, fo)


def test_softmax_longest_row():
    q = np.stack([np.full(inl.SOFTMAX_MAX_LEN, 32767), np.arange(inl.SOFTMAX_MAX_LEN) - 32768])
    out = run_all(inl.int_softmax, q, 12, 22, 0, 2 ** 22)
    ref = torch.softmax(torch.tensor(q * 2.0 ** -12), -1).numpy()
    assert steps_off(out, ref, 22, 0, 2 ** 22).max() <= softmax_bound(q.shape[1], 22)


# ---------------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------------
GELU_ERR = 1.28e-4


@pytest.mark.parametrize("fmt,fi,fo", [("int8", 4, 4), ("int8", 4, 5), ("int8", 5, 4), ("int8", 5, 5),
                                       ("uint8", 6, 5), ("int8", -8, -8), ("int8", 22, 24),
                                       ("int16", 8, 8), ("int16", 12, 12), ("int16", 10, 14)])
def test_gelu_every_code(fmt, fi, fo):
    r = FORMATS[fmt]
    out_r = FORMATS["int16"] if fmt == "int16" or fo > 12 else FORMATS["int8"]
    q = np.arange(r.lo, r.hi + 1)
    out = run_all(inl.int_gelu, q, fi, fo, out_r.lo, out_r.hi)
    ref = F.gelu(torch.tensor(q * 2.0 ** -fi)).numpy()
    assert steps_off(out, ref, fo, out_r.lo, out_r.hi).max() <= 0.5 + 2.0 ** fo * GELU_ERR
    assert out.min() >= out_r.lo and out.max() <= out_r.hi


def test_gelu_keeps_shape_and_zero():
    q = np.zeros((2, 3, 4), np.int64)
    assert np.array_equal(run_all(inl.int_gelu, q, 4, 5, -128, 127), q)


# ---------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------
def ln_ref(q, fi, gamma, beta, eps):
    x = torch.tensor(q * 2.0 ** -fi)
    return F.layer_norm(x, (q.shape[-1],), torch.tensor(gamma), torch.tensor(beta), eps).numpy()


def ln_bound(q, fi, gamma, eps, fo):
    """Per element, in output steps. N**2 (var + eps) / 4**j is off by < 1.5 (one floor, eps's rounding)
    and its root by 2**-25 relative, so the root's relative error is rho <= 0.75 / Y + 2**-25 with Y that
    quantity; the normalised value n is off by |n| rho / (1 - rho) + 2**-17 and gamma by half its step."""
    c = inl.layer_norm_constants(q.shape[-1], fi, gamma, None, eps, fo)
    x = q * 2.0 ** -fi
    n_el = q.shape[-1]
    var = x.var(-1, keepdims=True)
    big_y = n_el ** 2 * (var + eps) * 4.0 ** (fi - c.var_shift)
    rho = 0.75 / np.maximum(big_y - 1.5, 1e-300) + 2.0 ** -25
    norm = np.abs(x - x.mean(-1, keepdims=True)) / np.sqrt(var + eps)
    dn = norm * rho / (1 - rho) + 2.0 ** -(inl.LN_NORM_FRAC + 1)
    dg = 2.0 ** -(c.gamma_frac + 1)
    dy = dn * (np.abs(gamma) + dg) + norm * dg + dg * 2.0 ** -inl.LN_NORM_FRAC
    return 0.5 + 2.0 ** fo * dy


LN_CASES = [("int8", 2, 4, 64), ("int8", 3, 5, 96), ("int8", 4, 5, 192), ("uint8", 3, 4, 128),
            ("int8", 3, 5, 768), ("int16", 10, 5, 64), ("int16", 8, 12, 1024), ("int16", 12, 10, 4096)]


@pytest.mark.parametrize("fmt,fi,fo,n", LN_CASES)
def test_layer_norm_executors_and_error(fmt, fi, fo, n):
    rng = np.random.default_rng(n + fi)
    q = random_codes(rng, fmt, 6, n)
    gamma, beta = rng.normal(1.0, 0.3, n), rng.normal(0.0, 0.2, n)
    out_r = FORMATS["int16"] if fo > 5 else FORMATS["int8"]
    for eps in (1e-5, 1e-12):
        out = run_all(inl.int_layer_norm, q, fi, gamma, beta, eps, fo, out_r.lo, out_r.hi)
        off = steps_off(out, ln_ref(q, fi, gamma, beta, eps), fo, out_r.lo, out_r.hi)
        assert (off <= ln_bound(q, fi, gamma, eps, fo)).all(), off.max()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("n", [1, 2, 1023, 1024, 4096])
def test_layer_norm_extremes(fmt, n):
    """Constant rows (variance 0, also with eps 0), alternating and lone extremes, at the frac limits."""
    rng = np.random.default_rng(n)
    q = extreme_rows(fmt, n)
    gamma, beta = rng.normal(0.0, 2.0, n), rng.normal(0.0, 1.0, n)
    for fi, fo, eps in [(-8, -8, 1e-5), (24, 8, 1e-12), (3, 5, 0.0), (3, 24, 1e-5)]:
        out = run_all(inl.int_layer_norm, q, fi, gamma * 2.0 ** -8 if fo == 24 else gamma, beta, eps, fo, -128, 127)
        assert out.min() >= -128 and out.max() <= 127
    const = run_all(inl.int_layer_norm, q[:2], 3, gamma, beta, 0.0, 5, -1000, 1000)
    assert np.array_equal(const, np.broadcast_to(np.clip(np.rint(beta * 32), -1000, 1000), const.shape))


def test_layer_norm_without_affine_and_batched():
    q = random_codes(np.random.default_rng(5), "int8", 4, 64).reshape(3, 4, 64)
    out = run_all(inl.int_layer_norm, q, 3, None, None, 1e-5, 5, -128, 127)
    ones = inl.int_layer_norm(q, 3, np.ones(64), np.zeros(64), 1e-5, 5, -128, 127)
    assert out.shape == q.shape and np.array_equal(out, ones)


# ---------------------------------------------------------------------------------------------
# random formats and codes (hypothesis)
# ---------------------------------------------------------------------------------------------
code_rows = st.integers(1, 3).flatmap(lambda rows: st.integers(1, 24).flatmap(
    lambda n: st.lists(st.lists(st.integers(-32768, 32767), min_size=n, max_size=n), min_size=rows, max_size=rows)))


@settings(max_examples=40, deadline=None)
@given(code_rows, st.integers(*inl.SOFTMAX_FRAC_IN), st.integers(*inl.SOFTMAX_FRAC_OUT))
def test_softmax_any_format(rows, fi, fo):
    run_all(inl.int_softmax, np.array(rows), fi, fo, 0, 2 ** fo)


@settings(max_examples=40, deadline=None)
@given(code_rows, st.integers(*inl.GELU_FRAC_IN), st.integers(*inl.GELU_FRAC_OUT))
def test_gelu_any_format(rows, fi, fo):
    run_all(inl.int_gelu, np.array(rows), fi, fo, -32768, 32767)


@settings(max_examples=40, deadline=None)
@given(code_rows, st.integers(-8, 16), st.integers(-8, 16), st.sampled_from([0.0, 1e-12, 1e-5, 1e-2]),
       st.floats(-8, 8), st.floats(-8, 8))
def test_layer_norm_any_format(rows, fi, fo, eps, g, b):
    q = np.array(rows)
    n = q.shape[-1]
    run_all(inl.int_layer_norm, q, fi, np.linspace(g, -g / 2, n), np.full(n, b), eps, fo, -32768, 32767)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
GAMMA, BETA = np.ones(8), np.zeros(8)
BAD = [
    (lambda: inl.int_softmax(np.zeros((2, 8), np.float32), 4, 8, 0, 255), "integer array"),
    (lambda: inl.int_softmax(torch.zeros(2, 8), 4, 8, 0, 255), "integer tensor"),
    (lambda: inl.int_gelu(np.zeros(8), 4, 5, -128, 127), "integer array"),
    (lambda: inl.int_layer_norm(np.full((2, 8), 0.5), 4, GAMMA, BETA, 1e-5, 5, -128, 127), "integer array"),
    (lambda: inl.int_softmax(np.zeros(8, np.int64) + 0.5, 4, 8, 0, 255, xp=inl.FLOAT64), "integer-valued"),
    (lambda: inl.int_softmax(np.zeros(8, np.int64), 25, 8, 0, 255), r"frac_in=25 is outside"),
    (lambda: inl.int_softmax(np.zeros(8, np.int64), 4, 23, 0, 255), r"frac_out=23 is outside"),
    (lambda: inl.int_softmax(np.zeros(8, np.int64), 4.0, 8, 0, 255), "frac_in must be an integer"),
    (lambda: inl.int_gelu(np.zeros(8, np.int64), 23, 5, -128, 127), r"frac_in=23 is outside"),
    (lambda: inl.int_layer_norm(np.zeros((2, 8), np.int64), 4, GAMMA, BETA, 1e-5, 25, -128, 127), "frac_out=25"),
    (lambda: inl.int_layer_norm(np.zeros((1, 4097), np.int64), 4, None, None, 1e-5, 5, -128, 127),
     "4097 elements, at most 4096"),
    (lambda: inl.int_softmax(np.zeros((1, 2 ** 16 + 1), np.int64), 4, 8, 0, 255), "65537 elements, at most 65536"),
    (lambda: inl.int_softmax(np.array([0, 40000]), 4, 8, 0, 255), "outside the supported int16 range"),
    (lambda: inl.int_gelu(torch.tensor([-40000]), 4, 5, -128, 127), "outside the supported int16 range"),
    (lambda: inl.int_softmax(np.array(3), 4, 8, 0, 255), "at least one axis"),
    (lambda: inl.int_layer_norm(np.zeros((2, 0), np.int64), 4, None, None, 1e-5, 5, -128, 127), "last axis is empty"),
    (lambda: inl.int_softmax(np.zeros(8, np.int64), 4, 8, 255, 0), "empty output range"),
    (lambda: inl.int_layer_norm(np.zeros((2, 8), np.int64), 4, np.ones(7), BETA, 1e-5, 5, -128, 127), "shape"),
    (lambda: inl.int_layer_norm(np.zeros((2, 8), np.int64), 4, GAMMA, BETA, -1e-5, 5, -128, 127), "eps"),
    (lambda: inl.int_layer_norm(np.zeros((2, 8), np.int64), 24, GAMMA, BETA, 1e3, 5, -128, 127),
     "eps=1000.0 is too large"),
    (lambda: inl.int_layer_norm(np.zeros((2, 8), np.int64), 4, GAMMA * 300, BETA, 1e-5, 24, -128, 127),
     "finer than gamma/beta allow"),
]


@pytest.mark.parametrize("call,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
