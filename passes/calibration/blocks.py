"""Reconstruction units: where a fake-quant graph can be cut so that a block sees one input.

A *cut* is a FakeQuant after which exactly one value (its own) is still needed: every later node
depends on the network only through it. Consecutive cuts delimit segments; a residual block is one
segment because its input stays live until the add. Segments without a conv/linear join the next one,
and runs of single-layer segments (plain chains) merge up to ``chain_layers`` layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from fxq import meta
from fxq.fakequant import _QWeighted


@dataclass
class Block:
    input: fx.Node                       # the cut whose value enters the block
    nodes: list = field(default_factory=list)    # in graph order; the last is the block's output
    layers: list = field(default_factory=list)   # module names of its conv/linear layers
    chain: bool = False                          # a run of single-layer segments

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]

    @property
    def name(self) -> str:
        return f"{self.nodes[0].name}..{self.output.name}"


def cut_points(gm: fx.GraphModule) -> list[fx.Node]:
    """FakeQuant nodes after which exactly one value (their own) is still needed."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    cuts, live = [], set()
    for i, n in enumerate(nodes):
        live = {m for m in live if last_use[m] > i}
        if last_use[n] > i:
            live.add(n)
        if n.meta.get(meta.KIND) == "fake_quant" and live == {n}:
            cuts.append(n)
    return cuts


def split_blocks(gm: fx.GraphModule, chain_layers: int = 3) -> list[Block]:
    """The reconstruction units of ``gm``, in network order (the rule is the module docstring's)."""
    modules = dict(gm.named_modules())
    cuts = cut_points(gm)
    if not cuts:
        return []
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    segments = []
    for a, b in zip(cuts, cuts[1:]):
        seg = Block(a, nodes[index[a] + 1: index[b] + 1])
        seg.layers = [n.target for n in seg.nodes if n.op == "call_module" and isinstance(modules[n.target], _QWeighted)]
        segments.append(seg)
    merged: list[Block] = []
    pending: Block | None = None
    for seg in segments:                         # layerless segments join the next one
        if pending is not None:
            seg = Block(pending.input, pending.nodes + seg.nodes, pending.layers + seg.layers)
            pending = None
        if not seg.layers:
            pending = seg
            continue
        merged.append(seg)
    if pending is not None and merged:
        last = merged[-1]
        merged[-1] = Block(last.input, last.nodes + pending.nodes, last.layers)
    blocks: list[Block] = []
    for seg in merged:                           # runs of single layers become chains
        prev = blocks[-1] if blocks else None
        if prev is not None and len(seg.layers) == 1 and prev.chain and len(prev.layers) < chain_layers:
            blocks[-1] = Block(prev.input, prev.nodes + seg.nodes, prev.layers + seg.layers, chain=True)
        else:
            seg.chain = len(seg.layers) == 1
            blocks.append(seg)
    return blocks


def block_graph(block: Block) -> fx.Graph:
    """A graph that runs ``block`` alone: its input is a placeholder, its output the block's last node."""
    g = fx.Graph()
    env = {block.input: g.placeholder("x")}
    for n in block.nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[block.output])
    return g


