"""calibrate: run the float model on the calibration batches and feed every qpoint's observer.

Reads: ``meta[OBSERVER]``, ``meta[FUSED_ACT]``, ``ctx.calib_batches``. Writes: the observers' statistics
(a fused activation's observer also gets the moments of its producer's output). PIPELINE runs it only
with calibration data (data_free_stats fills the observers otherwise).
Raises CalibrationError for empty data, NaN/inf values, or batches whose shape does not match.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from fxq import meta
from fxq.context import CompileContext, model_input
from fxq.errors import CalibrationError


class _Feeder(fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        obs = n.meta.get(meta.OBSERVER)
        if obs is not None:
            obs.update(out)
        if meta.FUSED_ACT in n.meta:
            next(iter(n.users)).meta[meta.OBSERVER].update_pre(out)
        return out


def check_batches(batches, example: torch.Tensor) -> list[torch.Tensor]:
    if batches is None:
        return None
    batches = list(batches)
    if not batches:
        raise CalibrationError("calibration data is empty: pass at least one batch, or calib_data=None "
                               "for data-free formats from the BatchNorm statistics")
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor):
            raise CalibrationError(f"calibration batch {i} is a {type(b).__name__}, not a tensor")
        if tuple(b.shape[1:]) != tuple(example.shape[1:]):
            raise CalibrationError(f"calibration batch {i} has shape {tuple(b.shape)}; the model's input is "
                                   f"[N, {', '.join(map(str, example.shape[1:]))}]")
        if not torch.isfinite(b).all():
            bad = int((~torch.isfinite(b)).sum())
            raise CalibrationError(f"calibration batch {i} contains {bad} NaN/inf values")
    return batches


def calibrate(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    feeder = _Feeder(gm)
    with torch.no_grad():
        for batch in tqdm(ctx.calib_batches, desc="fxq calibrate", unit="batch", disable=not ctx.progress,
                          leave=False):
            feeder.run(model_input(batch))
    return gm
