"""The relaxed quantizers a block trains with during reconstruct (passes/reconstruct).

Each wraps a fake-quant module of the graph, reads its format, and is differentiable: AdaRound's
rectified-sigmoid rounding and RAPQ's relaxed power-of-two exponent for weights, an LSQ-learned log2
step for activations, a straight-through gradient around any quantizer kept as is, and QDrop's random
float elements. ``SoftLayer.harden_exponent``, ``hard_weight`` and the pass's activation snap turn the
relaxed choices into the discrete ones the integer graph holds; the pass writes them back through
fxq.passes.calibration.tuning.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxq.fakequant import FakeQuant, QAdd, QConv2d, _QWeighted
from fxq.formats import int_range, mse_step, quantize_np, round_torch

ZETA, GAMMA = 1.1, -0.1          # AdaRound's stretch of the sigmoid, so h reaches 0 and 1 exactly
# A channel's relaxed exponent starts this far from its hard choice, on the side of the power-of-two
# neighbour with less squared error. (RAPQ starts at d0 itself, h = frac(log2 d0): nearest in log2,
# which at 4 bits and below puts many channels on the clipping side; measured on the test models, its
# 30-500 iterations of exponent learning do not recover them.)
EXP_INIT_MARGIN = 0.25
# init="gptq-codes": h(V) starts this far from the code GPTQ chose (0.1 or 0.9), where the rectified
# sigmoid still passes a gradient; the soft weights start within a tenth of a step of GPTQ's.
CODE_INIT_MARGIN = 0.1


def _coarser_is_better(rows: np.ndarray, e0: np.ndarray, rng) -> np.ndarray:
    """Per row: does 2**(e0 + 1) quantize it with less squared error than 2**e0?"""
    errs = []
    for e in (e0, e0 + 1):
        frac = -e[:, None]
        errs.append(((quantize_np(rows, frac, rng) * np.exp2(-frac) - rows) ** 2).sum(axis=1))
    return errs[1] < errs[0]


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with rectified_sigmoid(V) = h, for h strictly inside (0, 1)."""
    h = torch.clamp(h, 0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def rounding_regulariser(h: torch.Tensor, beta: float) -> torch.Tensor:
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def bn_lp_exponent(gamma: np.ndarray, coeff: float) -> float:
    """RAPQ's BN-based loss exponent: p = 1 + c·sigmoid((Σγ - 1)/C), rounded to 0.1."""
    gamma = np.asarray(gamma, np.float64)
    z = (gamma.sum() - 1.0) / max(len(gamma), 1)
    return round(1.0 + coeff / (1.0 + math.exp(-z)), 1)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (round_torch(x) - x).detach()


class SoftLayer(nn.Module):
    """A QConv2d/QLinear whose rounding (and, in rapq mode, per-channel exponent) is learned."""

    def __init__(self, layer: _QWeighted, learn_exponent: bool, per_tensor: bool = False, bn_stats=None,
                 at_codes: bool = False):
        super().__init__()
        self.layer = layer
        w = layer.weight_q.detach().float().clone()     # not a view: the write-back overwrites weight_q
        self.register_buffer("w", w)
        rng = layer.w_fmt.range
        self.lo, self.hi = float(rng.lo), float(rng.hi)
        shape = (-1,) + (1,) * (w.dim() - 1)
        if learn_exponent:
            rows = w.double().reshape(1 if per_tensor else w.shape[0], -1).numpy()
            e0 = np.floor(np.log2(mse_step(rows, rng)))
            self.register_buffer("e0", torch.from_numpy(e0).float().reshape(shape))
            h0 = np.where(_coarser_is_better(rows, e0, rng), 1.0 - EXP_INIT_MARGIN, EXP_INIT_MARGIN)
            self.s = nn.Parameter(inverse_rectified_sigmoid(torch.from_numpy(h0).float().reshape(shape)))
        else:                     # the step choose_formats (or hessian_search) gave it, exactly
            self.register_buffer("fixed_step", torch.from_numpy(layer.w_fmt.step).float().reshape(shape))
            self.s = None
        self.hard_exponent = not learn_exponent
        step = self.step()
        h0 = w / step - torch.floor(w / step)
        if at_codes:              # next to the codes the layer rounds to now (GPTQ's), not at its values
            if learn_exponent:
                raise ValueError("at_codes needs the layer's own step (learn_exponent=False)")
            up = layer.qweight().detach().float() / step - torch.floor(w / step) >= 0.5
            h0 = torch.where(up, 1.0 - CODE_INIT_MARGIN, CODE_INIT_MARGIN)
        self.V = nn.Parameter(inverse_rectified_sigmoid(h0))
        self.bn = bn_stats
        self.out_stats = None

    def step(self) -> torch.Tensor:
        if self.s is None:
            return self.fixed_step
        h = rectified_sigmoid(self.s)
        if self.hard_exponent:
            h = (h >= 0.5).float()
        return torch.exp2(self.e0 + h)

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.V)

    def soft_weight(self) -> torch.Tensor:
        step = self.step()
        scaled = self.w / step
        # While the exponent learns, the floor passes its gradient straight through, so the step sees
        # LSQ's trade-off (rounding residual inside the range, the clip level outside) rather than
        # only the gain of the codes.
        base = scaled + (torch.floor(scaled) - scaled).detach() if not self.hard_exponent else torch.floor(scaled)
        return step * torch.clamp(base + self.h(), self.lo, self.hi)

    def hard_weight(self) -> torch.Tensor:
        step = self.step().detach()
        return step * torch.clamp(torch.floor(self.w / step) + (self.V >= 0).float(), self.lo, self.hi)

    def harden_exponent(self) -> None:
        """Pick each channel's power of two and restart AdaRound on that grid, h(V) = frac(W/Δ).
        (Re-basing V so the soft weights stay where the warm-up left them measured worse: the warm-up's
        soft weights were shaped for a step between the two neighbours.)"""
        if self.s is None or self.hard_exponent:
            return
        with torch.no_grad():
            self.hard_exponent = True
            step = self.step()
            self.V.copy_(inverse_rectified_sigmoid(self.w / step - torch.floor(self.w / step)))
        self.s.requires_grad_(False)

    def frac(self) -> np.ndarray:
        """Fractional length per output channel (the hardened exponent, negated)."""
        frac = (-(torch.log2(self.step().detach()))).round().reshape(-1).numpy().astype(np.int64)
        return np.broadcast_to(frac, (self.w.shape[0],))

    def bias(self) -> torch.Tensor:
        """The bias the integer layer adds: on the accumulator's grid, input step x this layer's weight
        step (the learned one in rapq mode). At W4A4 that grid is coarse: training against the float bias
        would fit a different block from the one that lowers."""
        if self.s is None:
            return self.layer.qbias()
        return self.layer.qbias(w_frac=-torch.log2(self.step().detach()).reshape(-1))

    def forward(self, x):
        w = self.soft_weight().to(x.dtype)
        b = self.bias().to(x.dtype)
        if isinstance(self.layer, QConv2d):
            out = F.conv2d(x, w, b, self.layer.stride, self.layer.padding, self.layer.dilation, self.layer.groups)
        else:
            out = F.linear(x, w, b)
        if self.bn is not None and self.training:
            dims = [0] + list(range(2, out.dim()))
            self.out_stats = (out.mean(dims), out.std(dims))
        return out


def qdrop(q: torch.Tensor, x: torch.Tensor, p: float, gen: torch.Generator | None) -> torch.Tensor:
    """QDrop: each element keeps its float value with probability p (training only: gen is None in eval)."""
    if gen is None or p <= 0:
        return q
    return torch.where(torch.rand(x.shape, generator=gen, dtype=x.dtype) < p, x, q)


class LearnedAct(nn.Module):
    """A power-of-two FakeQuant whose step is learned in the log2 domain (LSQ), then snapped."""

    def __init__(self, fq: FakeQuant, log2_step: nn.Parameter | None, qdrop: float, gen: torch.Generator):
        super().__init__()
        self.fq = fq
        self.log2_step = log2_step          # shared by a share_scales group; None once snapped
        self.qdrop, self.gen = qdrop, gen
        full = int_range(fq.fmt.bits, fq.fmt.signed)
        self.lo, self.hi = float(full.lo), float(full.hi)

    def forward(self, x):
        x = torch.clamp(x, *self.fq.fmt.clamp)
        if self.log2_step is None:
            q = x + (self.fq(x) - x).detach()
        else:
            s = torch.exp2(self.log2_step)
            q = torch.clamp(_round_ste(x / s), self.lo, self.hi) * s
        return qdrop(q, x, self.qdrop, self.gen if self.training else None)


def requant_gain(fq: FakeQuant, x: torch.Tensor) -> torch.Tensor | float:
    """What a FakeQuant's input is worth in its output's units. A dyadic requant after a QAdd takes the
    integer sum of both inputs' codes (times their multipliers), not a value: its worth per unit is
    M * 2**-n * step (and 2**src_frac / src_mant more after a conv, where the input is a value and the
    product is ~1)."""
    r = fq.requant
    if r is None:
        return 1.0
    c = r._channels
    return (torch.exp2(c(r.src_frac, x)) / c(r.src_mant, x) * c(r.multiplier, x) * torch.exp2(-c(r.shift, x))
            * fq.fmt.step)


class FrozenQuant(nn.Module):
    """A fake-quant module used as is, with a straight-through gradient (and QDrop on activations)."""

    def __init__(self, module: nn.Module, qdrop: float, gen: torch.Generator):
        super().__init__()
        self.module = module
        self.qdrop, self.gen = qdrop, gen

    def forward(self, *args):
        q = self.module(*args)
        if isinstance(self.module, QAdd):
            (sa, sb), (ma, mb) = self.module.steps, self.module.multipliers
            ref = args[0] / sa * ma + args[1] / sb * mb
            return ref + (q - ref).detach()
        # what the quantizer approximates, as a value (so the gradient and QDrop's float elements are in
        # the output's units, also where the input is a QAdd's integer sum)
        x = torch.clamp(args[0] * requant_gain(self.module, args[0]), *self.module.fmt.clamp)
        return qdrop(x + (q - x).detach(), x, self.qdrop, self.gen if self.training else None)



def bn_match_loss(m: SoftLayer) -> torch.Tensor:
    mean, std = m.out_stats
    beta = torch.as_tensor(m.bn.out_mean, dtype=mean.dtype)
    gamma = torch.as_tensor(m.bn.out_std, dtype=mean.dtype)
    scale = (gamma ** 2).mean().clamp_min(1e-12)
    return (((mean - beta) ** 2).mean() + ((std - gamma) ** 2).mean()) / scale


