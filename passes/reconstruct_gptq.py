"""reconstruct, mode "gptq": layer-wise reconstruction in closed form (OBQ/GPTQ rounding, fxq.passes.calibration.obq).

Each conv/linear minimises E||(W - Q) x||² over its rounded weights Q, with x its input in the float
model on calibration samples: the input second moments H = E[x xᵀ] (per group for grouped and
depthwise convs, over every output position) come from one float pass, then fxq.passes.calibration.obq rounds the rows on
the steps choose_formats and hessian_search picked. Nothing is trained, so it takes one forward pass
and a few seconds of linear algebra, and the result is deterministic.

Where it pays: layers whose inputs are strongly correlated, such as a depthwise filter that
differentiates nearly equal neighbours, where round-to-nearest leaves the sum of the rounding errors
(which becomes output error) to chance. Measurements: docs/notes/from_code.md.

With ``inputs="quantized"`` each layer is fitted where it will run: on the inputs the quantized model
gives it, every upstream layer already rounded and every activation already on its codes, against what
the float layer computes on the float model's inputs. With x the float input, x̃ the quantized one and
centred moments H̃ = Cov[x̃], C = Cov[x, x̃], the output error E||W x + b - (Q x̃ + b')||² is
||Q - W C H̃⁻¹||² in H̃ plus a constant once b' = b + W E[x] - Q E[x̃]: the rows W C H̃⁻¹ are rounded
against H̃ as above and the bias follows the rounded rows. This is the asymmetric calibration of GPTAQ
(Li et al., 2025): the closed form absorbs what upstream rounding and input quantization did to this
layer's input. Samples walk the graph node by node, float and
quantized side by side (fxq.passes.calibration.stepwise): one pass each, every live value held for all ``samples``.

With ``step_search`` each output channel's power of two is chosen by the output error its rounding
leaves, among its step times 2**j, |j| <= step_search.

Reads: ``ctx.reconstruct`` (``samples``, ``damp``, ``inputs``, ``step_search``), ``ctx.calib_batches``, the
QConv2d/QLinear modules and their weight formats. Writes: ``weight_q`` of every QConv2d/QLinear (values on
the grid of its format; formats unchanged unless ``step_search``); with ``inputs="quantized"`` also
``bias_q`` (clipped at the accumulator headroom choose_formats keeps, with a note). Cluster formats (dfp-cluster) are refused, naming the layer.
Requires: insert_fake_quant. PIPELINE runs it, instead of reconstruct, for mode "gptq" with calibration data.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from fxq.context import CompileContext
from fxq.errors import UnsupportedOp, describe_node
from fxq.fakequant import QConv2d, _QWeighted, set_quantization
from fxq.formats import step_of
from fxq.passes.calibration.obq import damped, obq_round
from fxq.passes.calibration.stepwise import run_node, walk
from fxq.passes.calibration.tuning import set_weight_frac, sync_weight_meta

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


def _pieces(layer: _QWeighted, x: torch.Tensor) -> int:
    """Samples per piece so that one piece's unfolded patches stay under _UNFOLD_ELEMENTS."""
    area = layer.weight[0, 0].numel() if isinstance(layer, QConv2d) else 1
    return max(1, _UNFOLD_ELEMENTS // max(1, x[0].numel() * area))


class _Moments:
    """Accumulates H = E[x xᵀ] of one layer's inputs, [G, K, K], in float64."""

    def __init__(self, layer: _QWeighted):
        self.layer, self.sum, self.count = layer, None, 0

    def __call__(self, module, inputs, output) -> None:
        x = inputs[0].detach()
        for piece in x.split(_pieces(self.layer, x)):
            cols = _patches(self.layer, piece.double())
            h = torch.einsum("ngkl,ngjl->gkj", cols, cols)
            self.sum = h if self.sum is None else self.sum + h
            self.count += cols.shape[0] * cols.shape[-1]

    def hessian(self) -> torch.Tensor:
        return self.sum / self.count


class _CrossMoments:
    """Centred moments of one layer's float inputs x and quantized inputs x̃, per group, in float64:
    H̃ = Cov[x̃] and C = Cov[x, x̃] [G, K, K], and the means E[x], E[x̃] [G, K]."""

    def __init__(self, layer: _QWeighted, x: torch.Tensor, xq: torch.Tensor):
        n, sq, sc, mx, mq = 0, 0, 0, 0, 0
        step = _pieces(layer, x)
        for fp, qp in zip(x.split(step), xq.split(step)):
            f, q = _patches(layer, fp.double()), _patches(layer, qp.double())
            sq = sq + torch.einsum("ngkl,ngjl->gkj", q, q)
            sc = sc + torch.einsum("ngkl,ngjl->gkj", f, q)
            mx, mq = mx + f.sum((0, 3)), mq + q.sum((0, 3))
            n += f.shape[0] * f.shape[-1]
        self.mean_x, self.mean_q = mx / n, mq / n
        self.cov_q = sq / n - self.mean_q[:, :, None] * self.mean_q[:, None, :]
        self.cov_xq = sc / n - self.mean_x[:, :, None] * self.mean_q[:, None, :]


def rounded_layers(gm: fx.GraphModule) -> dict[str, _QWeighted]:
    """The conv/linear layers GPTQ rounds, by module name; refuses, naming the node, what it cannot round."""
    layers = {name: m for name, m in gm.named_modules() if isinstance(m, _QWeighted)}
    _check(gm, layers)
    return layers


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


def _rows(layer: _QWeighted, w: torch.Tensor, groups: int) -> torch.Tensor:
    """[G, R, K]: the weights of each group's output channels, in the order _patches lays out inputs."""
    return w.double().reshape(groups, w.shape[0] // groups, -1)


def round_layer(layer: _QWeighted, hess: torch.Tensor, damp: float, rows: torch.Tensor | None = None,
                step_search: int = 0, acc_bits: int | None = None, updated: bool = False) -> None:
    """OBQ-round ``rows`` [G, R, K] (default: ``layer``'s weights) against the input moments ``hess``
    [G, K, K], into ``weight_q``. With ``step_search`` k > 0 each row first tries its step times 2**j,
    |j| <= k, and keeps the one whose rounding leaves the least output error (rows - q) H (rows - q)ᵀ:
    choose_formats picked the step for the weights' own squared error, blind to how the inputs
    correlate and to what OBQ's compensation recovers. With ``updated``, ``weight_q`` gets the compensated
    values OBQ rounded to nearest instead of their codes (off the grid; the fake quant rounds them to the
    same codes), for a learned rounding to start from."""
    g = hess.shape[0]
    rows = _rows(layer, layer.weight_q.detach(), g) if rows is None else rows.double()
    frac = layer.w_fmt.frac_array.reshape(g, -1)
    q, before = _obq(layer, hess, damp, rows, frac)
    if step_search:
        shifts = sorted(range(-step_search, step_search + 1), key=abs)     # 0 first: ties keep the step it had
        tried = [(q, before)] + [_obq(layer, hess, damp, rows, frac - j) for j in shifts[1:]]
        pick = torch.stack([_row_error(rows, t[0], hess) for t in tried]).argmin(0)
        best = frac - np.asarray(shifts)[pick.numpy()]
        set_weight_frac(layer, best.reshape(-1), acc_bits)
        if np.array_equal(layer.w_fmt.frac_array.reshape(g, -1), best):
            q, before = (_per_row(torch.stack([t[i] for t in tried]), pick) for i in (0, 1))
        else:                                   # the bias cap coarsened a channel: round on the steps it left
            q, before = _obq(layer, hess, damp, rows, layer.w_fmt.frac_array.reshape(g, -1))
    q = before if updated else q
    layer.weight_q.copy_(q.reshape(layer.weight_q.shape).to(layer.weight_q.dtype))


def _obq(layer: _QWeighted, hess: torch.Tensor, damp: float, rows: torch.Tensor, frac):
    """(rounded rows, compensated values before rounding) on the steps of fractional lengths ``frac``."""
    step = torch.from_numpy(step_of(frac, layer.w_fmt.mant_array.reshape(frac.shape)))
    rng = layer.w_fmt.range
    return obq_round(rows, damped(hess, damp), step, rng.lo, rng.hi, updated=True)


def _per_row(stacked: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """From candidates [J, G, R, K], row (g, r) of candidate pick[g, r]."""
    return stacked.gather(0, pick[None, :, :, None].expand(1, *stacked.shape[1:]))[0]


def _row_error(rows: torch.Tensor, q: torch.Tensor, hess: torch.Tensor) -> torch.Tensor:
    """[G, R]: E||(w - q) x||² per row, with the undamped moments."""
    d = rows - q
    return torch.einsum("grk,gkj,grj->gr", d, hess.double(), d)


def fit_layer(layer: _QWeighted, m: _CrossMoments, damp: float, acc_bits: int, step_search: int = 0) -> bool:
    """Round ``layer`` for its quantized inputs (module docstring) and set the bias that goes with the
    rounded rows. Returns whether that bias was clipped at the accumulator headroom."""
    g = m.cov_q.shape[0]
    w = _rows(layer, layer.weight.detach(), g)
    hess = damped(m.cov_q, damp)
    # ridge towards the float rows (not towards 0): where the samples leave a direction unseen, keep W
    pull = hess - m.cov_q
    target = torch.linalg.solve(hess, (w @ (m.cov_xq + pull)).transpose(1, 2)).transpose(1, 2)
    round_layer(layer, m.cov_q, damp, rows=target, step_search=step_search, acc_bits=acc_bits)
    q = _rows(layer, layer.weight_q, g)
    shift = (w @ m.mean_x[:, :, None] - q @ m.mean_q[:, :, None]).reshape(-1)
    bias = layer.bias.detach().double() + shift
    room = layer.bias_room(acc_bits).double()
    clipped = bool((bias.abs() > room).any())
    layer.bias_q.copy_(torch.maximum(torch.minimum(bias, room), -room).to(layer.bias_q.dtype))
    return clipped


def reconstruct_gptq(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    opts = ctx.reconstruct
    started = time.perf_counter()
    layers = rounded_layers(gm)
    x = ctx.samples(opts.samples)
    with torch.no_grad():
        if opts.inputs == "quantized":
            _fit_on_quantized_inputs(gm, ctx, x, len(layers))
        else:
            round_on_float_inputs(gm, ctx, x, layers)
    sync_weight_meta(gm)
    ctx.note(f"reconstruct (gptq): {len(layers)} layer(s) rounded against their {opts.inputs} input moments on "
             f"{x.shape[0]} calibration samples, damp {opts.damp:g}, {time.perf_counter() - started:.1f} s")
    return gm


def round_on_float_inputs(gm: fx.GraphModule, ctx: CompileContext, x: torch.Tensor, layers: dict,
                          updated: bool = False) -> None:
    """GPTQ on the float model's input moments (``updated``: see round_layer)."""
    opts = ctx.reconstruct
    moments = {name: _Moments(m) for name, m in layers.items()}
    hooks = [layers[name].register_forward_hook(acc) for name, acc in moments.items()]
    set_quantization(gm, False)
    try:
        for batch in tqdm(x.split(opts.batch), desc="fxq reconstruct (gptq): input moments", unit="batch",
                          disable=not ctx.progress, leave=False):
            gm(batch)
    finally:
        set_quantization(gm, True)
        for h in hooks:
            h.remove()
    for name in tqdm(layers, desc="fxq reconstruct (gptq): rounding", unit="layer", disable=not ctx.progress,
                     leave=False):
        if moments[name].sum is None:
            raise UnsupportedOp(f"reconstruct mode 'gptq': layer {name} never ran on the calibration samples")
        round_layer(layers[name], moments[name].hessian(), opts.damp, step_search=opts.step_search,
                    acc_bits=ctx.target.acc_bits, updated=updated)


def _fit_on_quantized_inputs(gm: fx.GraphModule, ctx: CompileContext, x: torch.Tensor, n_layers: int) -> None:
    """Walk the graph in order, float and quantized values side by side; fit each layer as it comes, so
    every layer downstream sees its rounding."""
    modules = dict(gm.named_modules())
    quant: dict = {}
    flt: dict = {}
    clipped = []
    with tqdm(total=n_layers, desc="fxq reconstruct (gptq, quantized inputs)", unit="layer",
              disable=not ctx.progress, leave=False) as bar:
        for node in walk(gm, x, quant, flt):
            layer = modules.get(node.target) if node.op == "call_module" else None
            if isinstance(layer, _QWeighted):
                src = node.args[0].name
                if fit_layer(layer, _CrossMoments(layer, flt[src], quant[src]), ctx.reconstruct.damp,
                             ctx.target.acc_bits, ctx.reconstruct.step_search):
                    clipped.append(node.name)
                bar.update(1)
            quant[node.name] = run_node(node, gm, modules, quant)
            flt[node.name] = run_node(node, gm, modules, flt, float_=True)
    if clipped:
        ctx.note(f"reconstruct (gptq): biases clipped at the accumulator headroom in {', '.join(clipped)}")
