"""reconstruct: each piece on small cases (blocks, relaxation, exponents, Lp exponent, loss), then the
integer graph it leaves (exact, power-of-two, deterministic)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fxq
from conftest import assert_three_executors, cbr, tiny
from fxq.passes.calibration.blocks import cut_points, split_blocks
from fxq.context import CompileContext, ReconstructOptions
from fxq.errors import CalibrationError, UnsupportedOp
from fxq.fakequant import _QWeighted, set_quantization
from fxq.formats import mse_step
from fxq.passes import PIPELINE, insert_fake_quant, reconstruct
from fxq.pipeline import run_passes
from fxq.passes.calibration.relaxed import (bn_lp_exponent, inverse_rectified_sigmoid, rectified_sigmoid, rounding_regulariser)
from fxq.targets import get_target
from fxq.trace import trace

X = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(5))
QUICK = {"iters": 60, "samples": 64, "batch": 16}


def fake_model(model, target="shift-int", recon=None, **overrides):
    """The fake-quant GraphModule after insert_fake_quant (and reconstruct when ``recon`` is given)."""
    ctx = CompileContext(get_target(target, **overrides), X[:1], [X], progress=False, bias_correction=None,
                         reconstruct=recon)
    last = reconstruct if recon is not None else insert_fake_quant
    return run_passes(trace(copy.deepcopy(model)), ctx, PIPELINE[: PIPELINE.index(last) + 1]), ctx


class Chain(nn.Module):
    def __init__(self, n=5):
        super().__init__()
        self.body = nn.Sequential(*[cbr(1 if i == 0 else 4, 4) for i in range(n)])
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


# -- blocks ----------------------------------------------------------------------------------------
def test_a_residual_block_is_one_unit():
    gm, _ = fake_model(tiny("residual"))
    blocks = split_blocks(gm)
    layers = [sorted(b.layers) for b in blocks]
    assert layers == [["stem.0"], ["a.0", "b.0"], ["c.0", "down.0"], ["fc"]]
    for b in blocks[1:3]:
        assert any(n.meta.get("fxq.kind") == "add" for n in b.nodes)
    # blocks tile the graph: each starts where the previous ended
    for prev, nxt in zip(blocks, blocks[1:]):
        assert nxt.input is prev.output


def test_plain_chains_merge_up_to_chain_layers():
    gm, _ = fake_model(Chain(5).eval())
    assert [len(b.layers) for b in split_blocks(gm, chain_layers=3)] == [3, 3]
    assert [len(b.layers) for b in split_blocks(gm, chain_layers=1)] == [1] * 6


def test_cuts_are_where_one_value_is_live():
    gm, _ = fake_model(tiny("residual"))
    names = {n.name for n in cut_points(gm)}
    skip = [n for n in gm.graph.nodes if n.meta.get("fxq.kind") == "add"][0].args[1]
    assert skip.name in names                         # the block input ...
    inside = [n for n in gm.graph.nodes if n.meta.get("fxq.kind") == "fake_quant" and n.name not in names]
    assert inside                                     # ... but not the FakeQuants while it is live


# -- the relaxation --------------------------------------------------------------------------------
def test_rectified_sigmoid_reaches_both_ends_and_inverts():
    v = torch.linspace(-12, 12, 101)
    h = rectified_sigmoid(v)
    assert h.min() == 0.0 and h.max() == 1.0
    inner = torch.linspace(0.05, 0.95, 19)
    assert torch.allclose(rectified_sigmoid(inverse_rectified_sigmoid(inner)), inner, atol=1e-5)
    assert float(rounding_regulariser(torch.tensor([0.0, 1.0]), 2.0)) == 0.0
    assert float(rounding_regulariser(torch.tensor([0.5]), 20.0)) == 1.0


def _grid_offsets(gm, layers=None):
    """Per layer (of ``layers``, default all), weight_q / step - floor(float weight / step): AdaRound keeps
    each code at floor or floor+1."""
    out = {}
    for name, m in gm.named_modules():
        if isinstance(m, _QWeighted) and (layers is None or name in layers):
            step = torch.exp2(-m._per_channel(m.w_frac)).float()
            codes = m.weight_q / step
            assert torch.equal(codes, torch.round(codes)), f"{name}: weights off the grid"
            base = torch.clamp(torch.floor(m.weight.detach() / step), m.w_fmt.range.lo, m.w_fmt.range.hi)
            out[name] = (codes - base).unique().tolist()
    return out


def test_rounding_hardens_to_floor_or_floor_plus_one():
    gm, ctx = fake_model(tiny("residual"), recon=ReconstructOptions(mode="adaround", **QUICK), w_bits=4, a_bits=4)
    kept = {layer for h in ctx.reconstruct_history if h["kept"] for layer in h["layers"]}
    assert kept                                      # (a block that ends worse is put back as it came)
    assert set(_grid_offsets(gm, kept)) == kept
    for name, offsets in _grid_offsets(gm, kept).items():
        assert set(offsets) <= {0.0, 1.0}, (name, offsets)
    # the rounding really was learned: some codes are not round-to-nearest
    plain, _ = fake_model(tiny("residual"), w_bits=4, a_bits=4)
    differ = sum(int((a.qweight() != b.qweight()).sum()) for (_, a), (_, b) in
                 zip(gm.named_modules(), plain.named_modules()) if isinstance(a, _QWeighted))
    assert differ > 0


def test_exponents_move_only_between_the_two_neighbours():
    model = tiny("residual")
    qm = fxq.compile(model, X, "shift-int", progress=False, w_bits=4, a_bits=4, bias_correction=None,
                     reconstruct=QUICK)
    start, _ = fake_model(model, w_bits=4, a_bits=4)
    start_layers = dict(start.named_modules())
    moved_up = moved_down = 0
    for name, m in qm.fake.named_modules():
        if not isinstance(m, _QWeighted):
            continue
        w = start_layers[name].weight.detach().double().numpy()
        d0 = mse_step(w.reshape(w.shape[0], -1), m.w_fmt.range)
        fine = -np.floor(np.log2(d0)).astype(np.int64)          # 2**floor(log2 d0): the finer neighbour
        frac = m.w_fmt.frac_array
        assert np.all((frac == fine) | (frac == fine - 1)), name
        moved_up += int((frac == fine).sum())
        moved_down += int((frac == fine - 1).sum())
    assert moved_up and moved_down                 # both neighbours get chosen somewhere


def test_activation_steps_are_learned_then_snapped_to_powers_of_two():
    qm = fxq.compile(tiny("inverted_residual"), X, "shift-int", progress=False, w_bits=4, a_bits=4,
                     bias_correction=None, reconstruct=QUICK)
    for node in qm.ir.nodes:
        t = node.out
        assert t.mant == 1 or t.mant == (1,) or np.all(np.asarray(t.mant) == 1), node.name
        assert np.all(np.asarray(t.frac) == np.round(np.asarray(t.frac))) if t.frac is not None else True


# -- the loss --------------------------------------------------------------------------------------
def test_lp_exponent_follows_the_bn_statistics():
    assert bn_lp_exponent(np.array([1.0]), 2.0) == 2.0                 # sum(gamma) = 1: sigmoid(0)
    ps = [bn_lp_exponent(np.full(8, g), 2.0) for g in (-3.0, 0.05, 1.0, 3.0)]
    assert ps == sorted(ps) and 1.0 < ps[0] < 1.5 and 2.5 < ps[-1] < 3.0     # grows with the BN's gammas
    assert bn_lp_exponent(np.full(8, 3.0), 0.1) == 1.1                # the RAPQ code's constant
    gm, ctx = fake_model(tiny("residual"), recon=ReconstructOptions(**QUICK), w_bits=4, a_bits=4)
    ps = {tuple(sorted(h["layers"])): h["p"] for h in ctx.reconstruct_history}
    folded = {n.target: n.meta.get("fxq.bn_stats") for n in gm.graph.nodes if n.op == "call_module"}
    assert ps[("fc",)] == 2.0                                           # no BN after the classifier
    assert ps[("a.0", "b.0")] == bn_lp_exponent(folded["b.0"].gamma, 2.0)
    _, fixed = fake_model(tiny("residual"), recon=ReconstructOptions(lp=3.0, **QUICK), w_bits=4, a_bits=4)
    assert {h["p"] for h in fixed.reconstruct_history} == {3.0}


@pytest.mark.parametrize("mode", ["rapq", "adaround"])
def test_block_loss_decreases(mode):
    _, ctx = fake_model(tiny("residual"), recon=ReconstructOptions(mode=mode, iters=150, samples=64, batch=16),
                        w_bits=4, a_bits=4)
    hist = ctx.reconstruct_history
    assert sum(h["loss_after"] for h in hist) < sum(h["loss_before"] for h in hist)
    assert sum(h["loss_after"] < h["loss_before"] for h in hist) >= len(hist) - 1


def test_bn_matching_term_runs_and_keeps_the_graph_exact():
    qm = fxq.compile(tiny("residual"), X, "shift-int", progress=False, w_bits=4, a_bits=4,
                     reconstruct={"bn_match": 0.1, **QUICK})
    assert_three_executors(qm, X[:16])


# -- the integer graph it leaves -------------------------------------------------------------------
@pytest.mark.parametrize("name,target,overrides,mode", [
    ("residual", "shift-int", {"w_bits": 4, "a_bits": 4}, "rapq"),
    ("inverted_residual", "shift-int", {"w_bits": 2, "a_bits": 4, "edge_w_bits": 8}, "rapq"),
    ("concat", "fixed-point8", {}, "rapq"),
    ("pools_and_pads", "shift-int", {"w_bits": 4}, "rapq"),
    ("residual", "int8", {"w_bits": 4}, "adaround"),
])
def test_three_executors_agree_after_reconstruction(name, target, overrides, mode):
    qm = fxq.compile(tiny(name), X, target, progress=False, reconstruct={"mode": mode, **QUICK}, **overrides)
    assert any("reconstruct" in n for n in qm.notes)
    assert_three_executors(qm, X[:24])


def test_float_model_is_intact():
    model = tiny("residual")
    qm = fxq.compile(model, X, "shift-int", progress=False, w_bits=4, a_bits=4, reconstruct=QUICK)
    set_quantization(qm.fake, False)
    with torch.no_grad():
        assert torch.allclose(qm.fake(X[:8]), model(X[:8]), atol=1e-4)


def test_deterministic_under_a_seed():
    runs = [fxq.compile(tiny("residual"), X, "shift-int", progress=False, w_bits=4, a_bits=4, seed=s,
                        reconstruct={**QUICK, "samples": 32}) for s in (3, 3, 4)]   # the seed picks the samples
    consts = [[c.tobytes() for n in qm.ir.nodes for c in n.consts.values()] for qm in runs]
    assert consts[0] == consts[1] and consts[0] != consts[2]


def test_time_budget_cuts_iterations():
    _, ctx = fake_model(tiny("residual"), recon=ReconstructOptions(iters=100000, samples=64, batch=16,
                                                                   time_budget=2.0), w_bits=4, a_bits=4)
    assert ctx.reconstruct_history
    assert all(h["iters"] < 100000 for h in ctx.reconstruct_history)


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,needle", [
    ({"iters": 0}, "iters=0"), ({"qdrop": 1.0}, "qdrop=1.0"), ({"mode": "brecq"}, "mode='brecq'"),
    ({"iterations": 10}, "unknown reconstruct option"), (3, "reconstruct=3"), ({"beta": (20,)}, "beta="),
])
def test_bad_options_are_named(value, needle):
    with pytest.raises(CalibrationError, match=needle):
        fxq.compile(tiny("residual"), X, "shift-int", progress=False, reconstruct=value)


def test_rapq_on_a_dyadic_target_is_refused():
    with pytest.raises(CalibrationError, match="adaround"):
        fxq.compile(tiny("residual"), X, "int8", progress=False, reconstruct=QUICK)


def test_cluster_weights_are_refused_by_name():
    with pytest.raises(UnsupportedOp, match="cluster"):
        fxq.compile(tiny("residual"), X, "dfp-cluster", progress=False, reconstruct={"mode": "adaround", **QUICK})


def test_needs_data():
    with pytest.raises(CalibrationError, match="needs calibration data"):
        fxq.compile(tiny("residual"), None, "shift-int", input_shape=(1, 1, 28, 28), progress=False, reconstruct=True)


def test_snapshot_and_restore_put_a_block_back():
    """What the pass does with a block whose loss ends higher than it started."""
    from fxq.passes.reconstruct import _Reconstructor
    from fxq.passes.calibration.tuning import set_activation_frac
    gm, ctx = fake_model(tiny("residual"), w_bits=4, a_bits=4)
    block = split_blocks(gm)[1]
    rec = _Reconstructor(gm, ctx, ReconstructOptions(**QUICK))
    with torch.no_grad():
        ref = gm(X[:8])
    saved = rec.snapshot(block)
    layer = gm.get_submodule(block.layers[0])
    layer.weight_q.mul_(3.0)
    fq = next(n for n in block.nodes if n.op == "call_module" and n.target.startswith("fq_")
              and gm.get_submodule(n.target).fmt.frac is not None and n is not block.output)
    set_activation_frac(gm, fq, gm.get_submodule(fq.target).fmt.frac - 2, ctx.target.acc_bits)
    with torch.no_grad():
        assert not torch.equal(gm(X[:8]), ref)
        rec.restore(saved)
        assert torch.equal(gm(X[:8]), ref)


def block_input(gm, block, x):
    """The block's quantized input: its input cut's output when ``gm`` runs on ``x``."""
    seen = {}
    handle = gm.get_submodule(block.input.target).register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    with torch.no_grad():
        gm(x)
    handle.remove()
    return seen["x"]


def _block_io(gm, block, x):
    """The block's quantized input (its input cut's output) and the float block's output on it."""
    from fxq.passes.calibration.blocks import block_graph
    import torch.fx as fx
    xq = block_input(gm, block, x)
    sub = fx.GraphModule(gm, block_graph(block))
    set_quantization(gm, False)
    with torch.no_grad():
        y = sub(xq)
    set_quantization(gm, True)
    return xq, y


def test_activation_step_search_takes_the_neighbour_with_least_block_loss():
    """LSQ alone moves a log2 step by a fraction of a unit, so its snap gives the start back; the search
    after the block is learned moves it to the power of two with the least loss of the real block."""
    import torch.fx as fx
    from fxq.passes.calibration.blocks import block_graph
    from fxq.passes.reconstruct import _lp_loss, _Reconstructor
    from fxq.passes.calibration.tuning import set_activation_frac
    gm, ctx = fake_model(tiny("inverted_residual"), w_bits=4, a_bits=4)
    rec = _Reconstructor(gm, ctx, ReconstructOptions(**QUICK, act_search=1))
    block = next(b for b in split_blocks(gm) if rec._wrappers(b)[1])
    node = next(iter(rec._wrappers(block)[1].values()))[0]
    start = gm.get_submodule(node.target).fmt.frac
    set_activation_frac(gm, node, start + 3, ctx.target.acc_bits)      # 8x too fine a step: most values clip
    xq, yf = _block_io(gm, block, X)
    changed = rec.search_acts(block, [node], xq, yf, 2.0)
    chosen = gm.get_submodule(node.target).fmt.frac
    assert chosen == start + 2 and changed                               # one power of two coarser: radius 1
    sub = fx.GraphModule(gm, block_graph(block))
    losses = {}
    with torch.no_grad():
        for frac in (start + 4, start + 3, start + 2):
            set_activation_frac(gm, node, frac, ctx.target.acc_bits)
            losses[frac] = float(_lp_loss(sub(xq), yf, 2.0))
    assert losses[chosen] == min(losses.values()) and losses[start + 2] < losses[start + 3]


def test_block_returns_the_steps_it_learned_one_per_share_group():
    """What the search after a block gets: each share group it learned once, and then final."""
    from fxq.passes.reconstruct import _Reconstructor
    gm, ctx = fake_model(tiny("inverted_residual"), w_bits=4, a_bits=4)
    rec = _Reconstructor(gm, ctx, ReconstructOptions(**QUICK))
    block = next(b for b in split_blocks(gm) if rec._wrappers(b)[1])
    groups = {key: node for key, (node, _) in rec._wrappers(block)[1].items()}
    xq, yf = _block_io(gm, block, X)
    learned = rec.block(block, xq, xq, yf, 4, "test", None, 2.0, 1.0)
    assert learned == list(groups.values())
    assert not rec._wrappers(block)[1]                                   # snapped: no step of it is learned again


@pytest.mark.parametrize("mode", ["rapq", "adaround"])
def test_relative_loss_is_the_absolute_loss_with_lambda_rescaled(mode):
    """relative_loss divides the block loss by its value before training and averages the regulariser
    over the block's weights: Adam sees the plain loss with λ·before/N, up to its eps and float ties, so
    the codes come out (nearly) the same; with λ not rescaled they do not."""
    import copy as copy_
    from fxq.passes.reconstruct import _Reconstructor, _block_p
    base, ctx = fake_model(tiny("residual"), w_bits=4, a_bits=4)
    block_index, before, lam = 1, 4.0, 0.05
    n_weights = sum(base.get_submodule(t).weight.numel() for t in split_blocks(base)[block_index].layers)
    runs = []
    for opts in (ReconstructOptions(mode=mode, iters=80, relative_loss=True, rounding_weight=lam),
                 ReconstructOptions(mode=mode, iters=80, rounding_weight=lam * before / n_weights),
                 ReconstructOptions(mode=mode, iters=80, rounding_weight=lam)):
        gm = copy_.deepcopy(base)
        block = split_blocks(gm)[block_index]
        rec = _Reconstructor(gm, ctx, opts)
        xq, yf = _block_io(gm, block, X)
        rec.block(block, xq, xq, yf, opts.iters, "test", None, _block_p(block, rec.nodes_by_target, opts), before)
        codes = torch.cat([gm.get_submodule(t).weight_q.flatten() for t in block.layers])
        runs.append((codes, [gm.get_submodule(t).w_fmt for t in block.layers]))
    start = torch.cat([base.get_submodule(t).weight_q.flatten() for t in block.layers])
    relative, rescaled, plain = runs
    assert (relative[0] != start).any()                                  # it learned something
    assert relative[1] == rescaled[1]                                     # the same steps
    same = float((relative[0] == rescaled[0]).float().mean())
    assert same >= 0.99 and same > float((relative[0] == plain[0]).float().mean())


def test_relative_loss_option_is_checked():
    with pytest.raises(CalibrationError, match="relative_loss='yes'"):
        fxq.compile(tiny("residual"), X, "shift-int", progress=False, reconstruct={"relative_loss": "yes"})
    with pytest.raises(CalibrationError, match="learned modes"):
        fxq.compile(tiny("residual"), X, "shift-int", progress=False, reconstruct={"relative_loss": True, "mode": "gptq"})


@pytest.mark.parametrize("mode", ["rapq", "adaround"])
def test_the_training_graph_is_the_block_that_lowers(mode):
    """With the rounding hardened (and written back), a block's training graph without QDrop computes
    what the fake-quant block computes, bit for bit: the bias included, which the integer layer adds on
    the accumulator's grid (coarse at W4A4), not as the float it was."""
    import torch.fx as fx
    from fxq.passes.calibration.blocks import block_graph
    from fxq.passes.reconstruct import _Reconstructor
    from fxq.passes.calibration.relaxed import SoftLayer
    gm, ctx = fake_model(tiny("inverted_residual"), w_bits=4, a_bits=4)
    rec = _Reconstructor(gm, ctx, ReconstructOptions(mode=mode, qdrop=0.0, **QUICK))
    coarse = 0
    for block in split_blocks(gm):
        wrapped, _, _ = rec._wrappers(block)
        train = fx.GraphModule(wrapped, block_graph(block)).eval()
        with torch.no_grad():
            for m in wrapped.values():
                if isinstance(m, SoftLayer):
                    m.harden_exponent()
                    m.V.copy_(torch.where(m.V >= 0, 100.0, -100.0))
                    rec._write_back(m)
                    coarse += int((m.layer.qbias() != m.layer.bias_q).any())
            xq, _ = _block_io(gm, block, X)
            assert torch.equal(train(xq), fx.GraphModule(gm, block_graph(block))(xq)), block.name
    assert coarse                                   # the case that matters: a bias off its float value


def test_act_search_option_is_checked():
    with pytest.raises(CalibrationError, match="act_search=9"):
        fxq.compile(tiny("residual"), X, "shift-int", progress=False, reconstruct={"act_search": 9})


def test_frozen_quant_after_a_dyadic_add_works_in_values():
    """On int8 the FakeQuant after a residual add takes the QAdd's integer sum; its training wrapper must
    still pass values (QDrop's float elements) and a unit gradient, not the integer sum."""
    from fxq.fakequant import FakeQuant, QAdd
    from fxq.passes.calibration.relaxed import FrozenQuant
    gm, _ = fake_model(tiny("residual"), "int8", w_bits=4)
    add = next(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QAdd))
    fq_node = next(iter(add.users))
    qadd, fq = gm.get_submodule(add.target), gm.get_submodule(fq_node.target)
    assert isinstance(fq, FakeQuant) and fq.requant is not None
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 8, 6, 6, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.rand(4, 8, 6, 6, generator=g, dtype=torch.float64)
    w_add, w_fq = FrozenQuant(qadd, 0.0, g), FrozenQuant(fq, 0.0, g)
    with torch.no_grad():
        assert torch.equal(w_fq(w_add(a, b)), fq(qadd(a, b)))           # forward: the real modules
    out = w_fq(w_add(a, b))
    out.sum().backward()
    inside = ((a + b) > 0) & ((a + b) < fq.fmt.range.hi * fq.fmt.step)
    assert torch.allclose(a.grad[inside], torch.ones_like(a.grad[inside]), rtol=0.02)   # d out / d a ~ 1
    drop = FrozenQuant(fq, 0.999, g).train()                           # QDrop keeps (almost) every float value
    with torch.no_grad():
        kept = drop(w_add(a, b))
    err = (kept - torch.clamp(a + b, *fq.fmt.clamp)).abs()
    assert float(err.detach().max()) < fq.fmt.step
