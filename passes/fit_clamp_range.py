"""fit_clamp_range: rescale a clamped activation so that its bound is the top code of a power-of-two step.

ReLU6 clamps at 6, and no power-of-two step puts 6 on the last code: unsigned 8-bit codes at 2**-5
reach 7.97, so codes 193..255 are never used and the step is a third coarser than 6 / 255. The layer
that produces the activation is multiplied by s = top * 2**-f / hi (weights and bias, f the finest
step whose codes still reach ``hi``), the clamp's bound by s, and every layer that reads the
activation (through zero padding, pooling, flatten or reshape) is divided by s. The network computes
the same function, and the clamp now sits on the top code (for ReLU6 and 8-bit codes s = 1.328). What
that gains, measured: docs/notes/from_code.md.

Applies to clamps with a lower bound of 0 and a finite upper bound whose input comes only from one
conv/linear and whose value reaches only conv/linear layers (canonicalize has made sure each layer is
called once). Bits follow
choose_formats: ``a_bits``, ``edge_a_bits`` where the activation feeds the last conv/linear, unsigned
codes when the target allows them after a ReLU.

Reads: ``meta[KIND]``, ``ctx.target`` (``fit_clamps``, bits, sign, scale kind). Writes: the producer's
and the consumers' weights and bias, the clamp's bound, ``meta[BN_STATS]`` of the producer (its output
distribution scales too). Runs after fold_bn and fold_pool_divisor, before insert_observers; PIPELINE runs
it only on targets with ``fit_clamps`` on whose scales are not dyadic (any step is available there).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from fxq import meta
from fxq.context import CompileContext
from fxq.formats import int_range
from fxq.walk import weighted_consumers

_SCALE_COMMUTING = frozenset({"flatten", "reshape", "maxpool", "pad", "avgpool"})


def clamp_scale(hi: float, bits: int, signed: bool) -> float:
    """s >= 1 with s * hi = top code * 2**-f for the finest f that keeps ``hi`` representable."""
    top = int_range(bits, signed).hi
    f = math.floor(math.log2(top / hi))
    return top * 2.0**-f / hi


def fit_clamp_range(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    t = ctx.target
    modules = dict(gm.named_modules())
    layers = [n for n in gm.graph.nodes if n.meta.get(meta.KIND) in meta.WEIGHTED]
    fitted: list[str] = []
    scales: set[float] = set()
    for node in list(gm.graph.nodes):
        if node.meta.get(meta.KIND) != "clamp":
            continue
        x, lo, hi = node.args[:3]
        producer, consumers = x, weighted_consumers(node, _SCALE_COMMUTING)
        if (lo != 0 or not math.isfinite(hi) or hi <= 0 or consumers is None or len(producer.users) != 1
                or producer.meta.get(meta.KIND) not in meta.WEIGHTED):
            continue
        bits = t.edge_a_bits if t.edge_a_bits is not None and layers[-1] in consumers else t.a_bits
        s = clamp_scale(hi, bits, signed=not t.unsigned_after_relu)
        if s == 1.0:
            continue
        with torch.no_grad():
            p = modules[producer.target]
            p.weight.mul_(s)
            if p.bias is not None:
                p.bias.mul_(s)
            for c in consumers:
                modules[c.target].weight.div_(s)
        stats = producer.meta.get(meta.BN_STATS)
        if stats is not None:
            producer.meta[meta.BN_STATS] = dataclasses.replace(stats, gamma=stats.gamma * s, beta=stats.beta * s)
        node.args = (x, 0.0, hi * s, *node.args[3:])
        fitted.append(node.name)
        scales.add(round(s, 6))
    if fitted:
        ctx.note(f"fit_clamp_range: {len(fitted)} clamp(s) now end on their top code (factor "
                 f"{', '.join(f'{s:g}' for s in sorted(scales))} moved into the layers around them): "
                 f"{', '.join(fitted[:6])}{' ...' if len(fitted) > 6 else ''}")
    return gm
