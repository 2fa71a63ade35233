"""choose_formats: a format for every qpoint and every weight, as the target's fields say.

Activations: per tensor, unsigned where the value is non-negative by construction (after ReLU/ReLU6)
and the target allows it. The power-of-two step comes either from an error search (``scale_kind``
"pow2": the no-clip fractional length or one of ``exp_search_radius`` finer ones, least squared error
on the observed sample) or from the tensor's spread (``scale_kind`` "fixed_point", F8Net:
f = floor(log2(c / std)), std before a fused ReLU, c from the target). On dyadic targets (int8)
activations are affine unsigned codes: zero point and a dyadic step from the observed range, shrunk by
the factor with the least squared error; weights take max|w| / qmax per channel (below 8 bits the
least-squared-error step, as clipping then pays), rounded to a dyadic step.
Weights: the same rule per output channel or per tensor; with ``w_granularity`` "cluster" the weights
become codes times one fixed-point scale per cluster of input channels (fxq.clusters), and the format
records the scales' fractional length per filter.

Reads: ``meta[OBSERVER]``, ``meta[ROLE]``, ``meta[KIND]``, the layers' weights, ``ctx.target``.
Post-softmax and post-GELU activations take twin-uniform codes where ``twin_uniform`` lists them.
Activations at the network's edges (input, the last layer's input, the output) take ``edge_a_bits``
when the target sets it; the output codes take ``out_bits`` when that is set.
Writes: ``meta[ACT_FMT]`` (ActFormat) on qpoints and inputs, ``meta[W_FMT]`` (WeightFormat or
ClusterFormat) on conv/linear, with the weight step widened where a bias code would not fit the
accumulator (channels whose weights vanish after BN folding). Raises CalibrationError naming a qpoint that calibration never reached.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.fx as fx

from fxq import meta
from fxq.clusters import choose_cluster_frac
from fxq.context import CompileContext
from fxq.errors import CalibrationError, describe_node
from fxq.formats import (Twin, dyadic, fake_twin, fit_bias_frac, int_range, mse_step, search_affine, search_frac,
                         std_frac, twin_gelu_frac, twin_max_shift)
from fxq.qtypes import ActFormat, ClusterFormat, WeightFormat
from fxq.targets import Target
from fxq.walk import format_source, is_nonnegative, weighted_layers


def activation_format(node: fx.Node, target) -> ActFormat:
    """The format's shape (bits, sign, clamp) before its fractional length is chosen."""
    kind = node.meta[meta.KIND]
    clamp = (-float("inf"), float("inf"))
    if kind == "relu":
        clamp = (0.0, float("inf"))
    elif kind == "clamp":
        clamp = (float(node.args[1]), float(node.args[2]))
    signed = not (target.a_affine or target.unsigned_after_relu and is_nonnegative(node))
    return ActFormat(frac=0, bits=target.a_bits, signed=signed, clamp=clamp)


def _activation_scale(obs, fmt: ActFormat, t: Target) -> ActFormat:
    if t.a_affine:
        sample = np.clip(obs.sample(), *fmt.clamp)
        mant, frac, zp = search_affine(sample, fmt.bits, t.scale_mant_bits, t.act_range_search, t.rounding)
        return replace(fmt, frac=frac, mant=mant, zp=zp)
    return fmt.with_frac(_activation_frac(obs, fmt, t))


def _activation_frac(obs, fmt: ActFormat, t: Target) -> int:
    if t.scale_kind == "fixed_point":
        coeff = t.std_coeff_signed if fmt.signed else t.std_coeff_unsigned
        return int(std_frac(obs.std if fmt.signed else obs.pre_std, coeff, fmt.bits))
    sample = np.clip(obs.sample(), *fmt.clamp)
    # Search over the dtype's codes: the clamp already bounds the sample, and fmt.range at frac 0
    # would be the clamp itself ([0, 6] for ReLU6), not the codes available.
    codes = int_range(fmt.bits, fmt.signed)
    return int(search_frac(sample[None, :], codes, t.exp_search_radius, t.rounding)[0])


def twin_format(obs, kind: str, t: Target) -> ActFormat:
    """Post-softmax (R2 = [0, 1) at 2**-(bits-1)) or post-GELU (R1 holds GELU's minimum) twin codes; the
    ratio 2**m of the two steps with the least squared error on the observed sample."""
    signed = kind == "gelu"
    frac = twin_gelu_frac(t.a_bits) if signed else t.a_bits - 1
    base = ActFormat(frac, t.a_bits, signed, twin=Twin(t.a_bits, 0, signed)).with_twin_shift(0)
    sample = torch.from_numpy(np.asarray(obs.sample(), np.float64))
    cands = base.neighbours(twin_max_shift(t.a_bits))
    errs = [float(((fake_twin(sample, f.frac, f.twin) - sample) ** 2).sum()) for f in cands]
    return cands[int(np.argmin(errs))]


def weight_format(w: np.ndarray, t: Target):
    if t.w_granularity == "cluster":
        fmt = ClusterFormat((0,) * w.shape[0], t.w_bits, t.cluster_size, t.cluster_scale_bits,
                            t.ternary_threshold, t.rounding.value)
        return replace(fmt, frac=tuple(int(f) for f in choose_cluster_frac(w, fmt)))
    rows = w.reshape(w.shape[0], -1) if t.w_granularity == "channel" else w.reshape(1, -1)
    rng = WeightFormat((0,), t.w_bits, full_range=t.w_full_range).range
    if t.scale_kind == "dyadic":
        # max|w| / qmax as torch.ao and ORT do at 8 bits; below, clipping pays: the squared-error step
        step = np.abs(rows).max(axis=1) / rng.hi if t.w_bits >= 8 else mse_step(rows, rng, t.rounding)
        mant, frac = dyadic(step, t.scale_mant_bits)
        mant, frac = (np.broadcast_to(v, (w.shape[0],)) for v in (mant, frac))
        return WeightFormat(tuple(int(f) for f in frac), t.w_bits, tuple(int(m) for m in mant), t.w_full_range)
    if t.scale_kind == "fixed_point":
        frac = std_frac(rows.std(axis=1), t.std_coeff_signed, t.w_bits)
    else:
        frac = search_frac(rows, rng, t.exp_search_radius, t.rounding)
    frac = np.broadcast_to(frac, (w.shape[0],))
    return WeightFormat(tuple(int(f) for f in frac), t.w_bits, full_range=t.w_full_range)


def output_activations(gm: fx.GraphModule) -> set[str]:
    """The qpoints whose codes the network returns: what ``out_bits`` widens."""
    return {format_source(a).name for n in gm.graph.nodes if n.op == "output" for a in n.all_input_nodes}


def edge_activations(gm: fx.GraphModule) -> set[str]:
    """The model input, the codes the last conv/linear reads and the output: what ``edge_a_bits`` widens."""
    edges = {n.name for n in gm.graph.nodes if n.meta.get(meta.KIND) == "input"} | output_activations(gm)
    layers = [n for n, _ in weighted_layers(gm)]
    if layers:
        edges.add(format_source(layers[-1].args[0]).name)
    return edges


def choose_formats(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    t = ctx.target
    edges = edge_activations(gm) if t.edge_a_bits is not None else set()
    outputs = output_activations(gm) if t.out_bits is not None else set()
    for node in gm.graph.nodes:
        obs = node.meta.get(meta.OBSERVER)
        if obs is None:
            continue
        if not obs.seen:
            raise CalibrationError(f"{describe_node(node)} saw no values during calibration")
        if node.meta[meta.KIND] in t.twin_uniform:
            node.meta[meta.ACT_FMT] = twin_format(obs, node.meta[meta.KIND], t)
            if node.name in outputs | edges:
                ctx.note(f"{node.name}: twin-uniform {t.a_bits}-bit codes at a network edge; "
                         f"edge_a_bits/out_bits do not widen twin codes")
            continue
        fmt = activation_format(node, t)
        if node.name in edges:
            fmt = replace(fmt, bits=t.edge_a_bits)
        if node.name in outputs:
            fmt = replace(fmt, bits=t.out_bits)
        node.meta[meta.ACT_FMT] = _activation_scale(obs, fmt, t)
    layers = list(weighted_layers(gm))
    edge_target = None if t.edge_w_bits is None else replace(t, w_bits=t.edge_w_bits, w_granularity="channel",
                                                           w_full_range=False)
    for i, (node, module) in enumerate(layers):
        edge = edge_target is not None and i in (0, len(layers) - 1)
        fmt = weight_format(module.weight.detach().double().numpy(), edge_target if edge else t)
        node.meta[meta.W_FMT] = _fit_bias(node, module, fmt, t, ctx)
    return gm


def _fit_bias(node: fx.Node, module, fmt, t: Target, ctx: CompileContext):
    """Widen the weight step of channels whose bias code would not fit the accumulator (share_scales
    only ever widens the input step, which shrinks bias codes further)."""
    if module.bias is None:
        return fmt
    in_fmt = format_source(node.args[0]).meta[meta.ACT_FMT]
    frac = fmt.frac_array
    capped = fit_bias_frac(frac, module.bias.detach().double().numpy(), in_fmt.step, fmt.mant_array, t.acc_bits)
    if np.array_equal(capped, frac):
        return fmt
    ctx.note(f"{node.name}: {int((frac > capped).sum())} output channel(s) with near-zero weights and a large bias got "
             f"a coarser weight step, so the bias fits the {t.acc_bits}-bit accumulator")
    return replace(fmt, frac=tuple(int(f) for f in capped))
