"""Torch modules of the fake-quant model: they round and saturate exactly as the integer graph does.

In float64 every value they produce is exactly ``(code - zp) * mant * 2**-frac`` (sums of 8-bit
products times 8-bit mantissas stay far below 2**53), so ``fxq.formats.codes_of`` gives the integer
graph's codes. In float32 the same holds for power-of-two targets while accumulators stay below 2**24,
which the verifier reports per layer.

On dyadic targets (int8) a FakeQuant that ends a conv/linear/add/pool carries a ``DyadicRequant``: it
recovers the integer accumulator from the exact float value and applies the integer multiplier and
shift, so it rounds exactly where the integer graph does.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .clusters import ClusterCodes, quantize_clusters
from .formats import (ACC_RANGE, IntRange, Rounding, fake_quant, fake_twin, int_range, max_bias_code, round_torch,
                      step_of)
from .qtypes import ActFormat, ClusterFormat, WeightFormat


class DyadicRequant(nn.Module):
    """acc -> round(acc * M * 2**-n): the accumulator is the input value over its step ``src_mant *
    2**-src_frac`` (per channel), which float64 recovers exactly."""

    def __init__(self, src_mant, src_frac, multiplier, shift, channel_axis: int = 1):
        super().__init__()
        self.channel_axis = channel_axis         # 1 for conv outputs, -1 for linear ones (tokens: [N, T, C])
        for name, v in (("src_mant", src_mant), ("src_frac", src_frac), ("multiplier", multiplier), ("shift", shift)):
            self.register_buffer(name, torch.as_tensor(np.asarray(v, np.float64)), persistent=False)

    def _channels(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype)
        if not t.dim() or self.channel_axis == -1:
            return t
        return t.reshape((1, -1) + (1,) * (x.dim() - 2))

    def forward(self, x, rounding: Rounding) -> torch.Tensor:
        acc = round_torch(x * torch.exp2(self._channels(self.src_frac, x)) / self._channels(self.src_mant, x))
        scaled = acc * self._channels(self.multiplier, x) * torch.exp2(-self._channels(self.shift, x))
        return round_torch(scaled, rounding)


class FakeQuant(nn.Module):
    """Quantizes a tensor to an activation format (the qpoints of the integer graph)."""

    def __init__(self, fmt: ActFormat, rounding: Rounding, requant: DyadicRequant | None = None):
        super().__init__()
        self.fmt = fmt
        self.rounding = Rounding(rounding)
        self.ste = False
        self.enabled = True          # off: the same graph computes in float (for SQNR and calibration passes)
        self.requant = requant

    def forward(self, x):
        if not self.enabled:
            # a dyadic requant stands in for the fused ReLU/clamp it follows: keep that activation in float
            return x if self.requant is None else torch.clamp(x, *self.fmt.clamp)
        f = self.fmt
        if f.twin is not None:
            return fake_twin(x, f.frac, f.twin, ste=self.ste)
        if self.requant is not None:
            r = f.range
            codes = torch.clamp(self.requant(x, self.rounding) + f.zp, r.lo, r.hi)
            return (codes - f.zp) * f.step
        return fake_quant(x, f.frac, f.range, self.rounding, ste=self.ste, mant=f.mant, zp=f.zp)

    def extra_repr(self) -> str:
        return f"{self.fmt.describe()}, {self.rounding.value}" + (", dyadic requant" if self.requant is not None else "")


class QAdd(nn.Module):
    """A residual add on a dyadic target: (a - zp_a) * M_a + (b - zp_b) * M_b, an integer that the
    FakeQuant after it shifts; each input's codes come back exactly from its value."""

    def __init__(self, a_fmt: ActFormat, b_fmt: ActFormat, multipliers: tuple[int, int]):
        super().__init__()
        self.steps = (a_fmt.step, b_fmt.step)
        self.multipliers = tuple(int(m) for m in multipliers)
        self.enabled = True

    def forward(self, a, b):
        if not self.enabled:
            return a + b
        (sa, sb), (ma, mb) = self.steps, self.multipliers
        return round_torch(a / sa) * ma + round_torch(b / sb) * mb


class _QWeighted(nn.Module):
    """Holds the float (folded) weights and rounds them on every call, so passes can still tune them."""

    def __init__(self, layer: nn.Module, w_fmt: WeightFormat | ClusterFormat, in_fmt: ActFormat, rounding: Rounding):
        super().__init__()
        in_frac = in_fmt.frac
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone() if layer.bias is not None
                                 else torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
        # The real weights and bias the integer graph rounds; calibration passes change them (reconstruct
        # puts learned codes on the grid, bias_correction moves the bias) while the float model
        # (quantization off) keeps ``weight`` and ``bias``.
        self.register_buffer("weight_q", self.weight.detach().clone(), persistent=False)
        self.register_buffer("bias_q", self.bias.detach().clone(), persistent=False)
        self.in_frac = int(in_frac)
        self.rounding = Rounding(rounding)
        self.enabled = True
        self.register_buffer("w_frac", torch.empty(0, dtype=torch.float64), persistent=False)
        self.register_buffer("w_mant", torch.empty(0, dtype=torch.float64), persistent=False)
        self.set_weight_format(w_fmt)
        self.in_mant = int(in_fmt.mant)
        self._clusters: tuple | None = None      # (weight version key, ClusterCodes, float weights)

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *([1] * (self.weight.dim() - 1)))

    def output_channels(self, out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``v`` (one value per output channel) shaped to broadcast over ``out``: a conv's channels are
        axis 1, a linear's the last axis (tokens [N, T, C] included)."""
        if isinstance(self, QConv2d):
            return v.reshape([1, -1] + [1] * (out.dim() - 2))
        return v.reshape([1] * (out.dim() - 1) + [-1])

    def non_channel_dims(self, out: torch.Tensor) -> list[int]:
        axis = 1 if isinstance(self, QConv2d) else out.dim() - 1
        return [d for d in range(out.dim()) if d != axis]

    @property
    def clustered(self) -> bool:
        return isinstance(self.w_fmt, ClusterFormat)

    def _cluster_cache(self) -> tuple:
        """(key, ClusterCodes, float weights) of the current weights, recomputed only when they change."""
        key = (self.weight_q._version, self.weight_q.data_ptr(), self.weight_q.dtype)
        if self._clusters is None or self._clusters[0] != key:
            cc = quantize_clusters(self.weight_q.detach().double().cpu().numpy(), self.w_fmt)
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
        w = self.weight_q.to(self.weight.dtype)
        frac = self._per_channel(self.w_frac).to(w.dtype)
        if self.w_fmt.mant_array.max() == 1:
            return fake_quant(w, frac, self.w_fmt.range, self.rounding)
        mant = self._per_channel(self.w_mant).to(w.dtype)
        return fake_quant(w, frac, self.w_fmt.range, self.rounding, mant=mant)

    def set_weight_format(self, fmt: WeightFormat) -> None:
        """A new weight format (calibration passes choose finer or coarser steps); the bias follows."""
        self.w_fmt = fmt
        self.w_frac = torch.tensor(fmt.frac_array, dtype=torch.float64)
        self.w_mant = torch.from_numpy(fmt.mant_array.astype(np.float64))

    def set_input_format(self, fmt: ActFormat) -> None:
        self.in_frac, self.in_mant = int(fmt.frac), int(fmt.mant)

    def qbias(self, w_frac: torch.Tensor | None = None) -> torch.Tensor:
        """The bias at the accumulator's step (input step x weight step), saturated to int32. ``w_frac``:
        per-channel weight fractional lengths other than the layer's own (reconstruct's learned ones)."""
        if not self.enabled:
            return self.bias
        b = self.bias_q.to(self.bias.dtype)
        frac = ((self.w_frac if w_frac is None else w_frac) + self.in_frac).to(b.dtype)
        if self.in_mant == 1 and self.w_fmt.mant_array.max() == 1:
            return fake_quant(b, frac, ACC_RANGE, self.rounding)
        return fake_quant(b, frac, ACC_RANGE, self.rounding, mant=(self.w_mant * self.in_mant).to(b.dtype))

    def bias_room(self, acc_bits: int) -> torch.Tensor:
        """Largest |bias| per channel whose code stays within the headroom choose_formats keeps."""
        step = step_of(self.bias_frac.numpy(), self.acc_mant)
        return torch.from_numpy(max_bias_code(acc_bits) * step).to(self.bias_q.dtype)

    @property
    def bias_frac(self) -> torch.Tensor:
        return self.w_frac + self.in_frac

    @property
    def acc_mant(self) -> np.ndarray:
        return self.w_fmt.mant_array * self.in_mant


class QConv2d(_QWeighted):
    def __init__(self, conv: nn.Conv2d, w_fmt, in_fmt, rounding):
        super().__init__(conv, w_fmt, in_fmt, rounding)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x):
        return F.conv2d(x, self.qweight().to(x.dtype), self.qbias().to(x.dtype), self.stride, self.padding,
                        self.dilation, self.groups)


class QLinear(_QWeighted):
    def forward(self, x):
        return F.linear(x, self.qweight().to(x.dtype), self.qbias().to(x.dtype))


def clamp_codes(lo: float, hi: float, frac: int, mant: int = 1, zp: int = 0) -> IntRange:
    """The codes a clamp to [lo, hi] keeps at step mant * 2**-frac (infinite bounds: the widest codes)."""
    return ActFormat(frac, 32, True, (lo, hi), mant, zp).range


def on_grid_clamp(lo: float, hi: float, fmt: ActFormat) -> tuple[float, float]:
    """A standalone clamp on codes of ``fmt``: bounds moved to the grid the integer graph clamps at."""
    rng = clamp_codes(lo, hi, fmt.frac, fmt.mant, fmt.zp)
    full = int_range(32, True)
    return ((rng.lo - fmt.zp) * fmt.step if rng.lo > full.lo else lo,
            (rng.hi - fmt.zp) * fmt.step if rng.hi < full.hi else hi)


def set_quantization(gm: nn.Module, enabled: bool) -> None:
    """Switch every fake-quant module of ``gm`` on or off (off: the folded float model)."""
    for m in gm.modules():
        if isinstance(m, (FakeQuant, _QWeighted, QAdd, IntNonlinear)):
            m.enabled = enabled


class IntNonlinear(nn.Module):
    """An integer-only softmax/GELU/LayerNorm in the fake-quant model (fxq.int_nonlinear on int64 codes).

    Quantized, it returns the values of exactly the codes the integer graph computes; its gradient is
    the float function's (a straight-through estimator), so calibration passes can still learn through
    it. Off, it is the float function. Its formats are read from the FakeQuants around it on every call,
    so a pass that moves a step (hessian_search, reconstruct) moves the kernel's constants too.
    """

    def __init__(self, fn: str, float_fn: nn.Module | None, fq_in: "FakeQuant", fq_out: "FakeQuant",
                 width: int, float_args: tuple = ()):
        super().__init__()
        self.fn, self.float_fn, self.float_args, self.width = fn, float_fn, float_args, width
        object.__setattr__(self, "_fq", (fq_in, fq_out))      # not submodules: gm owns them
        self.enabled = True
        self._cache: tuple | None = None

    @property
    def in_fmt(self) -> ActFormat:
        return self._fq[0].fmt

    @property
    def out_fmt(self) -> ActFormat:
        return self._fq[1].fmt

    def constants(self):
        """fxq.int_nonlinear's constants and mask codes (a constant softmax mask, or a token mask's two
        values) for the current formats."""
        from . import int_nonlinear as inl
        key = (int(self.in_fmt.frac), int(self.out_fmt.frac))
        if self._cache is None or self._cache[0] != key:
            f_in, f_out = key
            mask = getattr(self.float_fn, "mask", None)
            mask = None if mask is None else inl.mask_codes(mask.detach().double().cpu().numpy(), f_in)
            key_mask = None
            if hasattr(self.float_fn, "on_invalid"):
                key_mask = inl.key_mask_codes(self.float_fn.on_valid, self.float_fn.on_invalid, f_in)
            if self.fn == "softmax":
                c = inl.softmax_constants(f_in, f_out)
            elif self.fn == "gelu":
                c = inl.gelu_constants(f_in, f_out)
            elif self.fn == "masked_mean":
                c = inl.masked_mean_constants(f_in, f_out)
            elif self.fn == "l2_normalize":
                c = inl.l2_normalize_constants(f_in, f_out, self.width)
            else:
                m = self.float_fn
                w = None if m.weight is None else m.weight.detach().double().cpu().numpy()
                b = None if m.bias is None else m.bias.detach().double().cpu().numpy()
                c = inl.layer_norm_constants(self.width, f_in, w, b, float(m.eps), f_out)
            self._cache = (key, c, mask, key_mask)
        return self._cache[1:]

    def _float(self, x, valid):
        from . import islands
        args = () if valid is None else (valid,)
        if self.float_fn is not None:
            return self.float_fn(x, *args)
        if self.fn == "softmax":
            return islands.softmax(x)
        if self.fn == "masked_mean":
            return islands.masked_mean(x, valid)
        if self.fn == "l2_normalize":
            return islands.l2_normalize(x, *self.float_args)
        return islands.gelu(x, *self.float_args)

    def forward(self, x, valid=None):
        y = self._float(x, valid)
        if not self.enabled:
            return y
        from . import int_nonlinear as inl
        c, mask, key_mask = self.constants()
        codes = round_torch(x.detach().double() * 2.0 ** self.in_fmt.frac).to(torch.int64)
        r = self.out_fmt.range
        out = inl.apply(self.fn, inl.TORCH, codes, c, r.lo, r.hi, mask,
                        None if valid is None else valid.to(torch.int64), key_mask)
        value = (out.double() * 2.0 ** -self.out_fmt.frac).to(x.dtype)
        return y + (value - y).detach()

    def extra_repr(self) -> str:
        return f"{self.fn}, in {self.in_fmt.describe()}, out {self.out_fmt.describe()}"
