"""data_free_stats: fill the observers without data, from the folded BatchNorm statistics.

Each tensor is modelled per channel by a sample drawn from its distribution. A conv/linear followed
by a (folded) BN outputs ~ N(beta, gamma**2) per channel; one without BN gets the Gaussian whose mean
and variance follow from its weights and its input's moments (inputs taken as independent). ReLU,
clamp, max-pool and add act on the samples themselves, so their effect on range is exact for the model;
average pooling keeps the input's spread (conservative: it never clips more than its input would).
The model input is uniform over ``ctx.input_range`` (or the example batch's range, with a note).

Reads: ``meta[KIND]``, ``meta[BN_STATS]``, ``meta[OBSERVER]``, ``meta[SHAPE]``. Writes: the observers,
``meta[DATA_FREE]`` = (mean, std) per qpoint. PIPELINE runs it only without calibration data.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from fxq import meta
from fxq.context import CompileContext
from fxq.walk import data_inputs

SAMPLES_PER_CHANNEL = 2048


class _Dist:
    """Per-channel samples [C, S] plus how many features each channel spans after a flatten."""

    def __init__(self, samples: np.ndarray, spread: int = 1):
        self.samples = samples
        self.spread = spread

    def feature_moments(self) -> tuple[np.ndarray, np.ndarray]:
        mean, var = self.samples.mean(axis=1), self.samples.var(axis=1)
        return np.repeat(mean, self.spread), np.repeat(var, self.spread)


def _gaussian(rng, mean, std) -> np.ndarray:
    return mean[:, None] + std[:, None] * rng.standard_normal((len(mean), SAMPLES_PER_CHANNEL))


def _weighted(rng, node, module, src: _Dist) -> _Dist:
    stats = node.meta.get(meta.BN_STATS)
    if stats is not None:
        return _Dist(_gaussian(rng, stats.out_mean, stats.out_std))
    w = module.weight.detach().double().numpy()
    b = module.bias.detach().double().numpy() if module.bias is not None else np.zeros(w.shape[0])
    mean_in, var_in = src.feature_moments()
    if w.ndim == 4:                               # conv: input channels of each group, summed over the kernel
        groups = module.groups
        out_c, in_per_group = w.shape[:2]
        mean_in = mean_in.reshape(groups, in_per_group)
        var_in = var_in.reshape(groups, in_per_group)
        g = np.arange(out_c) // (out_c // groups)
        mean = (w.sum(axis=(2, 3)) * mean_in[g]).sum(axis=1) + b
        var = ((w ** 2).sum(axis=(2, 3)) * var_in[g]).sum(axis=1)
    else:
        mean, var = w @ mean_in + b, (w ** 2) @ var_in
    return _Dist(_gaussian(rng, mean, np.sqrt(var)))


def _maxpool(rng, src: _Dist, kernel) -> _Dist:
    k = kernel[0] * kernel[1]
    draws = np.stack([rng.permuted(src.samples, axis=1) for _ in range(k)])
    return _Dist(draws.max(axis=0), src.spread)


def data_free_stats(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    rng = np.random.default_rng(ctx.seed)
    modules = dict(gm.named_modules())
    dists: dict[str, _Dist] = {}
    for node in gm.graph.nodes:
        kind = node.meta[meta.KIND]
        ins = [dists[a.name] for a in data_inputs(node)] if kind not in ("input", "output") else []
        if kind == "input":
            lo, hi = ctx.input_range if ctx.input_range is not None else (
                float(ctx.example_input.min()), float(ctx.example_input.max()))
            if ctx.input_range is None:
                ctx.note(f"data-free: input range [{lo:.4g}, {hi:.4g}] taken from the example input; "
                         f"pass input_range=(lo, hi) to set it")
            channels = node.meta[meta.SHAPE][1]
            d = _Dist(rng.uniform(lo, hi, (channels, SAMPLES_PER_CHANNEL)))
        elif kind == "output":
            continue
        elif kind in meta.WEIGHTED:
            d = _weighted(rng, node, modules[node.target], ins[0])
        elif kind == "relu":
            d = _Dist(np.maximum(ins[0].samples, 0.0), ins[0].spread)
        elif kind == "clamp":
            d = _Dist(np.clip(ins[0].samples, node.args[1], node.args[2]), ins[0].spread)
        elif kind == "add":
            d = _Dist(ins[0].samples + rng.permuted(ins[1].samples, axis=1), ins[0].spread)
        elif kind == "cat":
            d = _Dist(np.concatenate([x.samples for x in ins]), ins[0].spread)
        elif kind == "maxpool":
            d = _maxpool(rng, ins[0], node.args[1])
        elif kind == "avgpool":
            area, divisor = node.args[1][0] * node.args[1][1], node.args[6]   # sum / 2**k = mean * area / 2**k
            d = _Dist(ins[0].samples * (area / divisor), ins[0].spread)
        elif kind in ("flatten", "reshape"):
            in_shape, out_shape = node.args[0].meta[meta.SHAPE], node.meta[meta.SHAPE]
            spatial = int(np.prod(in_shape[2:])) if len(in_shape) > 2 else 1
            d = _Dist(ins[0].samples, ins[0].spread * spatial if len(out_shape) == 2 else ins[0].spread)
        else:                                     # pad: zeros at the border barely move the range
            d = ins[0]
        dists[node.name] = d
        if meta.FUSED_ACT in node.meta:
            next(iter(node.users)).meta[meta.OBSERVER].update_pre(torch.from_numpy(d.samples))
        obs = node.meta.get(meta.OBSERVER)
        if obs is not None:
            obs.update(torch.from_numpy(d.samples))
            node.meta[meta.DATA_FREE] = (float(d.samples.mean()), float(d.samples.std()))
    ctx.note("data-free: activation formats derived from the folded BatchNorm statistics (no calibration data)")
    return gm
