"""fold_bn: fold each BatchNorm into the conv or linear before it, keeping the BN's statistics.

Reads: ``meta[KIND]`` ("bn" nodes and their producer). Writes: ``meta[BN_STATS]`` (a BNStats) on the
conv/linear; replaces its module with a folded copy that has a bias. Removes the BN nodes.
Requires: canonicalize. The statistics stay because data-free formats and RAPQ's BN-based loss read them.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from fxq import meta
from fxq.context import CompileContext
from fxq.errors import UnsupportedOp, describe_node
from fxq.qtypes import BNStats


def _fold(layer, bn) -> tuple[torch.nn.Module, BNStats]:
    with torch.no_grad():
        mean, var = bn.running_mean.double(), bn.running_var.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        folded = copy.deepcopy(layer)
        w = layer.weight.double()
        folded.weight.copy_((w * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(layer.weight.dtype))
        b = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
        new_bias = ((b - mean) * scale + beta).to(layer.weight.dtype)
        folded.bias = torch.nn.Parameter(new_bias)
    stats = BNStats(mean.numpy(), var.numpy(), gamma.numpy(), beta.numpy(), float(bn.eps))
    return folded, stats


def fold_bn(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.meta.get(meta.KIND) != "bn":
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.meta.get(meta.KIND) in meta.WEIGHTED and len(prev.users) == 1):
            raise UnsupportedOp(f"{describe_node(node)}: a BatchNorm is folded into the conv or linear right "
                                f"before it, and this one follows {describe_node(prev) if isinstance(prev, fx.Node) else prev} "
                                f"(or that layer has other users)")
        folded, stats = _fold(modules[prev.target], modules[node.target])
        _set_module(gm, prev.target, folded)
        prev.meta[meta.BN_STATS] = stats
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    return gm


def _set_module(gm: fx.GraphModule, qualname: str, module: torch.nn.Module) -> None:
    parent_name, _, attr = qualname.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, module)
