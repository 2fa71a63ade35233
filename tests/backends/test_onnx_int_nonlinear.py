"""The ONNX spelling of the integer softmax, GELU and LayerNorm: ONNX Runtime's float64 codes equal numpy
int64's bit for bit, with and without graph optimisations, and the models pass the full checker."""
from __future__ import annotations

import numpy as np
import pytest

from fxq import int_nonlinear as inl
from fxq.backends import onnx_int_nonlinear as oin
from kernel_checks import StandInBuilder, assert_ort_exact, model_of

RANGES = {"int8": (-128, 127), "uint8": (0, 255)}
OUT = {"int8": (-128, 127), "uint8": (0, 255), "wide": (-2 ** 31, 2 ** 31 - 1)}     # the accumulator range: no clamping


def build(fn, consts, lo, hi, dims):
    b = StandInBuilder()
    return model_of(b, {"x": dims}, oin.emit(b, fn, "x", consts, lo, hi, prefix=f"{fn}0"), dims)


def assert_exact(model, q, ref):
    assert_ort_exact(model, {"x": q}, ref)


def codes(fmt, n, seed):
    """Uniform rows over the whole range plus all-min, all-max, constant, alternating and lone-extreme rows."""
    lo, hi = RANGES[fmt]
    rng = np.random.default_rng(seed)
    q = rng.integers(lo, hi + 1, (24, n))
    one_hi, one_lo = np.full(n, lo), np.full(n, hi)
    one_hi[n // 2], one_lo[0] = hi, lo
    special = [np.full(n, lo), np.full(n, hi), np.full(n, (lo + hi) // 2), np.full(n, 0 if lo < 0 else 1),
               np.where(np.arange(n) % 2 == 0, lo, hi), one_hi, one_lo]
    return np.concatenate([q, np.stack(special)]).astype(np.int64)


def batched(q):
    """[N, D] codes, and as [2, H, T, D] (with the rows reversed in every other slice)."""
    return [q, np.stack([q, q[::-1]] * 3).reshape(2, 3, *q.shape)]


def dims(q, d):
    return (["N", "H", "T"] if q.ndim == 4 else ["N"]) + [d]


def check(fn, consts, ref_fn, q, out, d="D"):
    """Every batch shape of q through the emitted graph equals the numpy reference."""
    lo, hi = OUT[out]
    for x in batched(q):
        assert_exact(build(fn, consts, lo, hi, dims(x, d)), x, ref_fn(x, lo, hi))


@pytest.mark.parametrize("fmt", sorted(RANGES))
@pytest.mark.parametrize("fi,fo,out", [(4, 8, "uint8"), (0, 7, "int8"), (-8, 0, "uint8"), (7, 22, "wide"),
                                       (24, 8, "uint8")])
def test_softmax_matches_numpy(fmt, fi, fo, out):
    c = inl.softmax_constants(fi, fo)
    for n in (1, 10, 64):
        check("softmax", c, lambda q, lo, hi: inl.int_softmax(q, fi, fo, lo, hi), codes(fmt, n, [n, fi + 8]), out)


@pytest.mark.parametrize("fmt", sorted(RANGES))
@pytest.mark.parametrize("fi,fo,out", [(4, 5, "int8"), (5, 4, "int8"), (-8, -8, "int8"), (22, 24, "wide"),
                                       (6, 5, "uint8")])
def test_gelu_matches_numpy(fmt, fi, fo, out):
    c = inl.gelu_constants(fi, fo)
    lo, hi = RANGES[fmt]
    q = np.concatenate([np.arange(lo, hi + 1).reshape(16, 16), codes(fmt, 16, fi + 8)])   # every code, and more
    check("gelu", c, lambda x, a, b: inl.int_gelu(x, fi, fo, a, b), q, out)


@pytest.mark.parametrize("fmt", sorted(RANGES))
@pytest.mark.parametrize("n", [16, 64, 192])
@pytest.mark.parametrize("fi,fo,eps,affine,out", [(4, 5, 1e-5, True, "int8"), (0, 3, 1e-6, False, "uint8"),
                                                   (7, 4, 0.0, True, "wide"), (-8, 24, 1e-5, False, "wide"),
                                                   (-8, 24, 1e-5, True, "wide"), (24, 2, 1e-12, True, "int8")])
def test_layer_norm_matches_numpy(fmt, n, fi, fo, eps, affine, out):
    rng = np.random.default_rng([n, fi + 8, fo + 8])
    gamma, beta = (rng.normal(1.0, 0.5, n), rng.normal(0.0, 0.5, n)) if affine else (None, None)
    if fo == 24 and affine:
        gamma, beta = gamma * 2.0 ** -8, beta * 2.0 ** -8       # frac_out 24 needs gamma's step that fine
    c = inl.layer_norm_constants(n, fi, gamma, beta, eps, fo)
    check("layer_norm", c, lambda q, lo, hi: inl.int_layer_norm(q, fi, gamma, beta, eps, fo, lo, hi),
          codes(fmt, n, [n, fi + 8]), out, d=n)


def test_layer_norm_long_rows_split_the_variance():
    """N = 2048 takes the variance at 4**-1 code**2 (var_shift 1): a real shift and a Div by 4 in the graph."""
    n, fi, fo = 2048, 4, 6
    gamma, beta = np.random.default_rng(1).normal(1.0, 0.5, (2, n))
    c = inl.layer_norm_constants(n, fi, gamma, beta, 1e-5, fo)
    assert c.var_shift == 1
    q = codes("int8", n, 7)[::3]
    check("layer_norm", c, lambda x, lo, hi: inl.int_layer_norm(x, fi, gamma, beta, 1e-5, fo, lo, hi), q, "wide", d=n)


def test_every_operator_has_a_float64_kernel():
    """The operators the algorithms do not use today (<=, !=, ~, scalars on the left, None clip bounds) too."""
    def f(xp, x):
        a = xp.where((x <= 3) | ~(x != -5), 3 - x, 2 * x) + xp.clip(-x, None, 100)
        b = xp.where((x >= 0) & (x < 7), xp.floor_div(a, 3), xp.shift_right_floor(a, 2) + xp.amax(x))
        return b * 5 - xp.sum(xp.abs(x)) + xp.where(x > 1, 4, 1)
    b = StandInBuilder()
    xp = oin.OnnxOps(b, "ops")
    model = model_of(b, {"x": ["N", "D"]}, f(xp, xp.codes("x", "ops")).name, ["N", "D"])
    q = codes("int8", 16, 3)
    assert_exact(model, q, f(inl.NUMPY, q))


def test_node_names_are_unique_across_emits_and_constants_shared():
    b = StandInBuilder()
    c = inl.gelu_constants(4, 5)
    y1 = oin.emit(b, "gelu", "x", c, -128, 127, prefix="a")
    y2 = oin.emit(b, "gelu", y1, c, -128, 127, prefix="b")
    assert len({n.name for n in b.nodes}) == len(b.nodes) and y1 != y2
    assert len(b.inits) < len(b.nodes) // 2


@pytest.mark.parametrize("call,error", [
    (lambda b: oin.emit(b, "tanh", "x", inl.gelu_constants(4, 5), 0, 1, "p"), "unknown integer nonlinearity"),
    (lambda b: oin.emit(b, "softmax", "x", inl.gelu_constants(4, 5), 0, 1, "p"), "SoftmaxConstants"),
    (lambda b: oin.emit(b, "gelu", "x", inl.gelu_constants(4, 5), 2, 1, "p"), "empty output range"),
    (lambda b: oin.OnnxOps(b, "p").codes("x", "f") & 1, "need comparison results"),
])
def test_bad_calls_are_named(call, error):
    with pytest.raises((ValueError, TypeError), match=error):
        call(StandInBuilder())
