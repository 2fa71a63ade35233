"""bias_correction: cancel the mean error that quantization adds to every conv/linear output.

Rounded weights shift each output channel's mean, and the shift compounds through a deep network.
Calibration samples run through the fake-quant model node by node, in graph order; at each conv/linear
the per-channel mean of (quantized output - reference output) is subtracted from the bias the integer
graph rounds:

- ``"weights"`` (default): the reference is the same layer with float weights and bias on the same
  quantized input, so the correction cancels exactly this layer's rounding bias (the bias-correction
  term of Nagel et al., "Data-Free Quantization", 2019, taken on data instead of derived from BN).
- ``"empirical"``: the reference is the float model's output at that layer, so the correction also
  absorbs the mean of the error arriving from upstream (clipping included). Not the default: where
  formats clip often, that error depends on the image and a constant shift can hurt.
- ``"checked"``: ``"empirical"``, kept only if it brings the network's output closer to the float
  model's (squared error over up to 1024 calibration samples, a seeded subset); otherwise every bias is
  put back. compile() picks it after reconstruct, whose learned rounding is biased on purpose (to absorb
  the error arriving from upstream), so ``"weights"`` would undo it.
Measurements behind these choices: docs/notes/from_code.md.

The corrected bias is rounded to the accumulator step like any bias, so the integer graph, its three
executors and their exactness are unchanged. All samples pass each node at once (node-major, each
layer is visited once); memory is the samples times the live activations, bounded by
``ctx.bias_correction_samples``.

Reads: the QConv2d/QLinear, FakeQuant and QAdd modules of insert_fake_quant, ``ctx.calib_batches``,
``ctx.bias_correction``, ``ctx.bias_correction_samples``.
Writes: ``bias_q`` of every QConv2d/QLinear (the float ``bias`` stays, so the float model is intact).
A correction that would push a bias code past the accumulator headroom choose_formats keeps is clipped
there, with a note. PIPELINE runs it only with calibration data and ``ctx.bias_correction`` set.
Requires: insert_fake_quant.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from fxq.context import CompileContext
from fxq.fakequant import _QWeighted, set_quantization
from fxq.passes.calibration.stepwise import CHUNK, run_node, walk

_CHECK_SAMPLES = 1024    # at most this many calibration samples judge a "checked" correction


def _outputs(gm: fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([gm(c) for c in x.split(CHUNK)])


def _output_error(gm: fx.GraphModule, x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((_outputs(gm, x) - ref) ** 2).sum() / max(x.shape[0], 1))


def bias_correction(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    mode = ctx.bias_correction
    if mode != "checked":
        return _correct(gm, ctx, mode)
    layers = [m for m in gm.modules() if isinstance(m, _QWeighted)]
    saved = [m.bias_q.clone() for m in layers]
    x = ctx.samples(_CHECK_SAMPLES)
    set_quantization(gm, False)
    ref = _outputs(gm, x)
    set_quantization(gm, True)
    before = _output_error(gm, x, ref)
    _correct(gm, ctx, "empirical")
    after = _output_error(gm, x, ref)
    kept = after < before
    if not kept:
        for m, b in zip(layers, saved):
            m.bias_q.copy_(b)
    ctx.note(f"bias correction (checked): the empirical correction {'is kept' if kept else 'is undone'}: output "
             f"squared error on {x.shape[0]} calibration samples {before:.4g} -> {after:.4g}")
    return gm


def _correct(gm: fx.GraphModule, ctx: CompileContext, mode: str) -> fx.GraphModule:
    empirical = mode == "empirical"
    modules = dict(gm.named_modules())
    x = ctx.samples(ctx.bias_correction_samples)
    layers = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], _QWeighted)]
    quant: dict[str, object] = {}
    flt: dict[str, object] = {}            # the float model's values ("empirical" only)
    clipped = []
    with torch.no_grad(), tqdm(total=len(layers), desc=f"fxq bias correction ({mode})", unit="layer",
                               disable=not ctx.progress, leave=False) as bar:
        for node in walk(gm, x, quant, flt):
            q = run_node(node, gm, modules, quant)
            if empirical:
                flt[node.name] = run_node(node, gm, modules, flt, float_=True)
            layer = modules.get(node.target) if node.op == "call_module" else None
            if isinstance(layer, _QWeighted):
                ref = flt[node.name] if empirical else run_node(node, gm, modules, quant, float_=True)
                dims = layer.non_channel_dims(q)
                before = layer.qbias()               # the bias the output q was computed with
                corrected = before - (q - ref).mean(dims).to(before.dtype)
                room = layer.bias_room(ctx.target.acc_bits)
                if bool((corrected.abs() > room).any()):
                    clipped.append(node.name)
                    corrected = torch.maximum(torch.minimum(corrected, room), -room)
                layer.bias_q.copy_(corrected)
                # the output is linear in the bias: shift it rather than run the layer again
                q += layer.output_channels(q, (layer.qbias() - before).to(q.dtype))
                bar.update(1)
            quant[node.name] = q
    if clipped:
        ctx.note(f"bias correction: corrections clipped at the accumulator headroom in {', '.join(clipped)}")
    ctx.note(f"bias correction ({mode}): {len(layers)} layer(s) on {x.shape[0]} calibration samples")
    return gm
