"""choose_formats: a power-of-two format for every qpoint and every weight channel.

Activations: per tensor, unsigned where the value is non-negative by construction (after ReLU/ReLU6)
and the target allows it; the fractional length is the no-clip one or one of the target's
``exp_search_radius`` finer neighbours, whichever gives the least squared error on the observed sample
(not just ceil(log2 max)). Weights: the same search per output channel (or per tensor).

Reads: ``meta[OBSERVER]``, ``meta[ROLE]``, ``meta[KIND]``, the layers' weights, ``ctx.target``.
Writes: ``meta[ACT_FMT]`` (ActFormat) on qpoints and inputs, ``meta[W_FMT]`` (WeightFormat) on conv/linear.
Raises CalibrationError naming a qpoint that calibration never reached.
"""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from fxq import meta
from fxq.context import CompileContext
from fxq.errors import CalibrationError, describe_node
from fxq.formats import int_range, search_frac
from fxq.qtypes import ActFormat, WeightFormat
from fxq.walk import is_nonnegative, weighted_layers


def activation_format(node: fx.Node, target) -> ActFormat:
    """The format's shape (bits, sign, clamp) before its fractional length is chosen."""
    kind = node.meta[meta.KIND]
    clamp = (-float("inf"), float("inf"))
    if kind == "relu":
        clamp = (0.0, float("inf"))
    elif kind == "clamp":
        clamp = (float(node.args[1]), float(node.args[2]))
    signed = not (target.unsigned_after_relu and is_nonnegative(node))
    return ActFormat(frac=0, bits=target.a_bits, signed=signed, clamp=clamp)


def choose_formats(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    t = ctx.target
    for node in gm.graph.nodes:
        obs = node.meta.get(meta.OBSERVER)
        if obs is None:
            continue
        if not obs.seen:
            raise CalibrationError(f"{describe_node(node)} saw no values during calibration")
        fmt = activation_format(node, t)
        sample = np.clip(obs.sample(), *fmt.clamp)
        # Search over the dtype's codes: the clamp already bounds the sample, and fmt.range at frac 0
        # would be the clamp itself ([0, 6] for ReLU6), not the codes available.
        codes = int_range(fmt.bits, fmt.signed)
        frac = search_frac(sample[None, :], codes, t.exp_search_radius, t.rounding)[0]
        node.meta[meta.ACT_FMT] = fmt.with_frac(int(frac))
    for node, module in weighted_layers(gm):
        w = module.weight.detach().double().numpy()
        rows = w.reshape(w.shape[0], -1) if t.w_granularity == "channel" else w.reshape(1, -1)
        rng = WeightFormat((0,), t.w_bits).range
        frac = search_frac(rows, rng, t.exp_search_radius, t.rounding)
        frac = np.broadcast_to(frac, (w.shape[0],))
        node.meta[meta.W_FMT] = WeightFormat(tuple(int(f) for f in frac), t.w_bits)
    return gm
