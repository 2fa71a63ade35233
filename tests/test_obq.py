"""fxq.passes.calibration.obq: Hessian-aware rounding on small problems against round-to-nearest."""
from __future__ import annotations

import torch

from fxq.passes.calibration.obq import damped, obq_round

G = torch.Generator().manual_seed(0)


def nearest(w, step, lo, hi):
    return torch.clamp(torch.round(w / step[..., None]), lo, hi) * step[..., None]


def h_error(w, q, h):
    """(w - q)ᵀ H (w - q) per row: the expected squared output error."""
    d = (w - q).double()
    return torch.einsum("brk,bkj,brj->br", d, h.double(), d)


def correlated_hessian(batch, k, dc=0.95):
    """Inputs that are mostly one shared value (neighbouring pixels): H = dc * 11ᵀ + (1 - dc) * I, jittered."""
    x = dc**0.5 * torch.randn(batch, 1, 4096, generator=G) + (1 - dc) ** 0.5 * torch.randn(batch, k, 4096, generator=G)
    return torch.einsum("bkn,bjn->bkj", x, x).double() / 4096


def test_diagonal_hessian_is_round_to_nearest():
    w = torch.randn(3, 5, 9, generator=G).double()
    h = torch.diag_embed(torch.rand(3, 9, generator=G).double() + 0.1)
    step = torch.full((3, 5), 0.125, dtype=torch.float64)
    assert torch.equal(obq_round(w, h, step, -128, 127), nearest(w, step, -128, 127))


def test_codes_are_integers_in_range():
    w = 3 * torch.randn(4, 6, 9, generator=G).double()
    step = 2.0 ** -torch.randint(2, 6, (4, 6), generator=G).double()
    q = obq_round(w, damped(correlated_hessian(4, 9), 0.01), step, -8, 7)
    codes = q / step[..., None]
    assert torch.equal(codes, codes.round())
    assert codes.min() >= -8 and codes.max() <= 7


def test_correlated_inputs_lose_less_than_nearest():
    w = torch.randn(8, 16, 9, generator=G).double()
    h = correlated_hessian(8, 9)
    step = torch.full((8, 16), 2.0**-4, dtype=torch.float64)
    obq = h_error(w, obq_round(w, damped(h, 0.01), step, -128, 127), h)
    rtn = h_error(w, nearest(w, step, -128, 127), h)
    assert obq.mean() < 0.3 * rtn.mean()           # measured 0.16: the error sum no longer rides on the shared value
    assert (obq <= rtn * 1.5).float().mean() > 0.9  # greedy, so not every row, but nearly all


def test_sum_of_errors_stays_within_a_step():
    """With inputs sharing one value, the row's total rounding error is what matters; OBQ keeps it small."""
    w = torch.randn(1, 64, 9, generator=G).double()
    step = torch.full((1, 64), 2.0**-3, dtype=torch.float64)
    q = obq_round(w, damped(correlated_hessian(1, 9, dc=0.99), 0.01), step, -128, 127)
    assert (q - w).sum(-1).abs().max() <= 0.5 * 2.0**-3
    assert (nearest(w, step, -128, 127) - w).sum(-1).abs().max() > 0.5 * 2.0**-3


def test_damping_scales_with_the_diagonal():
    h = torch.diag_embed(torch.tensor([[4.0, 2.0, 0.0]], dtype=torch.float64))
    d = damped(h, 0.5)                              # mean of the diagonal: 2
    assert torch.allclose(torch.diagonal(d - h, dim1=-2, dim2=-1), torch.full((1, 3), 1.0, dtype=torch.float64))
    assert torch.linalg.cholesky(d) is not None     # an input that never varies no longer makes H singular


def test_inputs_that_never_vary_round_to_nearest():
    """A centred H of constant inputs is all zeros: no direction is known, so OBQ is plain rounding."""
    d = damped(torch.zeros(2, 5, 5, dtype=torch.float64), 0.01)
    assert torch.equal(d, 0.01 * torch.eye(5, dtype=torch.float64).expand(2, 5, 5))
    w = torch.randn(2, 3, 5, generator=G).double()
    step = torch.full((2, 3), 2.0**-2, dtype=torch.float64)
    assert torch.equal(obq_round(w, d, step, -8, 7), nearest(w, step, -8, 7))


def test_updated_values_round_to_the_result():
    """The compensated values obq_round reports are what it rounded: nearest of each is its code, and the
    first column in act order (largest H_ii) is the original weight, nothing compensated into it yet."""
    w = 2 * torch.randn(3, 5, 9, generator=G).double()
    h = damped(correlated_hessian(3, 9), 0.01)
    step = torch.full((3, 5), 0.25, dtype=torch.float64)
    q, before = obq_round(w, h, step, -8, 7, updated=True)
    assert torch.equal(q, obq_round(w, h, step, -8, 7))
    assert torch.equal(nearest(before, step, -8, 7), q)
    first = torch.argmax(torch.diagonal(h, dim1=-2, dim2=-1), dim=1)
    for b in range(3):
        assert torch.equal(before[b, :, first[b]], w[b, :, first[b]])
    assert not torch.equal(before, w)
