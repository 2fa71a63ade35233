"""Hand-worked rounding ties and saturation limits: the one place every executor's arithmetic comes from."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxq.formats import (IntRange, Rounding, fake_quant, int_range, noclip_frac, quantize_np, requant_np,
                         round_np, search_frac, shift_round_np)

# acc, shift -> expected code for each mode (acc / 2**shift written out)
TIES = [
    # acc  shift  half_even half_up half_away floor
    (5, 1, 2, 3, 3, 2),        # 2.5
    (7, 1, 4, 4, 4, 3),        # 3.5
    (-5, 1, -2, -2, -3, -3),   # -2.5
    (-7, 1, -4, -3, -4, -4),   # -3.5
    (6, 2, 2, 2, 2, 1),        # 1.5
    (-6, 2, -2, -1, -2, -2),   # -1.5
    (9, 2, 2, 2, 2, 2),        # 2.25
    (-9, 2, -2, -2, -2, -3),   # -2.25
    (3, 0, 3, 3, 3, 3),        # no shift: nothing to round
    (3, -2, 12, 12, 12, 12),   # left shift
]
MODES = [Rounding.HALF_EVEN, Rounding.HALF_UP, Rounding.HALF_AWAY, Rounding.FLOOR]


@pytest.mark.parametrize("row", TIES, ids=[f"{r[0]}>>{r[1]}" for r in TIES])
def test_shift_round_ties(row):
    acc, shift, *expected = row
    for mode, want in zip(MODES, expected):
        assert shift_round_np(np.array([acc]), shift, mode)[0] == want, (acc, shift, mode)


def test_round_real_numbers_match_shift_round():
    for acc, shift, *expected in TIES:
        for mode, want in zip(MODES, expected):
            assert round_np(np.array([acc * 2.0 ** -shift]), mode)[0] == want
            assert float(fake_quant(torch.tensor([acc * 2.0 ** -shift], dtype=torch.float64), 0,
                                    IntRange(-1000, 1000), mode)[0]) == want


def test_ranges():
    assert int_range(8, True) == IntRange(-128, 127)
    assert int_range(8, True, symmetric=True) == IntRange(-127, 127)
    assert int_range(8, False) == IntRange(0, 255)
    assert int_range(4, True, symmetric=True) == IntRange(-7, 7)
    assert int_range(2, True, symmetric=True) == IntRange(-1, 1)


def test_saturation_at_limits():
    r = int_range(8, True)
    assert requant_np(np.array([10**6, -10**6, 255, -257]), 1, r).tolist() == [127, -128, 127, -128]
    assert quantize_np(np.array([1.0, -1.0, 0.99]), 7, r).tolist() == [127, -128, 127]
    u = int_range(8, False)
    assert quantize_np(np.array([-0.1, 2.0, 1.9921875]), 7, u).tolist() == [0, 255, 255]


def test_per_channel_shift():
    acc = np.array([[6, 6, 6]])
    assert shift_round_np(acc, np.array([[1, 2, -1]])).tolist() == [[3, 2, 12]]


@given(st.integers(-2**31, 2**31 - 1), st.integers(0, 20))
def test_shift_round_half_even_matches_float(acc, shift):
    assert shift_round_np(np.array([acc]), shift)[0] == np.rint(acc / 2.0 ** shift)


def test_noclip_frac_and_all_zero_rows():
    r = int_range(8, True)
    assert noclip_frac(np.array([-1.0]), np.array([1.0]), r).tolist() == [6]          # 127/1 -> 2**6 = 64 <= 127
    assert noclip_frac(np.array([-1.0]), np.array([0.5]), r).tolist() == [7]          # -128/2**7 = -1 fits
    assert noclip_frac(np.array([0.0]), np.array([0.0]), r).tolist() == [6]           # neutral format, no huge shift
    assert noclip_frac(np.array([0.0]), np.array([0.0]), int_range(8, False)).tolist() == [7]


def test_search_frac_trades_clipping_for_rounding():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(20000)
    x[0] = 40.0                                   # one outlier: the no-clip format wastes range on it
    r = int_range(8, True)
    f0 = noclip_frac(x.min(keepdims=True), x.max(keepdims=True), r)[0]
    best = search_frac(x[None], r, radius=3)[0]
    assert best > f0
    err = lambda f: ((quantize_np(x, f, r) * 2.0 ** -f - x) ** 2).sum()  # noqa: E731
    assert err(best) < err(f0)


def _python_round(acc: int, shift: int, mode: Rounding) -> int:
    """Reference rule in Python integers (unbounded): floor, then the mode's tie/up decision."""
    if shift <= 0:
        return acc << -shift
    q, r = divmod(acc, 1 << shift)
    half = 1 << (shift - 1)
    up = {Rounding.HALF_EVEN: r > half or (r == half and q % 2 == 1), Rounding.HALF_UP: r >= half,
          Rounding.HALF_AWAY: r > half or (r == half and acc >= 0), Rounding.FLOOR: False}[mode]
    return q + int(up)


@given(st.integers(-2**62, 2**62), st.integers(-1, 40), st.sampled_from(MODES))
def test_shift_round_integer_path_for_huge_accumulators(acc, shift, mode):
    """Beyond 2**51 the float shortcut is not exact; the integer path must give the same answer."""
    want = _python_round(acc, shift, mode)
    if abs(want) < 2**62:
        assert shift_round_np(np.array([acc]), shift, mode)[0] == want


@pytest.mark.parametrize("mode", MODES)
def test_float_and_integer_paths_agree_at_ties(mode):
    small = np.array([5, -5, 7, -7, 6, -6])
    big = small * 2**52                              # same ratios, forced onto the integer path
    assert (shift_round_np(big, 53, mode) == shift_round_np(small, 1, mode)).all()
