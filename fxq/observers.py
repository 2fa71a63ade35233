"""Observers record what calibration sees at each quantization point: range, moments, a sample."""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import CalibrationError

SAMPLE_SIZE = 1 << 16   # values kept per tensor for the format search


class Observer:
    """Running min/max/mean/std plus a uniform random sample of the observed values."""

    def __init__(self, name: str, seed: int = 0, sample_size: int = SAMPLE_SIZE):
        self.name = name
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.sum = 0.0
        self.sumsq = 0.0
        self.sample_size = sample_size
        self._gen = torch.Generator().manual_seed(seed)
        self._sample: list[torch.Tensor] = []
        self._kept = 0
        # Moments of the tensor before a fused ReLU/clamp (F8Net's rule reads the pre-activation spread).
        self.pre_count = 0
        self.pre_sum = 0.0
        self.pre_sumsq = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1)
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))        # NaN propagates, inf shows: one pass checks both
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = int((~torch.isfinite(x)).sum())
            raise CalibrationError(f"tensor '{self.name}' holds {bad} NaN/inf values during calibration; "
                                   f"check the calibration data and the model's float outputs")
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += x.numel()
        self.sum += float(x.sum(dtype=torch.float64))
        self.sumsq += float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2
        # Keep a per-batch share of the sample so every batch is represented.
        take = min(x.numel(), max(1, self.sample_size // 8))
        idx = torch.randint(0, x.numel(), (take,), generator=self._gen)
        self._sample.append(x[idx].double())
        self._kept += take
        if self._kept > 4 * self.sample_size:
            self._compact()

    def update_pre(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1)
        self.pre_count += x.numel()
        self.pre_sum += float(x.sum(dtype=torch.float64))
        self.pre_sumsq += float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2

    def _compact(self) -> None:
        allv = torch.cat(self._sample)
        idx = torch.randperm(allv.numel(), generator=self._gen)[: self.sample_size]
        self._sample, self._kept = [allv[idx]], min(allv.numel(), self.sample_size)

    @property
    def seen(self) -> bool:
        return self.count > 0

    @property
    def mean(self) -> float:
        return self.sum / self.count

    @property
    def std(self) -> float:
        return math.sqrt(max(self.sumsq / self.count - self.mean**2, 0.0))

    @property
    def pre_std(self) -> float:
        """Spread of the values before the fused activation, or of the observed values if none."""
        if not self.pre_count:
            return self.std
        mean = self.pre_sum / self.pre_count
        return math.sqrt(max(self.pre_sumsq / self.pre_count - mean**2, 0.0))

    def sample(self) -> np.ndarray:
        self._compact()
        s = self._sample[0].numpy() if self._sample else np.zeros(0)
        # min and max always belong to the sample: the search must see the extremes it would clip.
        return np.concatenate([s, [self.min, self.max]]) if self.seen else s
