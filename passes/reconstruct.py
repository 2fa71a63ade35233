"""reconstruct: learn each block's weight rounding, and on power-of-two targets its steps, so that the
quantized block reproduces the float block's output (BRECQ/AdaRound, with RAPQ's power-of-two steps).

Blocks (``split_blocks``): the graph is cut at each FakeQuant after which exactly one value is live;
runs of single-layer segments are merged up to ``chain_layers`` layers. Per block, in network order,
on cached inputs (the quantized input from the blocks already reconstructed; the target, the float
block on the float input), one Adam optimiser learns against ``sum_channels |O - Ô|^p``:

- the weight rounding (AdaRound, fxq.passes.calibration.relaxed), in every mode;
- mode "rapq" on power-of-two targets, also each output channel's power-of-two weight step and the
  activation steps whose whole share_scales group lies in the block; both are hardened to powers of
  two at the end of the warm-up, and each learned activation step then tries the powers of two within
  ``act_search``. Mode "adaround": the steps stay as chosen before (any target, dyadic int8 included);
- ``init="gptq"`` / ``"gptq-codes"``: the rounding starts from GPTQ's (passes/reconstruct_gptq);
- mode "gptq" is another pass, reconstruct_gptq, which PIPELINE runs instead of this one.

p is BN-based (``bn_p_coeff``) unless ``lp`` is set; ``patch`` trains on crops (fxq.passes.calibration.patches),
``qdrop`` swaps quantized activations for float ones at random, ``bn_match`` pulls each folded layer's
output towards its BN's statistics. A block whose loss ends higher than it started is put back, with a
note. ``iters`` per block, or a ``time_budget`` for the pass (only then does the result depend on the
machine's speed); deterministic under ``ctx.seed``. The algorithm in full, and where the RAPQ reference
code differs: docs/notes/from_code.md.

Reads: ``ctx.reconstruct`` (ReconstructOptions), ``ctx.calib_batches``, ``meta[BN_STATS]``, the
fake-quant modules. Writes: ``weight_q`` of every QConv2d/QLinear (values on the grid of its format),
weight formats and, in "rapq" mode, activation formats (through fxq.passes.calibration.tuning, which keeps consumers and
share_scales groups consistent). Requires: insert_fake_quant; runs after hessian_search and before
bias_correction. PIPELINE runs it only for modes "rapq" and "adaround", with calibration data.
"""
from __future__ import annotations

import time

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from fxq import meta
from fxq.passes.calibration.blocks import Block, block_graph, split_blocks
from fxq.context import CompileContext, ReconstructOptions
from fxq.errors import CalibrationError, UnsupportedOp, describe_node
from fxq.fakequant import FakeQuant, QAdd, _QWeighted, set_quantization
from fxq.passes.calibration.patches import PatchPlan, crop_batch, crop_output, plan_patches, receptive_field, sample_window, window
from fxq.passes.calibration.relaxed import (FrozenQuant, LearnedAct, SoftLayer, bn_lp_exponent, bn_match_loss, qdrop,
                         rectified_sigmoid, rounding_regulariser)
from fxq.passes.calibration.tuning import fit_bias, set_activation_frac, set_weight_frac, share_group, sync_weight_meta
from fxq.walk import attr_value

from .reconstruct_gptq import round_on_float_inputs, rounded_layers

_EVAL_SAMPLES = 256     # cached samples the before/after loss of each block is measured on


def _lp_loss(out: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    err = (out - target).abs().pow(p)
    return err.sum(1).mean() if err.dim() > 1 else err.mean()


def _block_p(block: Block, nodes_by_target: dict, opts: ReconstructOptions) -> float:
    if opts.lp is not None:
        return float(opts.lp)
    stats = nodes_by_target[block.layers[-1]].meta.get(meta.BN_STATS)
    return 2.0 if stats is None else bn_lp_exponent(stats.gamma, opts.bn_p_coeff)


def _run_chunks(fn, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(c) for c in x.split(chunk)])


class _Reconstructor:
    def __init__(self, gm: fx.GraphModule, ctx: CompileContext, opts: ReconstructOptions):
        self.gm, self.ctx, self.opts = gm, ctx, opts
        self.modules = dict(gm.named_modules())
        self.nodes_by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
        t = ctx.target
        self.learn_steps = opts.mode == "rapq"
        if self.learn_steps and t.scale_kind == "dyadic":
            raise CalibrationError(f"reconstruct mode 'rapq' learns power-of-two steps; target {t.name!r} has dyadic "
                                   f"scales: use mode 'adaround' (rounding only, steps as chosen)")
        for name, m in self.modules.items():
            if isinstance(m, _QWeighted) and m.clustered:
                raise UnsupportedOp(f"{describe_node(self.nodes_by_target[name])}: reconstruct learns per-channel "
                                    f"rounding; cluster weights (dfp-cluster) are not supported yet")
        self.per_tensor = t.w_granularity == "tensor"
        self.snapped: set[str] = set()            # FakeQuant targets whose step is final
        self.gen = torch.Generator().manual_seed(ctx.seed)
        self.history: list[dict] = []

    # -- training modules for one block --------------------------------------------------------------
    def _learnable(self, node: fx.Node, inside: set) -> bool:
        """An activation step is learned when the target allows it, it is not final yet, and its whole
        share_scales group lives in this block (a group reaching other blocks keeps share_scales' step:
        a step fitted to one block's members could clip the others)."""
        m = self.modules[node.target]
        if not self.learn_steps or m.requant is not None or m.fmt.twin is not None or node.target in self.snapped:
            return False            # twin-uniform steps are hessian_search's (their ratio is searched, not learned)
        return all(g.name in inside for g in share_group(self.gm, node))

    def _wrappers(self, block: Block):
        opts, wrapped, acts = self.opts, {}, {}
        inside = {n.name for n in block.nodes}
        group_params: dict[str, nn.Parameter] = {}
        for node in block.nodes:
            if node.op == "get_attr":                   # a constant used as data (class token, position embedding)
                wrapped[node.target] = attr_value(self.gm, node.target)
            if node.op != "call_module":
                continue
            m = self.modules[node.target]
            if isinstance(m, _QWeighted):
                bn = node.meta.get(meta.BN_STATS) if opts.bn_match > 0 else None
                wrapped[node.target] = SoftLayer(m, self.learn_steps, self.per_tensor and
                                                  m.w_fmt.bits == self.ctx.target.w_bits, bn,
                                                  at_codes=opts.init == "gptq-codes")
            elif isinstance(m, FakeQuant) and self._learnable(node, inside):
                group = share_group(self.gm, node)
                key = group[0].target
                if key not in group_params:
                    group_params[key] = nn.Parameter(torch.tensor(-float(m.fmt.frac)))
                    acts[key] = (node, group)
                wrapped[node.target] = LearnedAct(m, group_params[key], opts.qdrop, self.gen)
            elif isinstance(m, (FakeQuant, QAdd)):
                wrapped[node.target] = FrozenQuant(m, opts.qdrop if isinstance(m, FakeQuant) else 0.0, self.gen)
            else:
                wrapped[node.target] = m
        return wrapped, acts, group_params

    def search_acts(self, block: Block, learned: list[fx.Node], xq: torch.Tensor, yf: torch.Tensor,
                    p: float) -> list[str]:
        """After a block is learned and written back: each activation step it learned (``learned``: one
        node per share group, in graph order) takes the power of two within ``act_search`` of its snapped value
        that gives the least loss of the real fake-quant block on the first cached samples. LSQ moves a
        log2 step by a fraction of a unit in the warm-up, so its snap alone almost always gives the start
        back; scoring with the final weights (not the warm-up's) keeps 2-bit rounding from steering it.
        Returns the changes, for the note."""
        radius, changed = self.opts.act_search, []
        if radius == 0:
            return changed
        x, y = xq[:_EVAL_SAMPLES], yf[:_EVAL_SAMPLES]
        sub = _block_fn(self.gm, block)
        acc_bits = self.ctx.target.acc_bits
        for node in learned:
            start = self.modules[node.target].fmt.frac
            formats = self._weight_formats()      # a finer candidate may coarsen a consumer (bias cap)
            losses = {}
            for frac in range(start - radius, start + radius + 1):
                self._set_weight_formats(formats)
                set_activation_frac(self.gm, node, frac, acc_bits)
                losses[frac] = float(_lp_loss(_run_chunks(sub, x), y, p))
            best = min(losses, key=lambda f: (losses[f], abs(f - start)))
            self._set_weight_formats(formats)
            set_activation_frac(self.gm, node, best, acc_bits)
            if best != start:
                changed.append(f"{node.name} 2^{-start} -> 2^{-best}")
        sync_weight_meta(self.gm)
        return changed

    def _snap_acts(self, acts: dict, wrapped: dict) -> None:
        """Every learned activation step becomes the nearest power of two, for good."""
        for key, (node, group) in list(acts.items()):
            log2_step = float(wrapped[node.target].log2_step.detach())
            set_activation_frac(self.gm, node, -int(round(log2_step)), self.ctx.target.acc_bits)
            for g in group:
                self.snapped.add(g.target)
                if g.target in wrapped and isinstance(wrapped[g.target], LearnedAct):
                    wrapped[g.target].log2_step = None
        acts.clear()

    # -- one block ---------------------------------------------------------------------------------
    def patches(self, block: Block, xq: torch.Tensor, yf: torch.Tensor) -> PatchPlan | None:
        if not self.opts.patch or xq.dim() != 4 or yf.dim() != 4:
            return None
        return plan_patches(receptive_field(self.gm, block), tuple(xq.shape[-2:]), tuple(yf.shape[-2:]),
                            self.opts.patch)

    def block(self, block: Block, xq, xf, yf, iters: int, bar_desc: str, plan: PatchPlan | None,
              p: float, loss_before: float) -> list[fx.Node]:
        """Learns ``block`` (on crops when ``plan``) and writes it back; returns its learned activation
        steps, one node per share group."""
        opts = self.opts
        wrapped, acts, group_params = self._wrappers(block)
        learned = [node for node, _ in acts.values()]
        train = fx.GraphModule(wrapped, block_graph(block))
        soft = [m for m in wrapped.values() if isinstance(m, SoftLayer)]
        params = [{"params": [m.V for m in soft], "lr": opts.lr}]
        if self.learn_steps:
            params.append({"params": [m.s for m in soft if m.s is not None], "lr": opts.exp_lr})
            params.append({"params": list(group_params.values()), "lr": opts.act_lr})
        optimiser = torch.optim.Adam([g for g in params if g["params"]])
        # relative_loss: the reconstruction error in units of the block's error before training, the
        # regularisers averaged over the weights, so that λ weighs the same in every block and model.
        rec_scale, reg_scale = 1.0, 1.0
        if opts.relative_loss:
            rec_scale = 1.0 / loss_before if loss_before > 0 else 1.0
            reg_scale = 1.0 / sum(m.w.numel() for m in soft)
        warm = int(opts.warmup * iters)
        n = xq.shape[0]
        train.train()
        with tqdm(range(iters), desc=bar_desc, disable=not self.ctx.progress, leave=False) as bar:
            for it in bar:
                if it == warm:
                    for m in soft:
                        m.harden_exponent()
                    self._snap_acts(acts, wrapped)
                idx = torch.randint(0, n, (min(opts.batch, n),), generator=self.gen)
                xb, xfb, yb = xq[idx], xf[idx], yf[idx]
                if plan is not None:
                    (xb, xfb), yb = crop_batch(sample_window(plan, self.gen), (xb, xfb), yb)
                out = train(qdrop(xb, xfb, opts.qdrop, self.gen))
                rec = rec_scale * _lp_loss(out if plan is None else crop_output(out, plan), yb, p)
                loss = rec
                if it >= warm:
                    beta = opts.beta[0] + (opts.beta[1] - opts.beta[0]) * (it - warm) / max(iters - warm, 1)
                    loss = loss + reg_scale * opts.rounding_weight * sum(rounding_regulariser(m.h(), beta) for m in soft)
                elif self.learn_steps:
                    loss = loss + reg_scale * opts.rounding_weight * sum(
                        rounding_regulariser(rectified_sigmoid(m.s), opts.beta[0]) for m in soft if m.s is not None)
                if opts.bn_match > 0:
                    loss = loss + opts.bn_match * sum(bn_match_loss(m) for m in soft if m.out_stats is not None)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                if it % 50 == 0:
                    bar.set_postfix(loss=f"{rec.item():.4g}", p=p)
        for m in soft:                          # (already done at the end of the warm-up)
            m.harden_exponent()
        self._snap_acts(acts, wrapped)
        for m in soft:
            self._write_back(m)
        return learned

    def _weight_formats(self) -> dict:
        return {name: m.w_fmt for name, m in self.modules.items() if isinstance(m, _QWeighted)}

    def _set_weight_formats(self, formats: dict) -> None:
        for name, fmt in formats.items():
            if self.modules[name].w_fmt != fmt:
                self.modules[name].set_weight_format(fmt)

    def snapshot(self, block: Block) -> dict:
        """What reconstructing ``block`` may change: its layers' weights, its activation steps, and the
        weight formats of every layer (a consumer outside the block may be coarsened by the bias cap
        when an activation step it reads gets finer)."""
        layers = {n: self.modules[n].weight_q.clone() for n in block.layers}
        acts = {n.name: (n, self.modules[n.target].fmt.frac) for n in block.nodes
                if n.op == "call_module" and isinstance(self.modules[n.target], FakeQuant)}
        return {"layers": layers, "acts": acts, "formats": self._weight_formats()}

    def restore(self, saved: dict) -> None:
        for name, weight_q in saved["layers"].items():
            self.modules[name].weight_q.copy_(weight_q)
        for node, frac in saved["acts"].values():
            if self.modules[node.target].fmt.frac != frac:
                set_activation_frac(self.gm, node, frac, self.ctx.target.acc_bits)
        self._set_weight_formats(saved["formats"])           # after the inputs' steps are back

    def _write_back(self, soft: SoftLayer) -> None:
        layer = soft.layer
        with torch.no_grad():
            hard = soft.hard_weight()
        if self.learn_steps:
            set_weight_frac(layer, soft.frac(), self.ctx.target.acc_bits)
        layer.weight_q.copy_(hard.to(layer.weight_q.dtype))
        fit_bias(layer, self.ctx.target.acc_bits)


def _block_fn(gm: fx.GraphModule, block: Block):
    return fx.GraphModule(gm, block_graph(block))


def reconstruct(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    opts: ReconstructOptions = ctx.reconstruct
    rec = _Reconstructor(gm, ctx, opts)
    blocks = split_blocks(gm, opts.chain_layers)
    if not blocks:
        ctx.note("reconstruct: no block to reconstruct (no FakeQuant cuts the graph)")
        return gm
    x = ctx.samples(opts.samples)
    first = blocks[0].input
    if first.args[0].op != "placeholder":
        raise UnsupportedOp(f"{describe_node(first)}: reconstruct expects the first cut to quantize the model "
                            f"input directly")
    rec.snapped.add(first.target)                   # the cached inputs were quantized with its step
    if opts.from_gptq:
        with torch.no_grad():
            round_on_float_inputs(gm, ctx, x, rounded_layers(gm), updated=True)
    xf = x
    xq = _run_chunks(gm.get_submodule(first.target), x)
    started = time.perf_counter()
    summary = []
    for i, block in enumerate(blocks):
        sub = _block_fn(gm, block)
        set_quantization(gm, False)
        yf = _run_chunks(sub, xf)
        set_quantization(gm, True)
        p = _block_p(block, rec.nodes_by_target, opts)
        before = float(_lp_loss(_run_chunks(sub, xq[:_EVAL_SAMPLES]), yf[:_EVAL_SAMPLES], p))
        plan = rec.patches(block, xq, yf)
        iters = opts.iters
        if opts.time_budget is not None:
            iters = _budgeted_iters(rec, block, xq, yf, opts, started, len(blocks) - i, plan)
        saved = rec.snapshot(block)
        learned = rec.block(block, xq, xf, yf, iters, f"fxq reconstruct {i + 1}/{len(blocks)}", plan, p, before)
        with torch.no_grad():
            searched = rec.search_acts(block, learned, xq, yf, p)
            sub = _block_fn(gm, block)               # the hardened block, through the real fake-quant modules
            xq_next = _run_chunks(sub, xq)
            after = float(_lp_loss(xq_next[:_EVAL_SAMPLES], yf[:_EVAL_SAMPLES], p))
            kept = after <= before
            if not kept:                             # never leave a block worse than it came
                rec.restore(saved)
                xq_next = _run_chunks(sub, xq)
            set_quantization(gm, False)
            xf = _run_chunks(sub, xf)
            set_quantization(gm, True)
        xq = xq_next
        rec.history.append({"block": block.name, "layers": list(block.layers), "iters": iters, "p": p,
                            "patch": None if plan is None else plan.size,
                            "loss_before": before, "loss_after": after, "kept": kept,
                            "act_steps_searched": searched if kept else []})
        crops = "" if plan is None else f", {plan.size}px crops"
        summary.append(f"{block.output.name} ({iters} it{crops}, p={p}): {before:.3g} -> {after:.3g}"
                       + ("" if kept else " (worse: reverted)")
                       + (f" [steps {', '.join(searched)}]" if searched and kept else ""))
    if opts.from_gptq:                              # a reverted block still holds GPTQ's compensated values
        with torch.no_grad():
            for m in rec.modules.values():
                if isinstance(m, _QWeighted):
                    m.weight_q.copy_(m.qweight())
    sync_weight_meta(gm)
    ctx.reconstruct_history = rec.history
    start = {"gptq": ", from GPTQ", "gptq-codes": ", from GPTQ's codes"}.get(opts.init, "")
    ctx.note(f"reconstruct ({opts.mode}{start}): {len(blocks)} block(s) on {x.shape[0]} calibration samples in "
             f"{time.perf_counter() - started:.0f} s; block loss before -> after: " + "; ".join(summary))
    return gm


def _budgeted_iters(rec, block, xq, yf, opts, started, blocks_left, plan) -> int:
    """Iterations this block can afford: its share of the budget left, at the speed of a few trial steps."""
    left = opts.time_budget - (time.perf_counter() - started)
    if left <= 0:
        return 1
    share = left / blocks_left
    wrapped, _, _ = rec._wrappers(block)
    train = fx.GraphModule(wrapped, block_graph(block))
    train.train()
    t0 = time.perf_counter()
    trials = 3
    x, y = xq[: opts.batch], yf[: opts.batch]
    if plan is not None:                     # the first crop position: timing only, no draw from the seed
        (x,), y = crop_batch(window(plan, (0, 0)), (x,), y)
    for _ in range(trials):
        out = train(x)
        _lp_loss(out if plan is None else crop_output(out, plan), y, 2.0).backward()
    per_iter = (time.perf_counter() - t0) / trials
    return int(max(1, min(opts.iters, share / max(per_iter, 1e-6))))
