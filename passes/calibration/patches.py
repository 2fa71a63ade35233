"""Spatial patches for block reconstruction: train a convolutional block on crops of its cached maps.

A block made only of convolutions, zero pads and pointwise ops maps output pixel ``j`` of each spatial
axis to the input pixels ``[S*j + lo, S*j + hi]``. Run on an input crop that starts at a multiple of
``S``, it reproduces the whole-map output (shifted by start/S) wherever that range lies inside the
crop; nearer the crop's edges its own zero padding stands in for real neighbours, so those outputs are
left out. A crop costs (crop / map)^2 of a whole map: a block at 120x120 gets ~20x the iterations in
the same time, which is what learned rounding needs on a 2-core machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxq import meta
from fxq.fakequant import QConv2d

# Ops that keep pixel j at pixel j (elementwise, or per-position across channels).
_POINTWISE = frozenset({"fake_quant", "relu", "clamp", "add", "mul_const", "gelu"})


@dataclass(frozen=True)
class Field:
    """Per spatial axis (rows, cols): output pixel j reads input pixels [stride*j + lo, stride*j + hi]."""
    stride: tuple[int, int]
    lo: tuple[int, int]
    hi: tuple[int, int]


_IDENTITY = Field((1, 1), (0, 0), (0, 0))


def _join(fields: list[Field]) -> Field | None:
    if not fields or any(f.stride != fields[0].stride for f in fields):
        return None
    return Field(fields[0].stride, tuple(min(f.lo[a] for f in fields) for a in (0, 1)),
                 tuple(max(f.hi[a] for f in fields) for a in (0, 1)))


def _conv(f: Field, m: QConv2d) -> Field | None:
    if isinstance(m.padding, str):
        return None
    k = m.weight.shape[-2:]
    axes = [(f.stride[a] * m.stride[a], f.lo[a] - f.stride[a] * m.padding[a],
             f.hi[a] + f.stride[a] * ((k[a] - 1) * m.dilation[a] - m.padding[a])) for a in (0, 1)]
    return Field(*(tuple(v) for v in zip(*axes)))


def _pad(f: Field, pads) -> Field | None:
    if len(pads) != 4:                       # (left, right, top, bottom): the two spatial axes only
        return None
    before = (pads[2], pads[0])
    return Field(f.stride, tuple(f.lo[a] - f.stride[a] * before[a] for a in (0, 1)),
                 tuple(f.hi[a] - f.stride[a] * before[a] for a in (0, 1)))


def receptive_field(gm: fx.GraphModule, block) -> Field | None:
    """The block's output-to-input pixel map, or None when it is not a local 2-D map (a pool, a linear, a
    reshape, an input that is not 4-D ...): such a block trains on whole maps."""
    if len(block.input.meta.get(meta.SHAPE, ())) != 4:
        return None
    modules = dict(gm.named_modules())
    env = {block.input: _IDENTITY}
    for node in block.nodes:
        kind = node.meta.get(meta.KIND)
        if node.op == "get_attr" or not all(a in env for a in node.all_input_nodes):
            return None                       # a constant added to the maps may differ per position
        f = _join([env[a] for a in node.all_input_nodes])
        if f is None:
            return None
        if kind == "conv" and isinstance(modules.get(node.target), QConv2d):
            f = _conv(f, modules[node.target])
        elif kind == "pad":
            f = _pad(f, tuple(node.args[1]))
        elif kind not in _POINTWISE:
            return None
        if f is None:
            return None
        env[node] = f
    return env.get(block.output)


@dataclass(frozen=True)
class PatchPlan:
    """Crops of ``in_len`` input pixels starting at ``stride * m``; their output pixels ``skip ..
    skip + size`` are the whole map's ``m + skip ..``, per axis."""
    stride: tuple[int, int]
    in_len: tuple[int, int]
    skip: tuple[int, int]
    size: int
    starts: tuple[int, int]                  # how many crop positions m per axis


def plan_patches(field: Field | None, in_hw: tuple[int, int], out_hw: tuple[int, int], size: int) -> PatchPlan | None:
    """Crops giving ``size`` x ``size`` exact output pixels, or None when the map is under twice that (a
    crop would cost nearly the whole map and see mostly its edges)."""
    if field is None or size <= 0 or min(out_hw) < 2 * size:
        return None
    skip = tuple(max(0, -(field.lo[a] // field.stride[a])) for a in (0, 1))   # ceil(-lo / S)
    in_len = tuple(field.stride[a] * (skip[a] + size - 1) + field.hi[a] + 1 for a in (0, 1))
    starts = tuple((in_hw[a] - in_len[a]) // field.stride[a] + 1 for a in (0, 1))
    if min(starts) < 2:
        return None
    return PatchPlan(field.stride, in_len, skip, size, starts)


def window(plan: PatchPlan, m: tuple[int, int]) -> tuple[slice, slice, slice, slice]:
    """Crop position ``m`` (per axis, in output pixels): (input rows, input cols, target rows, target cols)."""
    inp = [slice(plan.stride[a] * m[a], plan.stride[a] * m[a] + plan.in_len[a]) for a in (0, 1)]
    out = [slice(m[a] + plan.skip[a], m[a] + plan.skip[a] + plan.size) for a in (0, 1)]
    return inp[0], inp[1], out[0], out[1]


def sample_window(plan: PatchPlan, gen: torch.Generator) -> tuple[slice, slice, slice, slice]:
    """A crop position drawn uniformly."""
    return window(plan, tuple(int(torch.randint(0, plan.starts[a], (1,), generator=gen)) for a in (0, 1)))


def crop_batch(win: tuple[slice, slice, slice, slice], inputs: tuple[torch.Tensor, ...],
               target: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``inputs`` cut to a window's input pixels and ``target`` to its exact output pixels."""
    rows, cols, out_rows, out_cols = win
    return tuple(x[..., rows, cols] for x in inputs), target[..., out_rows, out_cols]


def crop_output(out: torch.Tensor, plan: PatchPlan) -> torch.Tensor:
    """The exact pixels of a block's output on a crop."""
    r, c = plan.skip
    return out[..., r:r + plan.size, c:c + plan.size]
