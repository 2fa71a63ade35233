"""Small frozen records that passes attach to nodes: BN statistics and the chosen formats."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .formats import TWIN_FINE_DTYPE, IntRange, Twin, twin_max_shift, int_range, round_np, step_of, storage_dtype


@dataclass(frozen=True)
class BNStats:
    """A folded BatchNorm's statistics: the folded layer's output is ~ N(beta, gamma**2) per channel."""
    mean: np.ndarray
    var: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    eps: float

    @property
    def out_mean(self) -> np.ndarray:
        return self.beta

    @property
    def out_std(self) -> np.ndarray:
        return np.abs(self.gamma)


@dataclass(frozen=True)
class ActFormat:
    """An activation's codes: value = (code - zp) * mant * 2**-frac, codes in [lo, hi].

    ``mant`` and ``zp`` are 1 and 0 except on dyadic targets (int8), whose scales are any
    mant * 2**-frac and whose codes are affine.

    ``clamp`` is the float range of a fused activation (ReLU: (0, inf), ReLU6: (0, 6)); the code
    bounds follow from it and the dtype. Rounding is monotonic, so clamping the float value and then
    rounding equals rounding and then clamping at the rounded bounds: both executors agree.
    """
    frac: int
    bits: int
    signed: bool
    clamp: tuple[float, float] = (-float("inf"), float("inf"))
    mant: int = 1
    zp: int = 0
    # Twin-uniform (PTQ4ViT): ``bits``-bit twin codes; ``frac`` is then the small step's (R1's), and the
    # producer writes, and consumers read, "fine" int16 codes at that step (see fxq.formats.Twin).
    twin: Twin | None = None

    @property
    def dtype(self) -> str:
        if self.twin is not None:
            return TWIN_FINE_DTYPE
        return storage_dtype(self.bits, self.signed)

    @property
    def step(self) -> float:
        return float(step_of(self.frac, self.mant))

    @property
    def range(self) -> IntRange:
        if self.twin is not None:
            return self.twin.fine_range
        full = int_range(self.bits, self.signed)
        lo, hi = (round_np(np.array(c) / self.step) + self.zp for c in self.clamp)
        return IntRange(int(max(full.lo, lo)), int(min(full.hi, hi)))

    def with_frac(self, frac: int) -> "ActFormat":
        return replace(self, frac=int(frac))

    def with_scale_of(self, other: "ActFormat") -> "ActFormat":
        """This format at ``other``'s scale and zero point (a sibling taking its master's)."""
        return replace(self, frac=int(other.frac), mant=int(other.mant), zp=int(other.zp))

    def with_twin_shift(self, shift: int) -> "ActFormat":
        """Post-softmax twins keep R2's step (2**-(bits-1)) and move R1's; post-GELU ones keep R1's."""
        t = self.twin
        frac = self.frac if t.signed else self.bits - 1 + shift
        return replace(self, frac=int(frac), twin=replace(t, shift=int(shift)))

    def neighbours(self, radius: int) -> list["ActFormat"]:
        """This format and the ones up to ``radius`` steps finer or coarser (twin: R2/R1 ratio 2**m)."""
        if self.twin is None:
            return [self.with_frac(self.frac + k) for k in range(-radius, radius + 1)]
        shifts = range(max(0, self.twin.shift - radius), min(twin_max_shift(self.bits), self.twin.shift + radius) + 1)
        return [self.with_twin_shift(m) for m in shifts]

    def describe(self) -> str:
        if self.twin is not None:
            t = self.twin
            return f"twin u{self.bits} f={self.frac} R2 step x2^{t.shift} ({'neg|pos' if t.signed else 'small|large'})"
        r = self.range
        scale = f"f={self.frac}" if self.mant == 1 else f"s={self.mant}*2^-{self.frac}"
        zp = f" zp={self.zp}" if self.zp else ""
        return f"{'s' if self.signed else 'u'}{self.bits} {scale}{zp} [{r.lo},{r.hi}]"


def weight_range(bits: int, full_range: bool = False) -> IntRange:
    return int_range(bits, signed=True, symmetric=not full_range)


class _SymmetricCodes:
    """Weight codes are signed and symmetric (``bits`` wide); ``frac`` has one entry per output channel."""
    frac: tuple[int, ...]
    bits: int

    @property
    def range(self) -> IntRange:
        return int_range(self.bits, signed=True, symmetric=True)

    @property
    def frac_array(self) -> np.ndarray:
        return np.asarray(self.frac, dtype=np.int64)

    @property
    def mant_array(self) -> np.ndarray:
        mant = getattr(self, "mant", None)
        return np.ones(len(self.frac), np.int64) if mant is None else np.asarray(mant, dtype=np.int64)


@dataclass(frozen=True)
class WeightFormat(_SymmetricCodes):
    """Signed weight codes with one step per output channel: 2**-frac, or on dyadic targets
    mant * 2**-frac. Symmetric (2 bits: -1..1, ternary) unless ``full_range`` (2 bits: -2..1)."""
    frac: tuple[int, ...]
    bits: int
    mant: tuple[int, ...] | None = None
    full_range: bool = False

    @property
    def range(self) -> IntRange:
        return weight_range(self.bits, self.full_range)

    @property
    def step(self) -> np.ndarray:
        """mant * 2**-frac per output channel (float64, exact)."""
        return step_of(self.frac_array, self.mant_array)


@dataclass(frozen=True)
class ClusterFormat(_SymmetricCodes):
    """Weights as small codes times one unsigned fixed-point scale per cluster of ``size`` input channels
    (fxq.clusters); ``frac`` is the scales' fractional length, one per output channel."""
    frac: tuple[int, ...]
    bits: int                 # code width: 2 is ternary (-1, 0, +1)
    size: int                 # input channels per cluster; 0 = the whole filter
    scale_bits: int           # width of the unsigned scale codes
    threshold: str = "l2"     # ternary zero threshold rule
    rounding: str = "half_even"
