"""reconstruct, mode "gptq": layer-wise reconstruction in closed form (OBQ/GPTQ rounding, fxq.obq).

Each conv/linear minimises E||(W - Q) x||² over its rounded weights Q, with x its input in the float
model on calibration samples: the input second moments H = E[x xᵀ] (per group for grouped and
depthwise convs, over every output position) come from one float pass, then fxq.obq rounds the rows on
the steps choose_formats and hessian_search picked. Nothing is trained, so it takes one forward pass
and a few seconds of linear algebra, and the result is deterministic.

Where it pays: layers whose inputs are strongly correlated. A depthwise filter that differentiates
nearly equal neighbours (EfficientNet-Lite1's first blocks, folded weights up to 14) turns the sum of
its rounding errors into output error; round-to-nearest leaves that sum to chance. Measured on
EfficientNet-Lite1 W8A8 with activations in float: 92.41% -> 97.3% top-1 agreement (README, a /tmp
probe).

Reads: ``ctx.reconstruct`` (``samples``, ``damp``), ``ctx.calib_batches``, the QConv2d/QLinear modules
and their weight formats. Writes: ``weight_q`` of every QConv2d/QLinear (values on the grid of its
format; formats unchanged). Cluster formats (dfp-cluster) are refused, naming the layer.
"""
from __future__ import annotations

import time

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from fxq.context import CompileContext
from fxq.errors import UnsupportedOp, describe_node
from fxq.fakequant import QConv2d, _QWeighted, set_quantization
from fxq.obq import damped, obq_round

_UNFOLD_ELEMENTS = 2**24        # unfolded patches per piece of a batch, to bound memory


def _groups(layer: _QWeighted) -> int:
    return layer.groups if isinstance(layer, QConv2d) else 1


def _patches(layer: _QWeighted, x: torch.Tensor) -> torch.Tensor:
    """[N, G, K, L]: the inputs each output position reads, per group (K = in-channels/G * kernel area)."""
    if isinstance(layer, QConv2d):
        cols = F.unfold(x, layer.weight.shape[2:], dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)
    else:
        cols = x.reshape(1, -1, x.shape[-1]).transpose(1, 2)
    g = _groups(layer)
    return cols.reshape(cols.shape[0], g, cols.shape[1] // g, cols.shape[2])


class _Moments:
    """Accumulates H = E[x xᵀ] of one layer's inputs, [G, K, K], in float64."""

    def __init__(self, layer: _QWeighted):
        self.layer, self.sum, self.count = layer, None, 0

    def __call__(self, module, inputs, output) -> None:
        x = inputs[0].detach()
        area = self.layer.weight[0, 0].numel() if isinstance(self.layer, QConv2d) else 1
        per_sample = max(1, x[0].numel() * area)       # bounds the unfolded size of one sample
        for piece in x.split(max(1, _UNFOLD_ELEMENTS // per_sample)):
            cols = _patches(self.layer, piece.double())
            h = torch.einsum("ngkl,ngjl->gkj", cols, cols)
            self.sum = h if self.sum is None else self.sum + h
            self.count += cols.shape[0] * cols.shape[-1]

    def hessian(self) -> torch.Tensor:
        return self.sum / self.count


def _check(gm: fx.GraphModule, layers: dict) -> None:
    for node in gm.graph.nodes:
        m = layers.get(node.target) if node.op == "call_module" else None
        if m is None:
            continue
        if m.clustered:
            raise UnsupportedOp(f"{describe_node(node)}: reconstruct mode 'gptq' rounds per-channel codes; cluster "
                                f"weights (dfp-cluster) are not supported")
        if isinstance(m, QConv2d) and isinstance(m.padding, str):
            raise UnsupportedOp(f"{describe_node(node)}: reconstruct mode 'gptq' needs numeric conv padding, "
                                f"got padding={m.padding!r}")


def round_layer(layer: _QWeighted, hess: torch.Tensor, damp: float) -> None:
    """OBQ-round ``layer``'s weights against its input moments ``hess`` [G, K, K], into ``weight_q``."""
    w = layer.weight_q.detach().double()
    g = hess.shape[0]
    rows = w.reshape(g, w.shape[0] // g, -1)
    fmt = layer.w_fmt
    step = torch.from_numpy(fmt.step).reshape(g, -1)          # one step per output channel
    rng = fmt.range
    q = obq_round(rows, damped(hess, damp), step, rng.lo, rng.hi)
    layer.weight_q.copy_(q.reshape(w.shape).to(layer.weight_q.dtype))


def reconstruct_gptq(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    opts = ctx.reconstruct
    started = time.perf_counter()
    layers = {name: m for name, m in gm.named_modules() if isinstance(m, _QWeighted)}
    _check(gm, layers)
    moments = {name: _Moments(m) for name, m in layers.items()}
    hooks = [layers[name].register_forward_hook(acc) for name, acc in moments.items()]
    x = ctx.samples(opts.samples)
    set_quantization(gm, False)
    try:
        with torch.no_grad():
            for batch in tqdm(x.split(opts.batch), desc="fxq reconstruct (gptq): input moments", unit="batch",
                              disable=not ctx.progress, leave=False):
                gm(batch)
    finally:
        set_quantization(gm, True)
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for name in tqdm(layers, desc="fxq reconstruct (gptq): rounding", unit="layer", disable=not ctx.progress,
                         leave=False):
            if moments[name].sum is None:
                raise UnsupportedOp(f"reconstruct mode 'gptq': layer {name} never ran on the calibration samples")
            round_layer(layers[name], moments[name].hessian(), opts.damp)
    ctx.note(f"reconstruct (gptq): {len(layers)} layer(s) rounded against their input moments on {x.shape[0]} "
             f"calibration samples, damp {opts.damp:g}, {time.perf_counter() - started:.1f} s")
    return gm
