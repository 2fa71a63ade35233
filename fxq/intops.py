"""The exact integer operations fxq's integer kernels are written against, in three spellings: numpy
int64 (the reference backend), torch int64 (the fake-quant model) and numpy float64 holding integers
(what an ONNX float64 graph computes; backends/onnx_int_nonlinear traces a fourth). fxq.int_nonlinear's
kernels and fxq.formats' integer rounding (round_shift, round_div) take one of these as ``xp``.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class IntOps:
    """The exact integer operations the algorithms use: +, -, *, comparisons, & and | as Python operators,
    and where, clip, abs, amax / sum (last axis, kept), floor_div (by a positive integer) and
    shift_right_floor (floor(x / 2**k), constant k >= 0) as methods."""

    def codes(self, q, fn: str):
        raise NotImplementedError

    def const(self, v, like):
        raise NotImplementedError

    def bounds(self, x) -> tuple[int, int]:
        raise NotImplementedError


class NumpyOps(IntOps):
    """int64 numpy arrays: the reference backend."""

    def codes(self, q, fn):
        q = np.asarray(q)
        if not np.issubdtype(q.dtype, np.integer):
            raise ValueError(f"{fn}: codes must be an integer array, got dtype {q.dtype}")
        return q.astype(np.int64)

    def const(self, v, like):
        return np.asarray(v, dtype=np.int64)

    def bounds(self, x):
        return int(x.min()), int(x.max())

    where, clip, abs = staticmethod(np.where), staticmethod(np.clip), staticmethod(np.abs)

    @staticmethod
    def amax(x, axis=-1, keepdims=True):
        return np.max(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def sum(x, axis=-1, keepdims=True):
        return np.sum(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def floor_div(a, b):
        return np.floor_divide(a, b)

    @staticmethod
    def shift_right_floor(x, k: int):
        return np.right_shift(x, k)          # arithmetic shift: floor(x / 2**k)


class Float64Ops(NumpyOps):
    """float64 numpy arrays holding integers: each op as an ONNX float64 graph computes it."""

    def codes(self, q, fn):
        q = np.asarray(q)
        if np.issubdtype(q.dtype, np.integer):
            return q.astype(np.float64)
        if q.dtype != np.float64 or not np.all(np.floor(q) == q):
            raise ValueError(f"{fn}: codes must be integer-valued float64 (or integer), got dtype {q.dtype}")
        return q

    def const(self, v, like):
        return np.asarray(v, dtype=np.float64)

    @staticmethod
    def floor_div(a, b):
        return np.floor(a / b)               # exact: |a| < 2**53 keeps a / b from rounding across an integer

    @staticmethod
    def shift_right_floor(x, k: int):
        return np.floor(x * math.ldexp(1.0, -k))


class TorchOps(IntOps):
    """int64 torch tensors: the fake-quant model."""

    def codes(self, q, fn):
        if not isinstance(q, torch.Tensor):
            raise ValueError(f"{fn}: TorchOps needs a torch tensor, got {type(q).__name__}")
        if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
            raise ValueError(f"{fn}: codes must be an integer tensor, got dtype {q.dtype}")
        return q.to(torch.int64)

    def const(self, v, like):
        return torch.as_tensor(np.asarray(v, dtype=np.int64), device=like.device)

    def bounds(self, x):
        return int(x.min()), int(x.max())

    @staticmethod
    def where(c, a, b):
        return torch.where(c, a, b)

    @staticmethod
    def clip(x, lo, hi):
        return torch.clamp(x, lo, hi)

    @staticmethod
    def abs(x):
        return torch.abs(x)

    @staticmethod
    def amax(x, axis=-1, keepdims=True):
        return torch.amax(x, dim=axis, keepdim=keepdims)

    @staticmethod
    def sum(x, axis=-1, keepdims=True):
        return torch.sum(x, dim=axis, keepdim=keepdims)

    @staticmethod
    def floor_div(a, b):
        return torch.div(a, b, rounding_mode="floor")

    @staticmethod
    def shift_right_floor(x, k: int):
        return torch.bitwise_right_shift(x, k)        # arithmetic on int64: floor(x / 2**k)


NUMPY, FLOAT64, TORCH = NumpyOps(), Float64Ops(), TorchOps()


def ops_for(q) -> IntOps:
    """torch tensors run in torch, everything else in numpy int64 (FLOAT64 is only used when asked for)."""
    return TORCH if isinstance(q, torch.Tensor) else NUMPY
