"""Constants and integer-id ops: const (constant codes), gather (rows of a code table picked by token
ids) and token_mask (1 where the ids compare true with a constant)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..formats import IntRange
from .base import Attrs, OpSpec
from .checks import codes_in, is_int
from .text import dtype_text, shape_text


class Const(OpSpec):
    name = "const"
    doc = "constant codes with a leading batch dim of 1 (class token, position embedding)"

    def verify(self, n, ins, chk, ctx):
        chk(not ins, "a constant takes no inputs")
        codes = n.consts.get("codes")
        chk(codes is not None and tuple(codes.shape) == tuple(n.out.shape), "constant codes missing or of the wrong shape")
        chk(n.out.shape[0] == 1, "a constant has a batch dim of 1")
        codes_in(chk, codes, IntRange(n.out.lo, n.out.hi), "constant codes")

    def text(self, n, args, types):
        return args + [f"codes[{shape_text(n.consts['codes'])}]"]

    def run(self, n, t=None):
        return n.consts["codes"].astype(np.int64)

    def emit(self, b, n):
        b.const(n.name, b.carrier_codes(n.consts["codes"], n.out.dtype))


class Gather(OpSpec):
    name = "gather"
    doc = "rows of a constant code table picked by the integer input (token embedding)"

    def verify(self, n, ins, chk, ctx):
        chk(len(ins) == 1 and ins[0].dtype == "int64", "gather reads integer token ids")
        table = n.consts.get("table")
        chk(table is not None and table.ndim == 2 and n.out.shape == ins[0].shape + (table.shape[1],),
            "the code table must be [vocabulary, width] and the output [*ids, width]")
        codes_in(chk, table, IntRange(n.out.lo, n.out.hi), "table codes")

    def text(self, n, args, types):
        table = n.consts["table"]
        return args + [f"table:{dtype_text(table.dtype)}[{shape_text(table)}]"]

    def run(self, n, ids, t=None):
        table = n.consts["table"].astype(np.int64)
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= len(table):
            raise InputError(f"token ids outside [0, {len(table)}) at IR node %{n.name}")
        return table[ids]

    def emit(self, b, n):
        table = b.const(f"{n.name}_table", b.carrier_codes(n.consts["table"], n.out.dtype))
        b.node("Gather", [table, b.tensor(n.inputs[0])], n.name, axis=0)


# name -> (numpy comparison, ONNX op, negate the ONNX result)
COMPARISONS = {"ne": (np.not_equal, "Equal", True), "eq": (np.equal, "Equal", False),
               "gt": (np.greater, "Greater", False), "ge": (np.greater_equal, "GreaterOrEqual", False),
               "lt": (np.less, "Less", False), "le": (np.less_equal, "LessOrEqual", False)}


@dataclass(frozen=True, kw_only=True)
class TokenMaskAttrs(Attrs):
    compare: str
    value: int


class TokenMask(OpSpec):
    name = "token_mask"
    doc = "1 where the integer input compares true with a constant (ids != pad), else 0"
    Attrs = TokenMaskAttrs

    def verify(self, n, ins, chk, ctx):
        chk(len(ins) == 1 and ins[0].dtype == "int64", "token_mask reads integer token ids")
        chk(n.attrs.compare in COMPARISONS, f"unknown comparison {n.attrs.compare!r}")
        chk(is_int(n.attrs.value), f"value {n.attrs.value!r} is not an integer")
        chk(n.out.dtype == "uint8" and (n.out.lo, n.out.hi) == (0, 1), "a token mask is u8 0/1")

    def text(self, n, args, types):
        return args + [f"{n.attrs.compare} {n.attrs.value}"]

    def run(self, n, ids, t=None):
        return COMPARISONS[n.attrs.compare][0](ids, n.attrs.value).astype(np.int64)

    def emit(self, b, n):
        _, onnx_op, negate = COMPARISONS[n.attrs.compare]
        value = b.const(f"{n.name}_value", np.array(n.attrs.value, np.int64))
        hit = b.node(onnx_op, [b.tensor(n.inputs[0]), value], f"{n.name}_bool")
        if negate:
            hit = b.node("Not", [hit], f"{n.name}_not")
        b.cast(hit, n.name)     # 0/1 in float64, read only by masked ops
