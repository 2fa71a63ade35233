"""share_scales: inputs of an add or a concat take their master's format (``meta[SHARED_WITH]``)."""
from __future__ import annotations

from conftest import pass_ctx as ctx, run_until, tiny
from fxq import meta
from fxq.passes import choose_formats, share_scales


def test_share_scales_master_is_widest_and_siblings_follow():
    before, _ = run_until(tiny("residual"), choose_formats)
    fracs_before = {n.name: n.meta[meta.ACT_FMT].frac for n in before.graph.nodes if meta.ACT_FMT in n.meta}
    gm, _ = run_until(tiny("residual"), share_scales)
    groups = {}
    for n in gm.graph.nodes:
        if meta.SHARED_WITH in n.meta:
            groups.setdefault(n.meta[meta.SHARED_WITH], []).append(n)
    assert groups, "the residual model has adds, so some formats are shared"
    for master, members in groups.items():
        assert len({m.meta[meta.ACT_FMT].frac for m in members}) == 1
        assert members[0].meta[meta.ACT_FMT].frac == min(fracs_before[m.name] for m in members)
        assert fracs_before[master] == members[0].meta[meta.ACT_FMT].frac


def test_share_scales_off_when_target_does_not_require_it():
    gm, _ = run_until(tiny("residual"), share_scales, ctx(share_residual_scales=False))
    assert not any(meta.SHARED_WITH in n.meta for n in gm.graph.nodes)
