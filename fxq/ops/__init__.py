"""The IR's op table: one spec per op, each owning its attributes, verifier rule, printed form,
reference kernel and ONNX form (fxq.ops.base.OpSpec). The verifier, the printer, the reference
backend and the exporter loop over this table; a new op is a module here and one line below.
"""
from __future__ import annotations

import enum

from .add_int import AddInt
from .base import AttrError, Attrs, OpSpec, VerifyContext
from .float_island import FloatIsland
from .layout import ClampInt, ConcatInt, ExpandBatch, PadInt, Permute, Reshape, Select
from .matmul import MatmulInt
from .nonlinear import GeluInt, L2NormInt, LayerNormInt, MaskedMeanInt, SoftmaxInt
from .pool import AvgPoolInt, MaxPoolInt
from .quantize import Dequantize, Quantize
from .requant import Requant
from .tables import Const, Gather, TokenMask
from .twin import TwinExpand, TwinQuant
from .weighted import Conv2dCluster, Conv2dInt, LinearCluster, LinearInt, weight_codes

_SPECS = (Quantize, Dequantize, Conv2dInt, LinearInt, Conv2dCluster, LinearCluster, Requant, AddInt, AvgPoolInt,
          MaxPoolInt, ConcatInt, PadInt, ClampInt, Reshape, Permute, Select, ExpandBatch, Const, MatmulInt,
          FloatIsland, SoftmaxInt, GeluInt, LayerNormInt, MaskedMeanInt, L2NormInt, Gather, TokenMask, TwinQuant,
          TwinExpand)

# The op vocabulary, in table order: Op.CONV2D_INT == "conv2d_int".
Op = enum.Enum("Op", [(s.name.upper(), s.name) for s in _SPECS], type=str, module=__name__)

OPS: dict[Op, OpSpec] = {Op(s.name): s() for s in _SPECS}


def spec(op) -> OpSpec:
    """The spec of an op (an Op or its name); an unknown op gets an error listing the known ones."""
    try:
        return OPS[Op(op)]
    except ValueError:
        raise KeyError(f"unknown IR op {op!r}; known: {[o.value for o in OPS]}") from None


def ops_where(prop: str) -> frozenset:
    """The ops whose spec has the op-kind property ``prop`` (weighted, conv, requantizing, ...)."""
    return frozenset(op for op, s in OPS.items() if getattr(s, prop))


KIND_PROPERTIES = ("weighted", "conv", "cluster", "accumulator", "requantizing", "same_format")


def table() -> list[dict]:
    """One row per op: its name, one-line description, attributes (name: type = default) and kind
    properties; docs/maintainers/ir_ops.md is generated from it (tools/doc_ops.py)."""
    from dataclasses import MISSING, fields
    rows = []
    for op, s in OPS.items():
        attrs = [f.name + ("" if f.default is MISSING else f"={f.default!r}") for f in fields(s.Attrs)]
        rows.append({"op": op.value, "doc": s.doc, "attrs": attrs, "module": type(s).__module__,
                     "kinds": [k for k in KIND_PROPERTIES if getattr(s, k)]})
    return rows


__all__ = ["Op", "OPS", "OpSpec", "Attrs", "AttrError", "VerifyContext", "spec", "ops_where", "weight_codes", "table",
           "KIND_PROPERTIES"]
