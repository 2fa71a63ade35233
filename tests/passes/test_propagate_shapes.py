"""propagate_shapes: ``meta[SHAPE]`` on every node, the shapes of ``ctx.example_input`` (batch dim first)."""
from __future__ import annotations

from conftest import PASS_X as X, pass_ctx as ctx, run_until, tiny
from fxq import meta
from fxq.context import CompileContext
from fxq.passes import propagate_shapes
from fxq.targets import get_target


def test_every_node_gets_the_shape_of_the_example():
    gm, _ = run_until(tiny("pools_and_pads"), propagate_shapes, ctx())
    nodes = list(gm.graph.nodes)
    assert all(meta.SHAPE in n.meta for n in nodes), [n.name for n in nodes if meta.SHAPE not in n.meta]
    by_kind = {}
    for n in nodes:
        by_kind.setdefault(n.meta[meta.KIND], []).append(n.meta[meta.SHAPE])
    assert by_kind["input"] == [(1, 1, 28, 28)]
    assert by_kind["pad"] == [(1, 1, 29, 31)]                                # ZeroPad2d((1, 2, 0, 1))
    assert by_kind["conv"] == [(1, 4, 14, 15)] * 2                          # stride 2, dilation 2, padding 1
    assert by_kind["avgpool"] == [(1, 4, 14, 15), (1, 4, 7, 7)]
    assert by_kind["flatten"] == [(1, 196)] and by_kind["output"] == [(1, 10)]
    assert all(type(n.meta[meta.SHAPE]) is tuple for n in nodes)


def test_the_batch_dim_follows_the_example_input():
    c = CompileContext(get_target("shift-int"), X[:3], None, progress=False)
    gm, _ = run_until(tiny("concat"), propagate_shapes, c)
    shapes = [n.meta[meta.SHAPE] for n in gm.graph.nodes]
    assert shapes and {s[0] for s in shapes} == {3}
    assert shapes[0] == (3, 1, 28, 28)
