"""Rounding weights against their inputs' second moments (OBQ/GPTQ: Frantar and Alistarh, 2022).

Rounding each weight to its nearest code ignores that a layer's inputs are correlated: a depthwise
filter whose taps see nearly equal pixels turns the *sum* of its rounding errors into output error.
Given H = E[x xᵀ] of a row's inputs, the columns are rounded one at a time, and each rounding error
is pushed onto the columns not yet rounded so that the expected output error (w - q)ᵀ H (w - q)
grows as little as possible: with U the upper Cholesky factor of H⁻¹, after rounding column i,
w[i+1:] -= (w_i - q_i) / U_ii * U[i, i+1:]. Columns go in order of decreasing H_ii ("act order"),
so the most used inputs are rounded while the most columns are left to compensate.
"""
from __future__ import annotations

import torch

from fxq.formats import round_torch


def damped(hess: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I over a batch [B, K, K]: invertible even where an input never varies
    (dead channels, zero padding) and less eager to trust directions seen on few samples. Where H is 0
    (a centred H of inputs that never vary at all) the level is 1: every direction is as unseen as any
    other, and the rounding falls back to nearest."""
    k = hess.shape[-1]
    diag = torch.diagonal(hess, dim1=-2, dim2=-1)
    level = diag.mean(-1)
    level = torch.where(level > 0, level, torch.ones_like(level))
    return hess + damp * level[..., None, None] * torch.eye(k, dtype=hess.dtype, device=hess.device)


def obq_round(w: torch.Tensor, hess: torch.Tensor, step: torch.Tensor, lo: int, hi: int,
              updated: bool = False):
    """Round rows ``w`` [B, R, K] to codes in [lo, hi] times ``step`` ([B, R], one step per row),
    compensating through ``hess`` [B, K, K] (positive definite: pass it through ``damped``).

    Every row of batch b shares hess[b]. Returns the rounded values (float64, on the grid) in the
    original column order; with ``updated`` also each weight as it stood just before it was rounded
    (the compensated values whose nearest codes are the result: a start for learned rounding).
    """
    w = w.to(torch.float64)
    hess = hess.to(torch.float64)
    step = step.to(torch.float64)
    b, r, k = w.shape
    order = torch.argsort(torch.diagonal(hess, dim1=-2, dim2=-1), dim=1, descending=True, stable=True)
    cols = order[:, None, :].expand(b, r, k)
    work = torch.gather(w, 2, cols)
    h = torch.gather(torch.gather(hess, 1, order[:, :, None].expand(b, k, k)), 2, order[:, None, :].expand(b, k, k))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    before = torch.empty_like(work) if updated else None
    for i in range(k):
        col = work[:, :, i]
        if updated:
            before[:, :, i] = col
        q = torch.clamp(round_torch(col / step), lo, hi) * step
        err = (col - q) / u[:, i, i, None]
        work[:, :, i] = q
        work[:, :, i + 1:] -= err[:, :, None] * u[:, None, i, i + 1:]
    out = torch.empty_like(work).scatter_(2, cols, work)
    if not updated:
        return out
    return out, torch.empty_like(before).scatter_(2, cols, before)
