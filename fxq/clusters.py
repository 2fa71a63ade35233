"""Filter-cluster weights (dynamic fixed point, Mellempudi et al. 2017): codes times one scale per cluster.

A cluster is N consecutive input-channel kernels of one output filter. Its weights become small codes
(ternary -1/0/+1, or symmetric b-bit) times one scale alpha; alpha is an unsigned fixed-point number,
``alpha_code * 2**-frac``, with one fractional length per filter. Inside a cluster a ternary product is
an add or a subtract, so one multiply by alpha per cluster replaces N*k*k of them.

Everything here is float64 numpy and deterministic in the weights, so the fake-quant model and the
lowering compute the same codes by calling the same function.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import int_range, noclip_frac, quantize_np, round_np
from .qtypes import ClusterFormat

TWN_RATIO = 0.7          # TWN's threshold: 0.7 * mean|w| (Li et al., 2016)
LLOYD_STEPS = 8          # alternating code / step refinements for b-bit clusters


@dataclass(frozen=True)
class ClusterCodes:
    codes: np.ndarray     # int64, the weight's shape: per-weight codes
    alpha: np.ndarray     # int64 [O, clusters]: per-cluster scale codes
    frac: np.ndarray      # int64 [O]: alpha's fractional length per filter
    block: int            # input channels per cluster

    def effective(self) -> np.ndarray:
        """Integer weights code * alpha_code (value = effective * 2**-frac[o]): what the conv multiplies."""
        return self.codes * expand(self.alpha, self.codes.shape, self.block)


def block_size(fmt: ClusterFormat, in_per_group: int) -> int:
    """Channels per cluster for a filter with ``in_per_group`` input channels (0 or N > C: the whole filter)."""
    return in_per_group if fmt.size == 0 else min(fmt.size, in_per_group)


def expand(per_cluster: np.ndarray, shape: tuple, block: int) -> np.ndarray:
    """[O, clusters] -> the weight's shape, repeating each cluster's value over its channels and kernel."""
    rep = np.repeat(per_cluster, block, axis=1)[:, : shape[1]]
    return rep.reshape(rep.shape + (1,) * (len(shape) - 2))


def _rows(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights as [O, clusters, block*k*k] rows (ragged last cluster zero-padded) and a validity mask."""
    o, c = w.shape[:2]
    k = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1
    n = -(-c // block)
    pad = n * block - c
    flat = w.reshape(o, c, k)
    valid = np.ones_like(flat, dtype=bool)
    if pad:
        flat = np.concatenate([flat, np.zeros((o, pad, k))], axis=1)
        valid = np.concatenate([valid, np.zeros((o, pad, k), dtype=bool)], axis=1)
    return flat.reshape(o, n, block * k), valid.reshape(o, n, block * k)


def _ternary_l2(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row the L2-optimal ternary approximation alpha * {-1, 0, +1}: keep the top j* magnitudes with
    j* = argmax S_j**2 / j (S_j the sum of the j largest |w|), alpha = their mean."""
    mags = np.abs(rows)
    order = -np.sort(-mags, axis=-1)
    sums = np.cumsum(order, axis=-1)
    j = np.arange(1, rows.shape[-1] + 1)
    best = np.argmax(sums**2 / j, axis=-1)                       # index of j* - 1
    thresh = np.take_along_axis(order, best[..., None], axis=-1)
    keep = (mags >= thresh) & (thresh > 0)
    return np.sign(rows) * keep, _mean_kept(mags, keep)


def _ternary_twn(rows: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mags = np.abs(rows)
    count = np.maximum(valid.sum(axis=-1, keepdims=True), 1)
    keep = mags > TWN_RATIO * mags.sum(axis=-1, keepdims=True) / count
    return np.sign(rows) * keep, _mean_kept(mags, keep)


def _mean_kept(mags: np.ndarray, keep: np.ndarray) -> np.ndarray:
    n = keep.sum(axis=-1)
    return np.where(n > 0, (mags * keep).sum(axis=-1) / np.maximum(n, 1), 0.0)


def _uniform(rows: np.ndarray, qmax: int) -> np.ndarray:
    """A step per row for symmetric codes in [-qmax, qmax], refined by alternating least squares from
    the no-clip step; the best step seen (by squared error) is kept."""
    alpha = np.abs(rows).max(axis=-1) / qmax
    best_alpha, best_err = alpha.copy(), np.full(alpha.shape, np.inf)
    for _ in range(LLOYD_STEPS):
        safe = np.where(alpha > 0, alpha, 1.0)[..., None]
        codes = np.clip(round_np(rows / safe), -qmax, qmax)
        err = ((codes * safe - rows) ** 2).sum(axis=-1)
        better = err < best_err
        best_alpha[better], best_err[better] = alpha[better], err[better]
        cc = (codes**2).sum(axis=-1)
        alpha = np.where(cc > 0, (codes * rows).sum(axis=-1) / np.maximum(cc, 1), 0.0)
    return best_alpha


def _fit(w: np.ndarray, fmt: ClusterFormat):
    """Ternary signs (as rows, or None for b-bit codes), float per-cluster scales [O, clusters], block."""
    block = block_size(fmt, w.shape[1])
    rows, valid = _rows(np.asarray(w, np.float64), block)
    if fmt.bits == 2:
        signs, alpha = _ternary_l2(rows) if fmt.threshold == "l2" else _ternary_twn(rows, valid)
        return signs, alpha, block
    return None, _uniform(rows, fmt.range.hi), block


def choose_cluster_frac(w: np.ndarray, fmt: ClusterFormat) -> np.ndarray:
    """Per filter, the finest fractional length at which its largest cluster scale fits the scale codes."""
    top = _fit(w, fmt)[1].max(axis=1)
    return noclip_frac(np.zeros_like(top), top, int_range(fmt.scale_bits, signed=False))


def quantize_clusters(w: np.ndarray, fmt: ClusterFormat) -> ClusterCodes:
    """Codes and scale codes of ``w`` at the format's (fixed) per-filter fractional lengths."""
    w = np.asarray(w, np.float64)
    frac = fmt.frac_array
    if frac.shape != (w.shape[0],):
        raise ValueError(f"cluster format has {frac.size} fractional lengths for {w.shape[0]} filters")
    signs, alpha, block = _fit(w, fmt)
    alpha_codes = quantize_np(alpha, frac[:, None], int_range(fmt.scale_bits, signed=False), fmt.rounding)
    step = expand(alpha_codes * np.exp2(-frac[:, None].astype(np.float64)), w.shape, block)
    if signs is not None:
        # the ternary support comes from the threshold rule, not from rounding against the quantized scale
        codes = _unrows(signs, w.shape, block)
    else:
        rng = fmt.range
        codes = np.clip(round_np(w / np.where(step > 0, step, 1.0), fmt.rounding), rng.lo, rng.hi)
    codes = np.where(step > 0, codes, 0.0)
    return ClusterCodes(codes.astype(np.int64), alpha_codes.astype(np.int64), frac, block)


def _unrows(rows: np.ndarray, shape: tuple, block: int) -> np.ndarray:
    """Inverse of _rows: [O, clusters*block*k] back to the weight's shape (padding dropped)."""
    o, c = shape[:2]
    k = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    flat = rows.reshape(o, -1, k)[:, :c]
    return flat.reshape(shape)
