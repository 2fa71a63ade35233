"""Float islands: the transformer nonlinearities a target may run in float, defined once for all executors.

An island dequantizes its input codes, applies one function and quantizes the result. The fake-quant
model (torch), the reference backend (numpy) and the ONNX export (ONNX Runtime) each compute the
function in float64 with the same formula, so their results differ at most in the last bits of a
float64, and a code differs only if a value lands within ~2**-40 of a rounding boundary.

GELU's erf is the one function ONNX Runtime has no float64 kernel for, so every executor computes it
with the same closed form (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7, about float32's own
precision) built from exp, products and one division.
"""
from __future__ import annotations

import math

import numpy as np
import torch

ISLAND_FUNCTIONS = ("softmax", "gelu", "layer_norm", "masked_mean", "l2_normalize")
# Abramowitz & Stegun 7.1.26: erf(x) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-x^2), t = 1/(1+p|x|)
ERF_P = 0.3275911
ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
SQRT_HALF = math.sqrt(0.5)
GELU_TANH_C = math.sqrt(2.0 / math.pi)
GELU_TANH_K = 0.044715


def _erf(x, xp):
    ax = xp.abs(x)
    t = 1.0 / (1.0 + ERF_P * ax)
    poly = ERF_A[4]
    for a in ERF_A[3::-1]:
        poly = a + t * poly
    y = 1.0 - t * poly * xp.exp(-(ax * ax))
    return xp.where(x < 0, -y, y)


def _gelu(x, approximate: str, xp):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + xp.tanh(GELU_TANH_C * (x + GELU_TANH_K * x * x * x)))
    return 0.5 * x * (1.0 + _erf(x * SQRT_HALF, xp))


# -- torch: the fake-quant model (and the float model it is made from) ---------------------------
def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, in float64."""
    return torch.softmax(x.double(), dim=-1).to(x.dtype)


class MaskedSoftmax(torch.nn.Module):
    """softmax(x + mask) over the last axis, in float64: a constant additive attention mask (causal, or
    one the model stores) belongs to the island, so the scores keep their own quantization range."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().double().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.double() + self.mask, dim=-1).to(x.dtype)


class TokenMaskedSoftmax(torch.nn.Module):
    """softmax(scores + mask) where the additive mask is a function of each key token's validity
    (ids != pad): ``on_valid`` where valid, ``on_invalid`` (say -1e4) elsewhere. ``valid`` is [N, T]."""

    def __init__(self, on_valid: float, on_invalid: float):
        super().__init__()
        self.on_valid, self.on_invalid = float(on_valid) + 0.0, float(on_invalid) + 0.0     # no -0.0

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        bias = torch.where(valid[:, None, None, :].bool(), self.on_valid, self.on_invalid).double()
        return torch.softmax(x.double() + bias, dim=-1).to(x.dtype)


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid tokens (axis 1) of [N, T, D]; a sentence with none gives 0."""
    m = valid.double().unsqueeze(-1)
    return ((x.double() * m).sum(1) / m.sum(1).clamp(min=1.0)).to(x.dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x / max(||x||, eps) over the last axis (F.normalize), in float64."""
    x64 = x.double()
    return (x64 / torch.linalg.vector_norm(x64, dim=-1, keepdim=True).clamp(min=eps)).to(x.dtype)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return _gelu(x.double(), approximate, torch).to(x.dtype)


class LayerNorm(torch.nn.LayerNorm):
    """nn.LayerNorm over the last axis, computed in float64 (the island every executor computes)."""

    @classmethod
    def of(cls, m: torch.nn.LayerNorm) -> "LayerNorm":
        new = cls(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine)
        new.load_state_dict(m.state_dict())
        return new.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.double()
        b = None if self.bias is None else self.bias.double()
        return torch.nn.functional.layer_norm(x.double(), self.normalized_shape, w, b, self.eps).to(x.dtype)


# -- numpy: the reference backend -----------------------------------------------------------------
def token_mask_bias_np(valid: np.ndarray, on_valid: float, on_invalid: float) -> np.ndarray:
    return np.where(valid[:, None, None, :] != 0, on_valid, on_invalid).astype(np.float64)


def masked_mean_np(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    m = valid.astype(np.float64)[..., None]
    return (x * m).sum(1) / np.maximum(m.sum(1), 1.0)


def l2_normalize_np(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.maximum(np.sqrt((x * x).sum(-1, keepdims=True)), eps)


def softmax_np(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    if mask is not None:
        x = x + mask
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def gelu_np(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    return _gelu(x, approximate, np)


def layer_norm_np(x: np.ndarray, weight, bias, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    y = centred / np.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y
