"""Hardware targets as data.

A target says what the accelerator can do; passes read its fields and never test its name. Users
describe their own hardware with ``fxq.register_target(Target(...))`` or override fields per compile.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .formats import ACC_BITS, DEFAULT_ROUNDING, Rounding

GRANULARITIES = ("tensor", "channel")
SCALE_KINDS = ("pow2",)          # power-of-two step chosen by an error search
REQUANT_KINDS = ("shift",)       # every rescale is an arithmetic shift
FLOAT_ISLAND_OPS = ("softmax", "gelu", "layer_norm")


class TargetError(ValueError):
    """A target or an override that cannot describe real hardware; names the field."""


@dataclass(frozen=True)
class Target:
    name: str
    description: str = ""
    w_bits: int = 8
    a_bits: int = 8
    w_granularity: str = "channel"
    scale_kind: str = "pow2"
    requant: str = "shift"
    rounding: Rounding = DEFAULT_ROUNDING
    acc_bits: int = ACC_BITS
    # Inputs of a residual add or a concat carry one fractional length (master/sibling rule).
    share_residual_scales: bool = True
    # Activations after ReLU/ReLU6 use unsigned codes (one more bit of resolution).
    unsigned_after_relu: bool = True
    # The error search looks at this many exponents finer than the no-clip one.
    exp_search_radius: int = 3
    # Ops that may run in float between a dequantize and a quantize.
    float_islands: frozenset = field(default_factory=frozenset)

    def __post_init__(self):
        for fld in ("w_bits", "a_bits"):
            v = getattr(self, fld)
            if not isinstance(v, int) or not 2 <= v <= 16:
                raise TargetError(f"target {self.name!r}: {fld}={v!r} must be an integer in 2..16")
        if self.w_granularity not in GRANULARITIES:
            raise TargetError(f"target {self.name!r}: w_granularity={self.w_granularity!r} "
                              f"must be one of {GRANULARITIES}")
        if self.scale_kind not in SCALE_KINDS:
            raise TargetError(f"target {self.name!r}: scale_kind={self.scale_kind!r} must be one of {SCALE_KINDS}")
        if self.requant not in REQUANT_KINDS:
            raise TargetError(f"target {self.name!r}: requant={self.requant!r} must be one of {REQUANT_KINDS}")
        try:
            object.__setattr__(self, "rounding", Rounding(self.rounding))
        except ValueError:
            raise TargetError(f"target {self.name!r}: rounding={self.rounding!r} must be one of "
                              f"{[r.value for r in Rounding]}") from None
        if self.acc_bits not in (16, 24, 32):
            raise TargetError(f"target {self.name!r}: acc_bits={self.acc_bits!r} must be 16, 24 or 32")
        if self.w_bits + self.a_bits >= self.acc_bits:
            raise TargetError(f"target {self.name!r}: w_bits+a_bits={self.w_bits + self.a_bits} leaves no "
                              f"headroom in a {self.acc_bits}-bit accumulator")
        if not isinstance(self.exp_search_radius, int) or not 0 <= self.exp_search_radius <= 8:
            raise TargetError(f"target {self.name!r}: exp_search_radius={self.exp_search_radius!r} must be in 0..8")
        bad = set(self.float_islands) - set(FLOAT_ISLAND_OPS)
        if bad:
            raise TargetError(f"target {self.name!r}: float_islands has unknown ops {sorted(bad)}; "
                              f"known: {FLOAT_ISLAND_OPS}")
        object.__setattr__(self, "float_islands", frozenset(self.float_islands))

    def with_overrides(self, **overrides) -> "Target":
        names = {f.name for f in dataclasses.fields(self)} - {"name", "description"}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TargetError(f"unknown target override(s) {unknown}; fields are {sorted(names)}")
        if not overrides:
            return self
        tag = ",".join(f"{k}={v.value if isinstance(v, Rounding) else v}" for k, v in sorted(overrides.items()))
        return dataclasses.replace(self, name=f"{self.name}[{tag}]", **overrides)

    def as_row(self) -> dict:
        return {"name": self.name, "w_bits": self.w_bits, "a_bits": self.a_bits,
                "weights": self.w_granularity, "scale": self.scale_kind, "requant": self.requant,
                "rounding": self.rounding.value, "acc": self.acc_bits,
                "shared residual scales": self.share_residual_scales,
                "float islands": ",".join(sorted(self.float_islands)) or "-",
                "description": self.description}


_REGISTRY: dict[str, Target] = {}


def register_target(target: Target, *, replace: bool = False) -> Target:
    if not isinstance(target, Target):
        raise TargetError(f"register_target expects a fxq.Target, got {type(target).__name__}")
    if target.name in _REGISTRY and not replace:
        raise TargetError(f"a target named {target.name!r} exists; pass replace=True to redefine it")
    _REGISTRY[target.name] = target
    return target


def targets() -> dict[str, Target]:
    return dict(_REGISTRY)


def get_target(target: str | Target, **overrides) -> Target:
    if isinstance(target, Target):
        return target.with_overrides(**overrides)
    if target not in _REGISTRY:
        raise TargetError(f"unknown target {target!r}; registered targets: {sorted(_REGISTRY)}")
    return _REGISTRY[target].with_overrides(**overrides)


register_target(Target(
    name="shift-int",
    description="power-of-two scales, per-channel weight exponents, shift-only requant (RAPQ)",
))
