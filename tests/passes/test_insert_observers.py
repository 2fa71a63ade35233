"""insert_observers: ``meta[ROLE]`` on every node, an observer on every qpoint, fused activations."""
from __future__ import annotations

from conftest import run_until, tiny
from fxq import meta
from fxq.passes import insert_observers


def test_insert_observers_roles():
    gm, _ = run_until(tiny("residual"), insert_observers)
    roles = {n.name: n.meta[meta.ROLE] for n in gm.graph.nodes}
    fused = {n.name: n.meta[meta.FUSED_ACT] for n in gm.graph.nodes if meta.FUSED_ACT in n.meta}
    assert roles["x"] == "input" and roles["output"] == "output"
    assert len(fused) == 5, fused                   # stem, a, c and the two adds each feed their ReLU
    for producer, act in fused.items():
        assert roles[producer] == "acc" and roles[act] == "qpoint"
    assert [n.meta[meta.KIND] for n in gm.graph.nodes].count("flatten") == 1
    assert all(roles[n.name] == "pass" for n in gm.graph.nodes if n.meta[meta.KIND] == "flatten")
    assert all((meta.OBSERVER in n.meta) == (roles[n.name] in ("qpoint", "input")) for n in gm.graph.nodes)
