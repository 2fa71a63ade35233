"""Integer masked mean and L2 normalisation (sentence-embedding pooling): numpy int64, torch int64, float64
and the ONNX float64 graph (ONNX Runtime, with and without graph optimisations) agree bit for bit, no
intermediate reaches 2**52, and the output stays within the stated bound of the float function.

The bounds, in output steps against torch in float64 on the dequantized input, clamped to the range:
  masked mean   0.5: the exactly rounded quotient (ties to even), checked against exact fractions too
  L2 normalise  0.5 + 2**(frac_out - 25): the integer root of sum(q**2) * 4**p in [2**50, 2**52)
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from fxq import int_nonlinear as inl
from fxq.backends import onnx_int_nonlinear as oin
from kernel_checks import FORMATS, StandInBuilder, assert_ort_exact, model_of, run_all, steps_off

WIDE = (-2 ** 31, 2 ** 31 - 1)          # the accumulator range: no clamping in practice
SLACK = 1e-9                            # torch's float64 reference itself rounds


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def token_codes(rng, fmt, n, t, d):
    """Uniform codes, with all-min, all-max and alternating-extreme sequences among them."""
    r = FORMATS[fmt]
    q = rng.integers(r.lo, r.hi + 1, (n, t, d))
    q[0], q[1] = r.lo, r.hi
    q[2] = np.where((np.arange(t)[:, None] + np.arange(d)) % 2 == 0, r.lo, r.hi)
    return q


def masks(rng, n, t):
    """Random rows, then all valid, one valid (first / last / middle), none valid, a padded tail."""
    v = rng.integers(0, 2, (n, t))
    special = np.zeros((6, t), np.int64)
    special[0] = 1
    special[1, 0] = special[2, -1] = special[3, t // 2] = 1
    special[5, : (t + 1) // 2] = 1                    # special[4]: no valid token
    v[: len(special)] = special[: n]
    return v


# ---------------------------------------------------------------------------------------------
# masked mean
# ---------------------------------------------------------------------------------------------
def mean_ref(q, valid, fi):
    x, m = torch.tensor(q * 2.0 ** -fi), torch.tensor(valid, dtype=torch.float64)
    return ((x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)).numpy()


def mean_exact(q, valid, fi, fo, lo, hi):
    """round-half-even of the exact rational mean, clamped (Fraction rounds half to even)."""
    s = (q * valid[..., None]).sum(1)
    count = np.maximum(valid.sum(1), 1)
    gain = Fraction(2) ** (fo - fi)
    return np.array([[min(max(round(Fraction(int(v), int(c)) * gain), lo), hi) for v in row]
                     for row, c in zip(s, count)], dtype=np.int64)


MEAN_CASES = [("int8", 4, 4, -128, 127), ("int8", 4, 7, -128, 127), ("int8", 6, 3, -128, 127),
              ("uint8", 0, 5, 0, 255), ("int16", 8, 8, -32768, 32767), ("int16", -8, 16, *WIDE),
              ("int16", 24, -8, *WIDE), ("int8", 0, 24, *WIDE)]


@pytest.mark.parametrize("fmt,fi,fo,lo,hi", MEAN_CASES)
@pytest.mark.parametrize("t", [1, 2, 7, 128])
def test_masked_mean_executors_and_error(fmt, fi, fo, lo, hi, t):
    rng = np.random.default_rng([t, fi + 8, fo + 8])
    q, valid = token_codes(rng, fmt, 10, t, 24), masks(rng, 10, t)
    out = run_all(inl.int_masked_mean, (q, valid), fi, fo, lo, hi)
    assert out.shape == (10, 24)
    assert steps_off(out, mean_ref(q, valid, fi), fo, lo, hi).max() <= 0.5 + SLACK
    assert np.array_equal(out, mean_exact(q, valid, fi, fo, lo, hi))
    assert not out[valid.sum(1) == 0].any()                        # no valid token: 0


@pytest.mark.parametrize("fi,fo", [(0, 24), (-8, 16), (24, -8), (24, 24)])
def test_masked_mean_longest_sequence(fi, fo):
    """T = 4096 tokens at both int16 extremes, all valid: |sum| * 2**24 = 2**51, the largest intermediate."""
    t = inl.MEAN_MAX_LEN
    q = np.stack([np.full((t, 3), -32768), np.full((t, 3), 32767), np.arange(t * 3).reshape(t, 3) % 65536 - 32768])
    valid = np.stack([np.ones(t, np.int64), np.ones(t, np.int64), np.arange(t) % 3 == 0]).astype(np.int64)
    out = run_all(inl.int_masked_mean, (q, valid), fi, fo, *WIDE)
    assert np.array_equal(out, mean_exact(q, valid, fi, fo, *WIDE))
    assert steps_off(out, mean_ref(q, valid, fi), fo, *WIDE).max() <= 0.5 + SLACK


def test_masked_mean_ties_to_even_and_bool_mask():
    q = np.array([[[1], [2], [0]], [[3], [0], [0]], [[5], [0], [0]], [[-3], [0], [0]]])    # means 1.5, 1.5 ...
    valid = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]])
    out = run_all(inl.int_masked_mean, (q, valid), 0, 0, -128, 127)
    assert out[:, 0].tolist() == [2, 2, 2, -2]                     # 1.5, 1.5, 2.5, -1.5
    assert np.array_equal(inl.int_masked_mean(q, valid.astype(bool), 0, 0, -128, 127), out)
    t = inl.int_masked_mean(torch.tensor(q), torch.tensor(valid, dtype=torch.bool), 0, 0, -128, 127)
    assert np.array_equal(t.numpy(), out)


# ---------------------------------------------------------------------------------------------
# L2 normalisation
# ---------------------------------------------------------------------------------------------
def l2_bound(fo):
    return 0.5 + 2.0 ** (fo - 25) + SLACK


def l2_rows(rng, fmt, rows, d):
    """Uniform rows, peaked rows, and extremes: zero, one nonzero code, constant min / max, alternating."""
    r = FORMATS[fmt]
    q = rng.integers(r.lo, r.hi + 1, (rows, d))
    peaked = np.clip(np.rint(rng.normal(0, (r.hi - r.lo) / 64, (2, d))), r.lo, r.hi).astype(np.int64)
    one = np.zeros((3, d), np.int64)
    one[0, 0], one[1, -1], one[2, d // 2] = r.hi, r.lo, 1
    special = [np.zeros(d), np.full(d, r.lo), np.full(d, r.hi), np.where(np.arange(d) % 2 == 0, r.lo, r.hi)]
    return np.concatenate([q, peaked, one, np.stack(special)]).astype(np.int64)


L2_CASES = [("int8", 4, 7, -128, 127), ("int8", 0, 6, -128, 127), ("uint8", 8, 8, 0, 255),
            ("int16", 8, 15, -32768, 32767), ("int16", 12, 14, -32768, 32767), ("int16", -8, 0, -128, 127),
            ("int16", 24, 24, *WIDE), ("int8", 4, 20, *WIDE)]


@pytest.mark.parametrize("fmt,fi,fo,lo,hi", L2_CASES)
@pytest.mark.parametrize("d", [1, 2, 7, 384])
def test_l2_normalize_executors_and_error(fmt, fi, fo, lo, hi, d):
    q = l2_rows(np.random.default_rng([d, fi + 8, fo]), fmt, 8, d)
    out = run_all(inl.int_l2_normalize, (q,), fi, fo, lo, hi)
    ref = F.normalize(torch.tensor(q * 2.0 ** -fi), dim=-1, eps=1e-12).numpy()
    assert steps_off(out, ref, fo, lo, hi).max() <= l2_bound(fo)
    assert np.abs(out).max() <= 2 ** fo and not out[~q.any(-1)].any()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_l2_normalize_longest_rows_and_batches(fmt):
    q = l2_rows(np.random.default_rng(4), fmt, 3, inl.L2_MAX_LEN)     # 12 rows
    for fi, fo in [(8, 15), (24, 24), (-8, 0)]:
        out = run_all(inl.int_l2_normalize, (q.reshape(2, 6, -1),), fi, fo, *WIDE)
        ref = F.normalize(torch.tensor(q * 2.0 ** -fi), dim=-1).numpy().reshape(2, 6, -1)
        assert steps_off(out, ref, fo, *WIDE).max() <= l2_bound(fo)


def test_l2_normalize_eps_only_touches_zero_rows():
    """Every eps <= 2**-frac_in gives the same codes, and torch's result at that eps is within the bound."""
    q = l2_rows(np.random.default_rng(2), "int8", 8, 16)
    base = inl.int_l2_normalize(q, 6, 7, -128, 127, eps=0.0)
    for eps in (1e-12, 1e-5, 2.0 ** -6):
        assert np.array_equal(inl.int_l2_normalize(q, 6, 7, -128, 127, eps=eps), base)
        ref = F.normalize(torch.tensor(q * 2.0 ** -6), dim=-1, eps=eps).numpy()
        assert steps_off(base, ref, 7, -128, 127).max() <= l2_bound(7)


def test_l2_normalize_single_code_is_exactly_one():
    q = np.array([[0, 5, 0], [0, 0, -32768], [1, 0, 0]])
    out = run_all(inl.int_l2_normalize, (q,), 3, 15, *WIDE)
    assert out.tolist() == [[0, 2 ** 15, 0], [0, 0, -2 ** 15], [2 ** 15, 0, 0]]


# ---------------------------------------------------------------------------------------------
# random formats and codes (hypothesis)
# ---------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 5), st.integers(*inl.MEAN_FRAC),
       st.integers(*inl.MEAN_FRAC), st.integers(0, 2 ** 32))
def test_masked_mean_any_format(n, t, d, fi, fo, seed):
    fo = min(fo, fi + inl.MEAN_MAX_GAIN_LOG2)
    rng = np.random.default_rng(seed)
    q, valid = rng.integers(-32768, 32768, (n, t, d)), rng.integers(0, 2, (n, t))
    out = run_all(inl.int_masked_mean, (q, valid), fi, fo, *WIDE)
    assert np.array_equal(out, mean_exact(q, valid, fi, fo, *WIDE))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 24), st.integers(*inl.L2_FRAC_IN), st.integers(*inl.L2_FRAC_OUT),
       st.integers(0, 15), st.integers(0, 2 ** 32))
def test_l2_normalize_any_format(n, d, fi, fo, bits, seed):
    q = np.random.default_rng(seed).integers(-2 ** bits, 2 ** bits, (n, d))
    out = run_all(inl.int_l2_normalize, (q,), fi, fo, *WIDE)
    ref = F.normalize(torch.tensor(q * 2.0 ** -fi), dim=-1).numpy()
    assert steps_off(out, ref, fo, *WIDE).max() <= l2_bound(fo)


# ---------------------------------------------------------------------------------------------
# ONNX: the traced graph in ONNX Runtime equals numpy
# ---------------------------------------------------------------------------------------------
def mean_model(fi, fo, lo, hi):
    b = StandInBuilder()
    y = oin.emit(b, "masked_mean", "x", inl.masked_mean_constants(fi, fo), lo, hi, prefix="mm",
                 extra={"valid": "valid"})
    return model_of(b, {"x": ["N", "T", "D"], "valid": ["N", "T"]}, y, ["N", "D"])


def l2_model(fi, fo, lo, hi, d, rank):
    b = StandInBuilder()
    y = oin.emit(b, "int_l2_normalize", "x", inl.l2_normalize_constants(fi, fo, d), lo, hi, prefix="l2")
    dims = ["B", "H", "N"][: rank - 1] + [d]
    return model_of(b, {"x": dims}, y, dims)


@pytest.mark.parametrize("fmt,fi,fo,lo,hi", [MEAN_CASES[i] for i in (0, 2, 3, 5, 6)])
def test_masked_mean_onnx_matches_numpy(fmt, fi, fo, lo, hi):
    model = mean_model(fi, fo, lo, hi)
    for t in (1, 7, 128):
        rng = np.random.default_rng([t, fi + 8])
        q, valid = token_codes(rng, fmt, 10, t, 16), masks(rng, 10, t)
        assert_ort_exact(model, {"x": q, "valid": valid}, inl.int_masked_mean(q, valid, fi, fo, lo, hi))
    t = inl.MEAN_MAX_LEN                                            # the largest sums
    q, valid = np.full((2, t, 2), FORMATS[fmt].lo), np.ones((2, t), np.int64)
    q[1], valid[1, ::2] = FORMATS[fmt].hi, 0
    assert_ort_exact(model, {"x": q, "valid": valid}, inl.int_masked_mean(q, valid, fi, fo, lo, hi))


@pytest.mark.parametrize("fmt,fi,fo,lo,hi", [L2_CASES[i] for i in (0, 2, 3, 5, 6)])
def test_l2_normalize_onnx_matches_numpy(fmt, fi, fo, lo, hi):
    for d in (1, 7, 384):
        q = l2_rows(np.random.default_rng([d, fo]), fmt, 8, d)
        for x in (q, np.stack([q, q[::-1]] * 3).reshape(2, 3, *q.shape)):
            assert_ort_exact(l2_model(fi, fo, lo, hi, d, x.ndim), {"x": x}, inl.int_l2_normalize(x, fi, fo, lo, hi))
    q = l2_rows(np.random.default_rng(9), fmt, 2, inl.L2_MAX_LEN)
    assert_ort_exact(l2_model(fi, fo, lo, hi, q.shape[-1], 2), {"x": q}, inl.int_l2_normalize(q, fi, fo, lo, hi))


def test_pooling_chain_in_one_graph():
    """masked mean then L2 normalisation, as a sentence-embedding head: shared constants, unique names."""
    b = StandInBuilder()
    m = oin.emit(b, "masked_mean", "x", inl.masked_mean_constants(4, 6), -128, 127, "mm", extra={"valid": "valid"})
    y = oin.emit(b, "l2_normalize", m, inl.l2_normalize_constants(6, 7, 32), -128, 127, "l2")
    model = model_of(b, {"x": ["N", "T", 32], "valid": ["N", "T"]}, y, ["N", 32])
    rng = np.random.default_rng(0)
    q, valid = token_codes(rng, "int8", 10, 9, 32), masks(rng, 10, 9)
    ref = inl.int_l2_normalize(inl.int_masked_mean(q, valid, 4, 6, -128, 127), 6, 7, -128, 127)
    assert_ort_exact(model, {"x": q, "valid": valid}, ref)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
Q, V = np.zeros((2, 3, 4), np.int64), np.ones((2, 3), np.int64)
BAD = [
    (lambda: inl.int_masked_mean(Q.astype(np.float32), V, 4, 4, -128, 127), "integer array"),
    (lambda: inl.int_masked_mean(torch.zeros(2, 3, 4), torch.ones(2, 3), 4, 4, -128, 127), "integer tensor"),
    (lambda: inl.int_masked_mean(Q[0], V, 4, 4, -128, 127), r"shape \[N, T, D\]"),
    (lambda: inl.int_masked_mean(np.zeros((2, 0, 4), np.int64), V[:, :0], 4, 4, -128, 127), "token axis"),
    (lambda: inl.int_masked_mean(np.zeros((1, 4097, 1), np.int64), np.ones((1, 4097), np.int64), 4, 4, -128, 127),
     "4097 elements, at most 4096"),
    (lambda: inl.int_masked_mean(np.zeros((2, 3, 0), np.int64), V, 4, 4, -128, 127), "last axis is empty"),
    (lambda: inl.int_masked_mean(Q + 40000, V, 4, 4, -128, 127), "outside the supported int16 range"),
    (lambda: inl.int_masked_mean(Q, V[:, :2], 4, 4, -128, 127), r"valid must have shape \(2, 3\)"),
    (lambda: inl.int_masked_mean(Q, V * 2, 4, 4, -128, 127), "only 0 and 1"),
    (lambda: inl.int_masked_mean(Q, -V, 4, 4, -128, 127), "only 0 and 1"),
    (lambda: inl.int_masked_mean(Q, V * 0.5, 4, 4, -128, 127), "valid mask"),
    (lambda: inl.int_masked_mean(Q, V, 25, 4, -128, 127), "frac_in=25 is outside"),
    (lambda: inl.int_masked_mean(Q, V, 4, -9, -128, 127), "frac_out=-9 is outside"),
    (lambda: inl.int_masked_mean(Q, V, -8, 17, -128, 127), "frac_out - frac_in = 25 is too large"),
    (lambda: inl.int_masked_mean(Q, V, 4, 4, 1, 0), "empty output range"),
    (lambda: inl.int_masked_mean(Q, V, 4.0, 4, -128, 127), "frac_in must be an integer"),
    (lambda: inl.int_l2_normalize(np.zeros(4), 4, 7, -128, 127), "integer array"),
    (lambda: inl.int_l2_normalize(np.array(3), 4, 7, -128, 127), "at least one axis"),
    (lambda: inl.int_l2_normalize(np.zeros((2, 0), np.int64), 4, 7, -128, 127), "last axis is empty"),
    (lambda: inl.int_l2_normalize(np.zeros((1, 4097), np.int64), 4, 7, -128, 127), "4097 elements, at most 4096"),
    (lambda: inl.int_l2_normalize(np.array([-40000, 0]), 4, 7, -128, 127), "outside the supported int16 range"),
    (lambda: inl.int_l2_normalize(Q, 4, -1, -128, 127), "frac_out=-1 is outside"),
    (lambda: inl.int_l2_normalize(Q, 4, 25, -128, 127), "frac_out=25 is outside"),
    (lambda: inl.int_l2_normalize(Q, 25, 7, -128, 127), "frac_in=25 is outside"),
    (lambda: inl.int_l2_normalize(Q, 4, 7, -128, 127, eps=-1e-12), "eps must be a finite number"),
    (lambda: inl.int_l2_normalize(Q, 4, 7, -128, 127, eps=float("nan")), "eps must be a finite number"),
    (lambda: inl.int_l2_normalize(Q, 20, 7, -128, 127, eps=1e-5), "eps=1e-05 exceeds 2\\*\\*-20"),
    (lambda: inl.l2_normalize_constants(4, 7, 0), "last axis length=0"),
    (lambda: oin.emit(StandInBuilder(), "masked_mean", "x", inl.masked_mean_constants(4, 4), 0, 1, "p"),
     r"extra inputs must be exactly \['valid'\]"),
    (lambda: oin.emit(StandInBuilder(), "l2_normalize", "x", inl.l2_normalize_constants(4, 4, 8), 0, 1, "p",
                      extra={"valid": "v"}), r"extra inputs must be exactly \[\]"),
]


@pytest.mark.parametrize("call,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_traces_are_named():
    with pytest.raises(TypeError, match="MaskedMeanConstants"):
        oin.emit(StandInBuilder(), "masked_mean", "x", inl.l2_normalize_constants(4, 4, 8), 0, 1, "p",
                 extra={"valid": "v"})
    with pytest.raises(TypeError, match=r"only x\[..., None\]"):
        oin.OnnxOps(StandInBuilder(), "p").codes("x", "f")[:, None]
