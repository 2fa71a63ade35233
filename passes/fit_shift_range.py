"""fit_shift_range: keep every conv/linear requant shift within what the integer graph allows.

A conv/linear output is requantized by shifting its accumulator right by in_frac + w_frac - out_frac.
A channel whose weights are all near zero gets a very fine weight step (its fractional length follows
its values), and with a small bias nothing coarsens it, so its shift can pass MAX_SHIFT and the lowered
graph would be refused by the verifier. Such a channel's accumulator, shifted that far, rounds to 0 or
nearly: its weight step is coarsened until the shift is MAX_SHIFT, at the fake-quant level, so that
the fake-quant model and the integer graph keep computing the same thing.

Reads: the FakeQuant after each QConv2d/QLinear (through a fused ReLU/clamp), the layer's input and
weight fractional lengths. Writes: the layer's weight format (coarser steps for those channels only),
with a note naming the layer. Cluster-shared weight scales are left alone. PIPELINE runs it only on
targets whose scales are not dyadic (there the requant is a multiplier and a shift fitted to the scale ratio).
Requires: insert_fake_quant; runs last, after every pass that moves a step.
"""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from fxq import meta
from fxq.context import CompileContext
from fxq.fakequant import FakeQuant, _QWeighted
from fxq.passes.calibration.tuning import set_weight_frac, sync_weight_meta
from fxq.verify import MAX_SHIFT
from fxq.walk import requant_source


def fit_shift_range(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    modules = dict(gm.named_modules())
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), FakeQuant):
            continue
        src = requant_source(node)
        layer = modules.get(src.target) if src.meta.get(meta.KIND) in meta.WEIGHTED else None
        if not isinstance(layer, _QWeighted) or layer.clustered:
            continue
        out_frac = modules[node.target].fmt.frac
        frac = layer.w_fmt.frac_array
        capped = np.minimum(frac, MAX_SHIFT + out_frac - layer.in_frac)
        if np.array_equal(capped, frac):
            continue
        set_weight_frac(layer, capped, ctx.target.acc_bits)
        changed = True
        ctx.note(f"{src.name}: {int((frac > capped).sum())} output channel(s) with near-zero weights got a coarser "
                 f"weight step, so that the requant shift stays within {MAX_SHIFT}")
    if changed:
        sync_weight_meta(gm)
    return gm
