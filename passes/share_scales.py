"""share_scales: inputs of a residual add or a concat carry one fractional length.

Groups are built with union-find over the qpoints that feed each add and concat (through pass-through
ops). In each group the master is the member with the widest range (the largest step: the smallest
fractional length); its siblings take the master's step (and, on affine targets, its zero point), so no
member clips more than it did alone and the add aligns without shifts. A concat's members also take one signedness (signed if any is), because
the concatenated codes share one dtype.

Reads: ``meta[ACT_FMT]``, ``meta[KIND]``, ``meta[ROLE]``, ``ctx.target.share_residual_scales``.
Writes: ``meta[ACT_FMT]`` of siblings, ``meta[SHARED_WITH]`` (the master's name) on every group member.
"""
from __future__ import annotations

from dataclasses import replace

import torch.fx as fx

from fxq import meta
from fxq.context import CompileContext
from fxq.walk import data_inputs, format_source


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def share_scales(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    uf = _UnionFind()
    nodes = {n.name: n for n in gm.graph.nodes}
    concat_groups: set[str] = set()
    for node in gm.graph.nodes:
        kind = node.meta[meta.KIND]
        if kind == "cat" or (kind == "add" and ctx.target.share_residual_scales):
            srcs = [format_source(x).name for x in data_inputs(node)]
            for s in srcs[1:]:
                uf.union(srcs[0], s)
            if kind == "cat":
                concat_groups.add(srcs[0])
    groups: dict[str, list[str]] = {}
    for name in uf.parent:
        groups.setdefault(uf.find(name), []).append(name)
    cat_roots = {uf.find(n) for n in concat_groups}
    for root, members in groups.items():
        if len(members) < 2:
            continue
        members.sort(key=lambda n: list(nodes).index(n))
        fmts = {m: nodes[m].meta[meta.ACT_FMT] for m in members}
        master = max(members, key=lambda m: fmts[m].step)
        signed = any(f.signed for f in fmts.values()) if root in cat_roots else None
        for m in members:
            fmt = fmts[m].with_scale_of(fmts[master])
            if signed is not None:
                fmt = replace(fmt, signed=signed)
            nodes[m].meta[meta.ACT_FMT] = fmt
            nodes[m].meta[meta.SHARED_WITH] = master
    return gm
