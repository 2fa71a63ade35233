"""Changing formats after insert_fake_quant, for the calibration passes that search or learn them.

A qpoint's format is read in several places: its FakeQuant, the node metadata the lowering reads, the
accumulator step of every conv/linear that consumes its codes, the on-grid bounds of a standalone clamp,
and every other member of its share_scales group. These functions keep all of them in step, so a pass
that changes a step cannot leave the fake-quant model and the integer graph disagreeing.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch.fx as fx

from fxq import meta
from fxq.errors import UnsupportedOp, describe_node
from fxq.fakequant import FakeQuant, _QWeighted, on_grid_clamp
from fxq.formats import fit_bias_frac, step_of
from fxq.qtypes import ActFormat, WeightFormat
from fxq.walk import format_source


def fake_quant_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.meta.get(meta.KIND) == "fake_quant"]


def share_group(gm: fx.GraphModule, fq: fx.Node) -> list[fx.Node]:
    """The FakeQuant nodes that must carry ``fq``'s step (itself included), in graph order."""
    master = fq.args[0].meta.get(meta.SHARED_WITH)
    if master is None:
        return [fq]
    return [n for n in fake_quant_nodes(gm) if n.args[0].meta.get(meta.SHARED_WITH) == master]


def consumers(gm: fx.GraphModule, fq: fx.Node) -> list[fx.Node]:
    """Nodes whose input codes carry ``fq``'s format: conv/linear layers and standalone clamps."""
    return [n for n in gm.graph.nodes
            if n.meta.get(meta.KIND) in meta.WEIGHTED | {"clamp"} and n.meta.get(meta.ROLE) in ("acc", "pass", "qpoint")
            and isinstance(n.args[0], fx.Node) and format_source(n.args[0]) is fq]


def set_activation_frac(gm: fx.GraphModule, fq: fx.Node, frac: int, acc_bits: int) -> list[fx.Node]:
    """Give ``fq`` and its share group the fractional length ``frac``; returns the FakeQuant nodes changed.

    Consumers' accumulator steps follow; a consumer whose bias code would then overflow gets the
    coarser weight step choose_formats would have given it."""
    return set_activation_format(gm, fq, lambda f: f.with_frac(frac), acc_bits)


def set_activation_format(gm: fx.GraphModule, fq: fx.Node, change, acc_bits: int) -> list[fx.Node]:
    """Give ``fq`` and its share group the format ``change(their format)`` (set_activation_frac's rules)."""
    modules = dict(gm.named_modules())
    group = share_group(gm, fq)
    for node in group:
        module: FakeQuant = modules[node.target]
        if module.requant is not None:
            raise UnsupportedOp(f"{describe_node(node)}: its step is fixed by a dyadic requant; "
                                f"only power-of-two targets can change activation steps after insert_fake_quant")
        fmt = change(module.fmt)
        module.fmt = fmt
        node.meta[meta.ACT_FMT] = fmt
        node.args[0].meta[meta.ACT_FMT] = fmt
        for user in consumers(gm, node):
            if user.meta[meta.KIND] == "clamp":
                user.args = (user.args[0], *on_grid_clamp(user.args[1], user.args[2], fmt))
                continue
            layer: _QWeighted = modules[user.target]
            layer.set_input_format(fmt)
            fit_bias(layer, acc_bits)
    return group


def fit_bias(layer: _QWeighted, acc_bits: int) -> None:
    """Coarsen the weight step of channels whose bias code would not fit (see choose_formats._fit_bias)."""
    if layer.clustered:
        return
    frac = layer.w_fmt.frac_array
    capped = fit_bias_frac(frac, layer.bias_q.detach().double().numpy(), float(step_of(layer.in_frac, layer.in_mant)),
                           layer.w_fmt.mant_array, acc_bits)
    if not np.array_equal(capped, frac):
        layer.set_weight_format(replace(layer.w_fmt, frac=tuple(int(f) for f in capped)))


def set_weight_frac(layer: _QWeighted, frac: np.ndarray, acc_bits: int) -> WeightFormat:
    """Per-channel weight fractional lengths for ``layer`` (the bias cap still applies)."""
    if layer.clustered:
        raise UnsupportedOp("cluster weight formats are chosen by fxq.clusters, not by a per-channel search")
    layer.set_weight_format(replace(layer.w_fmt, frac=tuple(int(f) for f in np.asarray(frac).reshape(-1))))
    fit_bias(layer, acc_bits)
    return layer.w_fmt


def sync_weight_meta(gm: fx.GraphModule) -> None:
    """Copy every layer's current weight format back to its node (report() and the lowering read it)."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.meta.get(meta.KIND) in meta.WEIGHTED:
            node.meta[meta.W_FMT] = modules[node.target].w_fmt


def act_format(gm: fx.GraphModule, fq: fx.Node) -> ActFormat:
    return gm.get_submodule(fq.target).fmt
