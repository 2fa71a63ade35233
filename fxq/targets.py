"""Hardware targets as data.

A target says what the accelerator can do; passes read its fields and never test its name. Users
describe their own hardware with ``fxq.register_target(Target(...))`` or override fields per compile.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .formats import ACC_BITS, DEFAULT_ROUNDING, Rounding
from .islands import ISLAND_FUNCTIONS

# Weight scales: one per layer, one per output channel, or one per cluster of N input channels of a filter.
GRANULARITIES = ("tensor", "channel", "cluster")
# How a power-of-two step is chosen: by an error search over exponents (RAPQ-style), or from the
# tensor's standard deviation, f = floor(log2(c / std)) (F8Net).
# Or (int8 target) any scale, rounded to a dyadic number mant * 2**-frac with a short integer mantissa.
SCALE_KINDS = ("pow2", "fixed_point", "dyadic")
# "shift": every rescale is an arithmetic shift; "dyadic": an integer multiply, then a shift.
REQUANT_KINDS = ("shift", "dyadic")
TERNARY_THRESHOLDS = ("l2", "twn")   # per-cluster L2-optimal threshold, or TWN's 0.7 * mean|w|
FLOAT_ISLAND_OPS = ISLAND_FUNCTIONS
TWIN_OPS = ("softmax", "gelu")
# Fields that only mean something for one granularity: overriding them elsewhere is a mistake.
CLUSTER_FIELDS = ("cluster_size", "cluster_scale_bits", "ternary_threshold")
DYADIC_FIELDS = ("scale_mant_bits", "multiplier_bits", "act_range_search", "a_affine")
# acc * M must stay an exact float64 integer (the fake-quant model and the ONNX export compute it so).
MAX_MULTIPLIER_BITS = 21


class TargetError(ValueError):
    """A target or an override that cannot describe real hardware; names the field."""


@dataclass(frozen=True)
class Target:
    name: str
    description: str = ""
    w_bits: int = 8
    a_bits: int = 8
    w_granularity: str = "channel"
    # Clusters: N consecutive input channels of a filter share one scale (0: the whole filter).
    cluster_size: int = 4
    # A cluster's scale is an unsigned fixed-point number of this many bits.
    cluster_scale_bits: int = 8
    # With 2-bit cluster weights (ternary codes -1, 0, +1), how the zero threshold is chosen.
    ternary_threshold: str = "l2"
    # The first and last weighted layers (the image's few input channels, the logits) keep this many
    # weight bits with per-channel power-of-two scales, as low-bit methods usually do; None: like the rest.
    edge_w_bits: int | None = None
    # Activations at the network's edges (its input codes, the last weighted layer's input and the
    # output logits) keep this many bits: low-bit methods leave the image and the logits at 8 bits.
    edge_a_bits: int | None = None
    # The network's output codes (the logits). Nothing inside the network reads them, so wider codes cost
    # no multiplier; at 8 bits EfficientNet-Lite1's logits round to steps of 2**-3, which by itself ties or
    # flips 4.5% of its top-1s (docs/bench/efficientnet_lowbit.md). None: ``edge_a_bits`` if set, else ``a_bits``.
    out_bits: int | None = None
    # Weight codes use the whole signed range, -2**(b-1) included (2 bits: four levels -2..1, as RAPQ
    # and BRECQ count 2-bit weights); False keeps them symmetric (2 bits: ternary -1, 0, +1).
    w_full_range: bool = False
    scale_kind: str = "pow2"
    # F8Net's rule f = floor(log2(c / std)): c for signed and for unsigned (post-ReLU) tensors.
    std_coeff_signed: float = 40.0
    std_coeff_unsigned: float = 70.0
    requant: str = "shift"
    # Dyadic targets (int8): scales are mant * 2**-frac with a mantissa of this many bits ...
    scale_mant_bits: int = 8
    # ... and a requant multiplies the accumulator by an integer of this many bits before its shift.
    multiplier_bits: int = 16
    # Activations as unsigned codes with a zero point (affine), as torch.ao and ONNX Runtime use.
    a_affine: bool = False
    # An affine activation's range: the observed min/max shrunk by each factor, least squared error wins.
    act_range_search: tuple = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
    rounding: Rounding = DEFAULT_ROUNDING
    acc_bits: int = ACC_BITS
    # Inputs of a residual add or a concat carry one fractional length (master/sibling rule).
    share_residual_scales: bool = True
    # Activations after ReLU/ReLU6 use unsigned codes (one more bit of resolution).
    unsigned_after_relu: bool = True
    # passes/fit_clamp_range: a clamped activation (ReLU6) is rescaled so that its bound is the top code
    # of its power-of-two step (for ReLU6 at 8 bits the layers around it absorb a factor 1.328).
    fit_clamps: bool = False
    # The error search looks at this many exponents finer than the no-clip one.
    exp_search_radius: int = 3
    # hessian_search tries this many fractional lengths either side of choose_formats' choice.
    search_radius: int = 2
    # Ops that run in float64 between a dequantize and a quantize; the others of FLOAT_ISLAND_OPS use
    # fxq's integer-only kernels (fxq.int_nonlinear), which need power-of-two formats.
    float_islands: frozenset = field(default_factory=frozenset)
    # Post-softmax / post-GELU activations in twin-uniform codes (PTQ4ViT): two power-of-two steps, 2**m apart.
    twin_uniform: frozenset = frozenset(TWIN_OPS)

    def __post_init__(self):
        for fld in ("w_bits", "a_bits"):
            v = getattr(self, fld)
            if not isinstance(v, int) or not 2 <= v <= 16:
                raise TargetError(f"target {self.name!r}: {fld}={v!r} must be an integer in 2..16")
        if self.w_granularity not in GRANULARITIES:
            raise TargetError(f"target {self.name!r}: w_granularity={self.w_granularity!r} "
                              f"must be one of {GRANULARITIES}")
        if self.w_full_range and self.w_granularity == "cluster":
            raise TargetError(f"target {self.name!r}: w_full_range=True with w_granularity='cluster'; cluster "
                              f"codes are symmetric (ternary or narrow odd ranges)")
        if self.w_granularity == "cluster":
            if not isinstance(self.cluster_size, int) or isinstance(self.cluster_size, bool) or self.cluster_size < 0:
                raise TargetError(f"target {self.name!r}: cluster_size={self.cluster_size!r} must be an integer >= 1 "
                                  f"(or 0 for one cluster per filter)")
            if self.w_bits > 8:
                raise TargetError(f"target {self.name!r}: w_bits={self.w_bits} with w_granularity='cluster'; "
                                  f"cluster weights are ternary (2) or narrow codes up to 8 bits")
            if not isinstance(self.cluster_scale_bits, int) or not 2 <= self.cluster_scale_bits <= 16:
                raise TargetError(f"target {self.name!r}: cluster_scale_bits={self.cluster_scale_bits!r} "
                                  f"must be an integer in 2..16")
            if self.ternary_threshold not in TERNARY_THRESHOLDS:
                raise TargetError(f"target {self.name!r}: ternary_threshold={self.ternary_threshold!r} "
                                  f"must be one of {TERNARY_THRESHOLDS}")
        if self.edge_w_bits is not None and (not isinstance(self.edge_w_bits, int) or not 2 <= self.edge_w_bits <= 16):
            raise TargetError(f"target {self.name!r}: edge_w_bits={self.edge_w_bits!r} must be None or an integer in 2..16")
        for fld in ("edge_a_bits", "out_bits"):
            v = getattr(self, fld)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 16):
                raise TargetError(f"target {self.name!r}: {fld}={v!r} must be None or an integer in 2..16")
        if self.scale_kind not in SCALE_KINDS:
            raise TargetError(f"target {self.name!r}: scale_kind={self.scale_kind!r} must be one of {SCALE_KINDS}")
        if self.requant not in REQUANT_KINDS:
            raise TargetError(f"target {self.name!r}: requant={self.requant!r} must be one of {REQUANT_KINDS}")
        self._check_dyadic()
        try:
            object.__setattr__(self, "rounding", Rounding(self.rounding))
        except ValueError:
            raise TargetError(f"target {self.name!r}: rounding={self.rounding!r} must be one of "
                              f"{[r.value for r in Rounding]}") from None
        if self.acc_bits not in (16, 24, 32):
            raise TargetError(f"target {self.name!r}: acc_bits={self.acc_bits!r} must be 16, 24 or 32")
        for fld in ("std_coeff_signed", "std_coeff_unsigned"):
            v = getattr(self, fld)
            if not isinstance(v, (int, float)) or not v > 0:
                raise TargetError(f"target {self.name!r}: {fld}={v!r} must be a positive number")
        if self.product_bits >= self.acc_bits:
            raise TargetError(f"target {self.name!r}: weight x activation products of {self.product_bits} bits "
                              f"leave no headroom in a {self.acc_bits}-bit accumulator")
        if not isinstance(self.exp_search_radius, int) or not 0 <= self.exp_search_radius <= 8:
            raise TargetError(f"target {self.name!r}: exp_search_radius={self.exp_search_radius!r} must be in 0..8")
        if not isinstance(self.search_radius, int) or not 0 <= self.search_radius <= 8:
            raise TargetError(f"target {self.name!r}: search_radius={self.search_radius!r} must be in 0..8")
        if isinstance(self.float_islands, str):            # "softmax,gelu" or "all"
            names = self.float_islands.split(",") if self.float_islands != "all" else FLOAT_ISLAND_OPS
            object.__setattr__(self, "float_islands", frozenset(n.strip() for n in names if n.strip()))
        bad = set(self.float_islands) - set(FLOAT_ISLAND_OPS)
        if bad:
            raise TargetError(f"target {self.name!r}: float_islands has unknown ops {sorted(bad)}; "
                              f"known: {FLOAT_ISLAND_OPS}")
        object.__setattr__(self, "float_islands", frozenset(self.float_islands))
        twin = self.twin_uniform
        if isinstance(twin, str):
            twin = TWIN_OPS if twin == "all" else [n.strip() for n in twin.split(",") if n.strip()]
        twin = frozenset(twin or ())
        if twin - set(TWIN_OPS):
            raise TargetError(f"target {self.name!r}: twin_uniform has unknown ops {sorted(twin - set(TWIN_OPS))}; "
                              f"known: {TWIN_OPS}")
        if twin and self.scale_kind == "dyadic":
            raise TargetError(f"target {self.name!r}: twin_uniform needs power-of-two steps (R2's step is 2**m "
                              f"times R1's); scale_kind 'dyadic' has none. Pass twin_uniform=()")
        object.__setattr__(self, "twin_uniform", twin)

    def _check_dyadic(self) -> None:
        dyadic_scale, dyadic_requant = self.scale_kind == "dyadic", self.requant == "dyadic"
        if dyadic_scale != dyadic_requant:
            raise TargetError(f"target {self.name!r}: scale_kind={self.scale_kind!r} with requant={self.requant!r}; "
                              f"dyadic scales need requant='dyadic' (a shift cannot rescale by a mantissa) and "
                              f"power-of-two scales rescale exactly by shifts, so set both to 'dyadic' or neither")
        if self.a_affine and not dyadic_scale:
            raise TargetError(f"target {self.name!r}: a_affine=True needs scale_kind='dyadic' (zero points come with "
                              f"the int8 target's affine scales)")
        if dyadic_scale and self.w_granularity == "cluster":
            raise TargetError(f"target {self.name!r}: w_granularity='cluster' with scale_kind='dyadic'; cluster "
                              f"scales are fixed-point codes, use scale_kind='pow2'")
        if not isinstance(self.scale_mant_bits, int) or not 1 <= self.scale_mant_bits <= 12:
            raise TargetError(f"target {self.name!r}: scale_mant_bits={self.scale_mant_bits!r} must be an integer "
                              f"in 1..12")
        if not isinstance(self.multiplier_bits, int) or not 2 <= self.multiplier_bits <= MAX_MULTIPLIER_BITS:
            raise TargetError(f"target {self.name!r}: multiplier_bits={self.multiplier_bits!r} must be an integer in "
                              f"2..{MAX_MULTIPLIER_BITS} (accumulator x multiplier must stay exact in float64)")
        shrink = tuple(self.act_range_search)
        if not shrink or not all(isinstance(k, (int, float)) and 0 < k <= 1 for k in shrink):
            raise TargetError(f"target {self.name!r}: act_range_search={self.act_range_search!r} must be a non-empty "
                              f"sequence of factors in (0, 1]")
        object.__setattr__(self, "act_range_search", tuple(float(k) for k in shrink))

    @property
    def weight_code_bits(self) -> int:
        """Bits of the integer a weight multiplies by: a cluster's code times its scale code."""
        if self.w_granularity == "cluster":
            return self.w_bits + self.cluster_scale_bits
        return self.w_bits

    @property
    def product_bits(self) -> int:
        return self.weight_code_bits + self.a_bits

    @property
    def ternary(self) -> bool:
        return self.w_granularity == "cluster" and self.w_bits == 2

    def with_overrides(self, **overrides) -> "Target":
        names = {f.name for f in dataclasses.fields(self)} - {"name", "description"}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TargetError(f"unknown target override(s) {unknown}; fields are {sorted(names)}")
        if not overrides:
            return self
        tag = ",".join(f"{k}={v.value if isinstance(v, Rounding) else v}" for k, v in sorted(overrides.items()))
        new = dataclasses.replace(self, name=f"{self.name}[{tag}]", **overrides)
        stray = [f for f in CLUSTER_FIELDS if f in overrides and new.w_granularity != "cluster"]
        if stray:
            raise TargetError(f"target {new.name!r}: {stray[0]} applies only to w_granularity='cluster', and this "
                              f"target's weights are per {new.w_granularity}; use target='dfp-cluster' or also "
                              f"set w_granularity='cluster'")
        stray = [f for f in DYADIC_FIELDS if f in overrides and new.scale_kind != "dyadic"]
        if stray:
            raise TargetError(f"target {new.name!r}: {stray[0]} applies only to scale_kind='dyadic', and this "
                              f"target's scales are {new.scale_kind}; use target='int8'")
        return new

    def weights_text(self) -> str:
        if self.w_granularity != "cluster":
            return f"per {self.w_granularity}"
        n = "filter" if self.cluster_size == 0 else f"N={self.cluster_size}"
        codes = "ternary" if self.ternary else f"{self.w_bits}-bit"
        return f"{codes}, cluster {n}, u{self.cluster_scale_bits} scale"

    def as_row(self) -> dict:
        dyadic = self.scale_kind == "dyadic"
        return {"name": self.name, "w_bits": self.w_bits, "a_bits": self.a_bits,
                "weights": self.weights_text(),
                "activations": "affine (zero point)" if self.a_affine else "symmetric",
                "scale": f"dyadic m{self.scale_mant_bits}" if dyadic else self.scale_kind,
                "requant": f"x M{self.multiplier_bits}, shift" if dyadic else self.requant,
                "rounding": self.rounding.value, "acc": self.acc_bits,
                "first/last layers": ", ".join(filter(None, (
                    f"w{self.edge_w_bits} per channel" if self.edge_w_bits else "",
                    f"a{self.edge_a_bits} in/out" if self.edge_a_bits else "",
                    f"out{self.out_bits}" if self.out_bits else ""))) or "same",
                "shared residual scales": self.share_residual_scales,
                "float islands": ",".join(sorted(self.float_islands)) or "-",
                "twin uniform": ",".join(sorted(self.twin_uniform)) or "-",
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
register_target(Target(
    name="fixed-point8",
    description="F8Net: 8-bit fixed point, fractional lengths from tensor std, master/sibling residuals",
    w_granularity="channel", scale_kind="fixed_point",
))
register_target(Target(
    name="dfp-cluster",
    description="dynamic fixed point, filter clusters: ternary (w_bits=2) or 4-bit codes, one u8 scale per cluster",
    w_bits=2, w_granularity="cluster", cluster_size=4, edge_w_bits=8,
))
register_target(Target(
    name="int8",
    description="per-channel int8 weights, affine u8 activations, integer-multiplier + shift requant (torch.ao/ORT-like)",
    w_granularity="channel", scale_kind="dyadic", requant="dyadic", a_affine=True, share_residual_scales=False,
    float_islands=FLOAT_ISLAND_OPS,        # as in ONNX Runtime and torch.ao: softmax/GELU/LayerNorm stay float
    twin_uniform=(),
))
