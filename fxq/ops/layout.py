"""Ops whose output codes are the input codes rearranged, selected, padded or clamped, at the same
format: concat_int, pad_int, clamp_int, reshape, permute, select, expand_batch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Attrs, OpSpec
from .checks import is_int


def non_batch_axis(axis, rank: int) -> bool:
    return is_int(axis) and -rank <= axis < rank and axis % rank != 0


def same_format_ok(chk, n, ins, keeps_range: bool = True) -> None:
    """Inputs and output share dtype, scale and zero point; unless the op clamps, the output's declared code
    range holds every input's (a narrower one would understate the bounds of the layers that read it)."""
    for t in ins:
        chk(t.dtype == n.out.dtype and t.frac == n.out.frac and t.mant == n.out.mant and t.zp == n.out.zp,
            f"input {t.short()} and output {n.out.short()} must share dtype, scale and zero point")
        if keeps_range:
            chk(n.out.lo <= t.lo and n.out.hi >= t.hi, f"output code range [{n.out.lo}, {n.out.hi}] does not hold the "
                                                       f"input's [{t.lo}, {t.hi}]")


class _SameFormat(OpSpec):
    same_format = True
    arity = 1
    clamps = False                # the output range may be narrower than the input's (clamp_int)

    def verify(self, n, ins, chk, ctx):
        chk(len(ins) == self.arity if self.arity else len(ins) >= 1,
            f"{self.name} takes {self.arity or 'one or more'} input(s), got {len(ins)}")
        self.check(n, ins, chk)
        same_format_ok(chk, n, ins, keeps_range=not self.clamps)

    def check(self, n, ins, chk) -> None:
        """The op's own attribute rules."""


@dataclass(frozen=True, kw_only=True)
class AxisAttrs(Attrs):
    axis: int


class ConcatInt(_SameFormat):
    name = "concat_int"
    doc = "codes of one format, joined along an axis"
    Attrs = AxisAttrs
    arity = 0

    def check(self, n, ins, chk):
        chk(non_batch_axis(n.attrs.axis, len(n.out.shape)), f"axis {n.attrs.axis!r} is not a non-batch axis")

    def text(self, n, args, types):
        return args + [f"axis={n.attrs.axis}"]

    def run(self, n, *xs, t=None):
        return np.concatenate(xs, axis=n.attrs.axis)

    def emit(self, b, n):
        b.node("Concat", list(n.inputs), n.name, axis=int(n.attrs.axis))


@dataclass(frozen=True, kw_only=True)
class PadAttrs(Attrs):
    pads: tuple                 # torch order: last dim first, (before, after) pairs


class PadInt(_SameFormat):
    name = "pad_int"
    doc = "the code of 0.0 around the trailing dims"
    Attrs = PadAttrs

    def check(self, n, ins, chk):
        p = n.attrs.pads
        chk(len(p) % 2 == 0 and len(p) // 2 <= len(n.out.shape) - 1 and all(is_int(v) and v >= 0 for v in p),
            f"pads {list(p)} must be non-negative (before, after) pairs of the non-batch dims")

    def text(self, n, args, types):
        return args + [f"pads={list(n.attrs.pads)}"]

    def run(self, n, x, t=None):
        p = n.attrs.pads
        widths = [(0, 0)] * x.ndim
        for i in range(len(p) // 2):
            widths[x.ndim - 1 - i] = (p[2 * i], p[2 * i + 1])
        return np.pad(x, widths, constant_values=n.out.zp)       # the code of 0.0

    def emit(self, b, n):
        p, rank = n.attrs.pads, len(n.out.shape)
        begin, end = [0] * rank, [0] * rank
        for i in range(len(p) // 2):
            begin[rank - 1 - i], end[rank - 1 - i] = p[2 * i], p[2 * i + 1]
        pads = b.const(f"{n.name}_pads", np.array(begin + end, np.int64))
        b.node("Pad", [n.inputs[0], pads, b.code_const(f"{n.name}_zero", n.out, n.out.zp)], n.name, mode="constant")


@dataclass(frozen=True, kw_only=True)
class ClampAttrs(Attrs):
    lo: int
    hi: int


class ClampInt(_SameFormat):
    name = "clamp_int"
    doc = "codes clamped (a standalone ReLU / ReLU6)"
    Attrs = ClampAttrs
    clamps = True

    def check(self, n, ins, chk):
        chk(n.out.lo == n.attrs.lo and n.out.hi == n.attrs.hi, "clamp bounds differ from the output range")

    def text(self, n, args, types):
        return args + [f"[{n.attrs.lo},{n.attrs.hi}]"]

    def run(self, n, x, t=None):
        return np.clip(x, n.attrs.lo, n.attrs.hi)

    def emit(self, b, n):
        lo = b.code_const(f"{n.name}_lo", n.out, n.attrs.lo)
        hi = b.code_const(f"{n.name}_hi", n.out, n.attrs.hi)
        b.node("Clip", [n.inputs[0], lo, hi], n.name)


@dataclass(frozen=True, kw_only=True)
class ShapeAttrs(Attrs):
    shape: tuple                # -1 for the batch dim


class Reshape(_SameFormat):
    name = "reshape"
    doc = "codes unchanged, new shape"
    Attrs = ShapeAttrs

    def run(self, n, x, t=None):
        return x.reshape(n.attrs.shape)

    def emit(self, b, n):
        shape = b.const(f"{n.name}_shape", np.array(n.attrs.shape, np.int64))
        b.node("Reshape", [n.inputs[0], shape], n.name)


@dataclass(frozen=True, kw_only=True)
class PermAttrs(Attrs):
    perm: tuple


class Permute(_SameFormat):
    name = "permute"
    doc = "codes unchanged, axes reordered (the batch axis stays first)"
    Attrs = PermAttrs

    def check(self, n, ins, chk):
        perm = tuple(n.attrs.perm)
        chk(sorted(perm) == list(range(len(ins[0].shape))), f"perm {list(perm)} is not a permutation of the axes")
        chk(perm[0] == 0, f"permute {list(perm)} moves the batch axis")

    def text(self, n, args, types):
        return args + [f"perm={list(n.attrs.perm)}"]

    def run(self, n, x, t=None):
        return x.transpose(n.attrs.perm)

    def emit(self, b, n):
        b.node("Transpose", [n.inputs[0]], n.name, perm=list(n.attrs.perm))


@dataclass(frozen=True, kw_only=True)
class SelectAttrs(Attrs):
    axis: int
    index: int


class Select(_SameFormat):
    name = "select"
    doc = "one index along a non-batch axis (x[:, i])"
    Attrs = SelectAttrs

    def check(self, n, ins, chk):
        a, shape = n.attrs, ins[0].shape
        chk(non_batch_axis(a.axis, len(shape)), f"axis {a.axis!r} is not a non-batch axis")
        chk(is_int(a.index) and -shape[a.axis] <= a.index < shape[a.axis], f"index {a.index!r} outside axis {a.axis}")

    def text(self, n, args, types):
        return args + [f"axis={n.attrs.axis} index={n.attrs.index}"]

    def run(self, n, x, t=None):
        return np.take(x, n.attrs.index, axis=n.attrs.axis)

    def emit(self, b, n):
        index = b.const(f"{n.name}_index", np.array(n.attrs.index, np.int64))
        b.node("Gather", [n.inputs[0], index], n.name, axis=int(n.attrs.axis))


class ExpandBatch(_SameFormat):
    name = "expand_batch"
    doc = "a batch-1 constant repeated to the batch of the second input"

    def verify(self, n, ins, chk, ctx):
        chk(len(ins) == 2 and ins[0].shape[0] == 1, "expand_batch repeats a batch-1 tensor to another's batch")
        same_format_ok(chk, n, ins[:1])

    def run(self, n, const, like, t=None):
        return np.broadcast_to(const, (like.shape[0],) + const.shape[1:])

    def emit(self, b, n):
        batch = b.node("Shape", [n.inputs[1]], f"{n.name}_batch", start=0, end=1)
        rest = b.const(f"{n.name}_dims", np.array(n.out.shape[1:], np.int64))
        shape = b.node("Concat", [batch, rest], f"{n.name}_shape", axis=0)
        b.node("Expand", [n.inputs[0], shape], n.name)
