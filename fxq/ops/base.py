"""What every IR op module provides: typed attributes, the verifier rule, the printed form, the
reference kernel and the ONNX form, with the op-kind properties that passes and backends read.

An op module defines one ``OpSpec`` subclass per op (or a small family sharing a kernel) and its
``Attrs`` dataclass; fxq.ops registers them. Nothing here imports fxq.ir: ops sit below the IR.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

import numpy as np

from ..errors import ExportError


class AttrError(ValueError):
    """An attribute dict that does not fit an op's Attrs (unknown key, missing key)."""


def _tuples(v):
    """JSON lists (and nested lists) back to the tuples the attributes hold."""
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def jsonable(v):
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


@dataclass(frozen=True, kw_only=True)
class Attrs:
    """An op's attributes: frozen, typed, and saved as JSON without the fields left at their default."""

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.default is MISSING or v != f.default:
                out[f.name] = jsonable(v)
        return out

    @classmethod
    def from_dict(cls, d: dict, op: str) -> "Attrs":
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise AttrError(f"unknown attribute(s) {unknown}; {op} takes {names or 'none'}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in d]
        if missing:
            raise AttrError(f"missing attribute(s) {missing} of {op}")
        return cls(**{k: _tuples(v) for k, v in d.items()})

    def replace(self, **changes) -> "Attrs":
        from dataclasses import replace
        return replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class NoAttrs(Attrs):
    pass


@dataclass(frozen=True)
class VerifyContext:
    """What a rule may need beyond the node: the float-island functions the target declares."""
    float_islands: frozenset = frozenset()


class OpSpec:
    """One IR op. Subclasses set ``name`` and ``Attrs`` and override what applies."""
    name: str = ""
    Attrs: type = NoAttrs
    doc: str = ""                  # one line for the op table (docs and `fxq ops`)
    # -- op-kind properties (read by passes, the verifier and the backends instead of op-name lists) --
    weighted = False               # accumulates codes x constant weights into int32 (w and b constants)
    conv = False                   # ... over a sliding window (stride/padding/dilation/groups)
    cluster = False                # ... with cluster codes t times scale codes alpha
    accumulator = False            # produces an int32 accumulator that exactly one requant reads
    requantizing = False           # rescales (shift = frac_in - frac_out, or a dyadic multiplier) and rounds
    same_format = False            # output codes are the input codes rearranged or selected, same format
    reads_input_type = False       # run() also gets t=, the first input's TensorType
    reads_twin = False             # may read twin-uniform codes (only twin_expand)

    # -- the four spellings ------------------------------------------------------------------------
    def verify(self, n, ins: list, chk, ctx: VerifyContext) -> None:
        """Raise through ``chk(ok, why)`` when an invariant the backends rely on does not hold."""
        chk(False, "op has no verifier rule")

    def text(self, n, args: list[str], types: dict) -> list[str]:
        """The printed arguments: ``args`` are the inputs as printed; append the attributes."""
        return args

    def run(self, n, *xs, t=None) -> np.ndarray:
        """The reference kernel on int64 codes (float for quantize's input)."""
        raise NotImplementedError(f"reference backend has no kernel for op {self.name}")

    def emit(self, b, n) -> None:
        """The ONNX form, built through the exporter's builder ``b`` (backends.onnx_qdq)."""
        raise ExportError(f"IR node %{n.name}: the ONNX exporter has no form for op {self.name}")


class AccumulatorSpec(OpSpec):
    """An op whose int32 accumulator exactly one requant reads; its ONNX form is emitted with that
    requant (``emit_requantized``), so the accumulator itself emits nothing."""
    accumulator = True

    def emit(self, b, n) -> None:
        users = b.consumers.get(n.name, [])
        if len(users) != 1 or users[0].op.value != "requant":
            raise ExportError(f"IR node %{n.name}: an accumulator must feed exactly one requant to export as QDQ")

    def emit_requantized(self, b, acc, rq) -> None:
        raise NotImplementedError
