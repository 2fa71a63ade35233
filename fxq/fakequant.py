"""Torch modules of the fake-quant model: they round and saturate exactly as the integer graph does.

In float64 every value they produce is exactly ``code * 2**-frac`` (sums of 8-bit products stay far
below 2**53), so ``round(out * 2**frac)`` gives the integer graph's codes. In float32 the same holds
while accumulators stay below 2**24, which the verifier reports per layer.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .clusters import ClusterCodes, quantize_clusters
from .formats import ACC_RANGE, IntRange, Rounding, fake_quant, int_range
from .qtypes import ActFormat, ClusterFormat, WeightFormat


class FakeQuant(nn.Module):
    """Quantizes a tensor to an activation format (the qpoints of the integer graph)."""

    def __init__(self, fmt: ActFormat, rounding: Rounding):
        super().__init__()
        self.fmt = fmt
        self.rounding = Rounding(rounding)
        self.ste = False
        self.enabled = True          # off: the same graph computes in float (for SQNR and calibration passes)

    def forward(self, x):
        if not self.enabled:
            return x
        return fake_quant(x, self.fmt.frac, self.fmt.range, self.rounding, ste=self.ste)

    def extra_repr(self) -> str:
        return f"{self.fmt.describe()}, {self.rounding.value}"


class _QWeighted(nn.Module):
    """Holds the float (folded) weights and rounds them on every call, so passes can still tune them."""

    def __init__(self, layer: nn.Module, w_fmt: WeightFormat | ClusterFormat, in_frac: int, rounding: Rounding):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone() if layer.bias is not None
                                 else torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
        self.w_fmt = w_fmt
        self.in_frac = int(in_frac)
        self.rounding = Rounding(rounding)
        self.enabled = True
        self.register_buffer("w_frac", torch.tensor(w_fmt.frac, dtype=torch.float64), persistent=False)
        self._clusters: tuple | None = None      # (weight version key, ClusterCodes, float weights)

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *([1] * (self.weight.dim() - 1)))

    @property
    def clustered(self) -> bool:
        return isinstance(self.w_fmt, ClusterFormat)

    def _cluster_cache(self) -> tuple:
        """(key, ClusterCodes, float weights) of the current weights, recomputed only when they change."""
        key = (self.weight._version, self.weight.data_ptr(), self.weight.dtype)
        if self._clusters is None or self._clusters[0] != key:
            cc = quantize_clusters(self.weight.detach().double().cpu().numpy(), self.w_fmt)
            value = torch.from_numpy(cc.effective() * np.exp2(-cc.frac.astype(np.float64)).reshape(
                -1, *([1] * (self.weight.dim() - 1))))
            self._clusters = (key, cc, value)
        return self._clusters

    def cluster_codes(self) -> ClusterCodes:
        return self._cluster_cache()[1]

    def qweight(self) -> torch.Tensor:
        if not self.enabled:
            return self.weight
        if self.clustered:
            return self._cluster_cache()[2].to(self.weight.dtype)
        frac = self._per_channel(self.w_frac).to(self.weight.dtype)
        return fake_quant(self.weight, frac, self.w_fmt.range, self.rounding)

    def qbias(self) -> torch.Tensor:
        if not self.enabled:
            return self.bias
        return fake_quant(self.bias, (self.w_frac + self.in_frac).to(self.bias.dtype), ACC_RANGE, self.rounding)

    @property
    def bias_frac(self) -> torch.Tensor:
        return self.w_frac + self.in_frac


class QConv2d(_QWeighted):
    def __init__(self, conv: nn.Conv2d, w_fmt, in_frac, rounding):
        super().__init__(conv, w_fmt, in_frac, rounding)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x):
        return F.conv2d(x, self.qweight().to(x.dtype), self.qbias().to(x.dtype), self.stride, self.padding,
                        self.dilation, self.groups)


class QLinear(_QWeighted):
    def forward(self, x):
        return F.linear(x, self.qweight().to(x.dtype), self.qbias().to(x.dtype))


def clamp_codes(lo: float, hi: float, frac: int) -> IntRange:
    """The codes a clamp to [lo, hi] keeps at ``frac`` (infinite bounds: the widest codes)."""
    return ActFormat(frac, 32, True, (lo, hi)).range


def on_grid_clamp(lo: float, hi: float, frac: int) -> tuple[float, float]:
    """A standalone clamp on codes at ``frac``: bounds moved to the grid the integer graph clamps at."""
    rng = clamp_codes(lo, hi, frac)
    full = int_range(32, True)
    return (rng.lo * 2.0 ** -frac if rng.lo > full.lo else lo, rng.hi * 2.0 ** -frac if rng.hi < full.hi else hi)


def set_quantization(gm: nn.Module, enabled: bool) -> None:
    """Switch every fake-quant module of ``gm`` on or off (off: the folded float model)."""
    for m in gm.modules():
        if isinstance(m, (FakeQuant, _QWeighted)):
            m.enabled = enabled
