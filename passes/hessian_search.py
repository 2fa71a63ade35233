"""hessian_search: pick each step by the error the task loss feels, not by plain squared error.

PTQ4ViT's metric (ALGORITHMS §4): a candidate step for tensor T costs E[(dL/dT)^2 (T - Q(T))^2], the
diagonal of the Fisher approximation to the Hessian at the float point. Without labels, L is the
cross-entropy against the float model's own top-1 (the KL to itself has zero gradient there). The
fake-quant model with quantization off is the float model, so one backward pass on a few calibration
samples gives every gradient at once.

- Activations: T is the qpoint's value; candidates are the fractional lengths within
  ``target.search_radius`` of choose_formats' choice. Members of a share_scales group are scored
  together and take one step.
- Weights (mode "hessian"; "hessian-activations" keeps choose_formats' weight steps, for weight rounding
  that corrects its own error, reconstruct="gptq"): T is the layer's output (the accumulator) computed
  from the *quantized* input in its new format, so activations are searched first and the weight
  search sees their rounding. The error of
  output channel c depends only on channel c's step, so one conv per candidate offset scores every
  channel; each channel keeps its best. The bias-code cap of choose_formats still applies.

Candidates are the target's representable steps: powers of two on shift-int, fractional lengths on
fixed-point8. dfp-cluster's cluster scales keep fxq.clusters' L2 choice; dyadic (int8) steps are left
to choose_formats (their requant multipliers are fixed at insert_fake_quant); both are noted.

Reads: ``ctx.search``, ``ctx.search_samples``, ``ctx.calib_batches``, the FakeQuant and QConv2d/QLinear
modules. Writes (through fxq.passes.calibration.tuning): FakeQuant formats, ``meta[ACT_FMT]``, consumers' input formats,
weight formats and ``meta[W_FMT]``. Requires: insert_fake_quant; runs before reconstruct and
bias_correction. PIPELINE runs it only when ``ctx.search`` is set, with calibration data.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from fxq.context import CompileContext
from fxq.fakequant import FakeQuant, QConv2d, _QWeighted, set_quantization
from fxq.formats import fake_quant, fake_twin
from fxq.passes.calibration.tuning import fake_quant_nodes, set_activation_format, set_weight_frac, share_group, sync_weight_meta

_BATCH = 8           # samples per forward/backward: bounds the memory of every captured tensor


def _task_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the float model's own top-1, summed so each sample weighs the same."""
    flat = logits.reshape(logits.shape[0], -1)
    return F.cross_entropy(flat, flat.detach().argmax(1), reduction="sum")


def _captured(gm: fx.GraphModule, x: torch.Tensor, modules: dict, names: list[str], want_input: bool):
    """Float forward + backward on ``x``: per named module, (input, output, d loss / d output)."""
    store: dict[str, tuple] = {}
    hooks = [modules[n].register_forward_hook(
        lambda m, inp, out, n=n: store.__setitem__(n, (inp[0].detach() if want_input else None, out)))
        for n in names]
    try:
        x = x.clone().requires_grad_(True)
        loss = _task_loss(gm(x))
    finally:
        for h in hooks:
            h.remove()
    keep = [n for n in names if n in store and store[n][1].requires_grad]
    grads = torch.autograd.grad(loss, [store[n][1] for n in keep], allow_unused=True)
    return {n: (store[n][0], store[n][1].detach(), g) for n, g in zip(keep, grads) if g is not None}


def _fq_error(fq: FakeQuant, value: torch.Tensor, grad: torch.Tensor, fmts) -> np.ndarray:
    g2 = grad.double() ** 2
    v = value.double()
    return np.array([float((g2 * (_quantized(v, f, fq.rounding) - v) ** 2).sum()) for f in fmts])


def _quantized(v: torch.Tensor, fmt, rounding) -> torch.Tensor:
    if fmt.twin is not None:
        return fake_twin(v, fmt.frac, fmt.twin)
    return fake_quant(v, fmt.frac, fmt.range, rounding)


def _search_activations(gm, ctx, modules, x) -> int:
    """Per share group, the neighbouring format (a finer or coarser step; for twin-uniform codes, the
    ratio of the two steps) with the least Hessian-weighted error."""
    t = ctx.target
    nodes = [n for n in fake_quant_nodes(gm) if modules[n.target].requant is None]
    groups, seen = [], set()
    for n in nodes:
        if n.name not in seen:
            g = share_group(gm, n)
            seen.update(m.name for m in g)
            groups.append(g)
    cands = {tuple(m.target for m in g): modules[g[0].target].fmt.neighbours(t.search_radius) for g in groups}
    # each member is judged at its own sign/bits, with the group's candidate step
    own = {target: [modules[target].fmt.with_frac(f.frac) if f.twin is None else f for f in fmts]
           for key, fmts in cands.items() for target in key}
    err = {key: np.zeros(len(c)) for key, c in cands.items()}
    names = [n.target for n in nodes]
    for batch in tqdm(x.split(_BATCH), desc="fxq hessian search (activations)", disable=not ctx.progress, leave=False):
        cap = _captured(gm, batch, modules, names, want_input=False)
        for key in cands:
            for target in key:
                if target in cap:
                    _, value, grad = cap[target]
                    err[key] += _fq_error(modules[target], value, grad, own[target])
    changed = 0
    for g in groups:
        key = tuple(m.target for m in g)
        best = cands[key][int(np.argmin(err[key]))]
        current = modules[g[0].target].fmt
        if (best.frac, best.twin) != (current.frac, current.twin):
            change = (lambda f: best) if best.twin is not None else (lambda f: f.with_frac(best.frac))
            set_activation_format(gm, g[0], change, t.acc_bits)
            changed += len(g)
    return changed


def _layer_output(layer: _QWeighted, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, QConv2d):
        return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, w)


def _input_quantizer(gm: fx.GraphModule, modules: dict):
    """Per layer name, the FakeQuant whose codes the layer reads (through pass-through ops)."""
    from fxq import meta
    from fxq.walk import format_source
    out = {}
    for node in gm.graph.nodes:
        if node.meta.get(meta.KIND) in meta.WEIGHTED:
            src = format_source(node.args[0])
            out[node.target] = modules[src.target] if src.meta.get(meta.KIND) == "fake_quant" else None
    return out


def _search_weights(gm, ctx, modules, x) -> int:
    t = ctx.target
    layers = [n for n, m in modules.items() if isinstance(m, _QWeighted) and not m.clustered]
    in_q = _input_quantizer(gm, modules)
    offsets = np.arange(-t.search_radius, t.search_radius + 1)
    err = {n: np.zeros((len(offsets), modules[n].weight.shape[0])) for n in layers}
    for batch in tqdm(x.split(_BATCH), desc="fxq hessian search (weights)", disable=not ctx.progress, leave=False):
        cap = _captured(gm, batch, modules, layers, want_input=True)
        with torch.no_grad():
            for n in layers:
                if n not in cap:
                    continue
                layer, (inp, out, grad) = modules[n], cap[n]
                fq = in_q[n]
                if fq is not None:
                    fq.enabled = True
                    xq = fq(inp)
                    fq.enabled = False
                else:
                    xq = inp
                target = out - layer.output_channels(out, layer.bias.detach())
                g2 = grad.double() ** 2
                dims = layer.non_channel_dims(out)
                frac0 = layer._per_channel(layer.w_frac)
                for i, k in enumerate(offsets):
                    w = fake_quant(layer.weight_q.detach().double(), frac0 + float(k), layer.w_fmt.range,
                                   layer.rounding).to(inp.dtype)
                    e = (_layer_output(layer, xq, w) - target).double() ** 2
                    err[n][i] += (g2 * e).sum(dims).numpy()
    changed = 0
    for n in layers:
        layer = modules[n]
        best = layer.w_fmt.frac_array + offsets[np.argmin(err[n], axis=0)]
        changed += int((best != layer.w_fmt.frac_array).sum())
        set_weight_frac(layer, best, t.acc_bits)
    return changed


def hessian_search(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    t = ctx.target
    modules = dict(gm.named_modules())
    x = ctx.samples(ctx.search_samples)
    set_quantization(gm, False)
    try:
        acts = _search_activations(gm, ctx, modules, x) if t.scale_kind != "dyadic" else 0
        search_weights = t.scale_kind != "dyadic" and ctx.search == "hessian"
        weights = _search_weights(gm, ctx, modules, x) if search_weights else 0
    finally:
        set_quantization(gm, True)
    sync_weight_meta(gm)
    if t.scale_kind == "dyadic":
        ctx.note("hessian search: dyadic (int8) scales are kept as choose_formats chose them")
    if any(isinstance(m, _QWeighted) and m.clustered for m in modules.values()):
        ctx.note("hessian search: cluster weight scales are kept (fxq.clusters' L2 choice)")
    kept = " (weight steps kept: search='hessian-activations')" if ctx.search == "hessian-activations" else ""
    ctx.note(f"hessian search: {acts} activation step(s) and {weights} weight channel step(s) changed, "
             f"on {x.shape[0]} calibration samples{kept}")
    return gm
