"""fxq.compile and the QuantizedModel it returns."""
from __future__ import annotations

import copy
import warnings
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .context import (BIAS_CORRECTION_AUTO, BIAS_CORRECTION_MODES, SEARCH_MODES, CompileContext, ReconstructOptions,
                      model_input)
from .errors import CalibrationError, InputError, LoadError
from .formats import codes_of
from .ir import Graph
from .lower import lower
from .pipeline import run_passes
from .targets import Target, get_target
from .trace import trace


def _as_batches(calib_data, batch_size: int) -> list[torch.Tensor] | None:
    """DataLoader, list of tensors or (x, y) pairs, or one tensor -> list of input batches."""
    if calib_data is None:
        return None
    if isinstance(calib_data, np.ndarray):
        calib_data = torch.from_numpy(calib_data)
    if isinstance(calib_data, torch.Tensor):
        if calib_data.dim() == 0 or calib_data.shape[0] == 0:
            raise CalibrationError("calibration data is empty (a tensor with no samples)")
        return list(calib_data.split(batch_size))
    batches = []
    for item in calib_data:
        if isinstance(item, (tuple, list)):
            item = item[0]                        # (inputs, labels) from a DataLoader
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(item)
        batches.append(item)
    return batches


def compile(model: nn.Module, calib_data=None, target: str | Target = "shift-int", *,
            example_input: torch.Tensor | None = None, input_shape: tuple | None = None,
            input_range: tuple[float, float] | None = None, progress: bool = True, seed: int = 0,
            calib_batch_size: int = 64, bias_correction: str | bool | None = "auto",
            bias_correction_samples: int = 128, search: str | None = None, search_samples: int = 32,
            reconstruct=None, **overrides) -> "QuantizedModel":
    """Quantize ``model`` for ``target``; returns a QuantizedModel (fake-quant, IR, backends).

    ``calib_data``: a DataLoader, a list of batches, or a tensor of samples; None derives activation
    formats from the folded BatchNorm statistics (then give ``example_input`` or ``input_shape``,
    and preferably ``input_range``). ``overrides`` replace target fields (``w_bits=4`` ...).
    ``bias_correction``: once formats are fixed, cancel each conv/linear's mean output error on
    ``bias_correction_samples`` calibration samples (0: all): "weights" (its own rounding error),
    "empirical" (also the error from upstream), "checked" (empirical, kept only if the output gets
    closer to the float model's), None/False, or "auto"/True: "weights", "checked" with ``reconstruct``
    (whose learned rounding "weights" would undo), none with ``reconstruct={"mode": "gptq", "inputs":
    "quantized"}`` (which solves the biases); it needs calibration data.
    ``search="hessian"``: re-choose every power-of-two/fixed-point step by the task-loss-weighted error
    (PTQ4ViT's Hessian-guided metric) on ``search_samples`` calibration samples (0: all);
    ``search="hessian-activations"``: activation steps only, the weights keep choose_formats' steps (the
    better partner of ``reconstruct="gptq"``, whose rounding does not want steps chosen for rounding to
    nearest).
    ``reconstruct``: block-wise reconstruction (passes/reconstruct): True or "rapq" (learned rounding,
    power-of-two weight exponents and activation steps), "adaround" (rounding only), "gptq" (each layer's
    rounding in closed form against its inputs' second moments, passes/reconstruct_gptq; with option
    ``inputs="quantized"`` fitted on the quantized model's inputs, the bias with it; ``step_search=k``
    also re-chooses each channel's power of two), or a dict / fxq.ReconstructOptions of its options
    (iters, time_budget, qdrop, ...; ``init="gptq"`` starts the learned rounding from GPTQ's).
    """
    from .passes import PIPELINE
    from .passes.expand_attention import ATTENTION_LEAVES
    from .passes.calibrate import check_batches

    tgt = get_target(target, **overrides)
    reconstruct = ReconstructOptions.from_user(reconstruct)
    bias_correction = _bias_correction_mode(bias_correction, reconstruct)
    if not isinstance(bias_correction_samples, int) or isinstance(bias_correction_samples, bool) \
            or bias_correction_samples < 0:
        raise CalibrationError(f"bias_correction_samples={bias_correction_samples!r} must be an integer >= 0 "
                               f"(0: every calibration sample)")
    search = _search_mode(search, search_samples, calib_data)
    if reconstruct is not None and calib_data is None:
        raise CalibrationError("reconstruct needs calibration data: it fits each block's quantized output to "
                               "the float block's on real samples")
    batches = _as_batches(calib_data, calib_batch_size)
    if example_input is None:
        if batches:
            example_input = batches[0][:1]
        elif input_shape is not None:
            example_input = torch.zeros((1,) + tuple(input_shape[1:] if len(input_shape) == 4 else input_shape))
        elif batches is not None:
            check_batches(batches, torch.zeros(1))
        else:
            raise CalibrationError("without calibration data fxq needs example_input= or input_shape= "
                                   "to know the model's input")
    batches = check_batches(batches, example_input)
    was_training = model.training
    model = copy.deepcopy(model).eval()          # passes fold and rescale weights: never touch the user's model
    ctx = CompileContext(tgt, model_input(example_input), batches, input_range, progress, seed,
                         bias_correction=bias_correction, bias_correction_samples=bias_correction_samples,
                         search=search, search_samples=search_samples, reconstruct=reconstruct)
    if was_training:
        msg = ("the model was in training mode; fxq compiled its eval-mode behaviour (BatchNorm running "
               "statistics, Dropout off). Call model.eval() first to silence this.")
        warnings.warn(msg, stacklevel=2)
        ctx.note(msg)
    gm = run_passes(trace(model, leaf_types=ATTENTION_LEAVES), ctx, PIPELINE)
    ir = lower(gm, tgt)
    return QuantizedModel(ir, gm, tgt, ctx.notes, reference=model)


def _search_mode(mode, samples, calib_data) -> str | None:
    if mode is not None and mode not in SEARCH_MODES:
        raise CalibrationError(f"search={mode!r} must be one of {SEARCH_MODES} or None (choose_formats' "
                               f"squared-error choice)")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise CalibrationError(f"search_samples={samples!r} must be an integer >= 0 (0: every calibration sample)")
    if mode is not None and calib_data is None:
        raise CalibrationError(f"search={mode!r} needs calibration data: its metric is weighted by the task "
                               f"loss's gradients on real samples")
    return mode


def _bias_correction_mode(mode, reconstruct: ReconstructOptions | None) -> str | None:
    if mode is None or mode is False:
        return None
    if mode is True or mode == "auto":
        if reconstruct is None:
            return BIAS_CORRECTION_AUTO["plain"]
        return BIAS_CORRECTION_AUTO["bias solved" if reconstruct.solves_bias else "reconstructed"]
    if mode not in BIAS_CORRECTION_MODES:
        raise CalibrationError(f"bias_correction={mode!r} must be one of {BIAS_CORRECTION_MODES}, \"auto\"/True "
                               f"(the default: {BIAS_CORRECTION_AUTO['plain']!r}, {BIAS_CORRECTION_AUTO['reconstructed']!r} "
                               f"with reconstruct) or None/False (off)")
    return mode


class QuantizedModel:
    """The compiled model: ``qm(x)`` fake-quant torch, ``qm.run(x)`` integer reference, ``qm.ir``."""

    def __init__(self, ir: Graph, fake: torch.fx.GraphModule | None, target: Target | dict, notes: list[str],
                 reference: nn.Module | None = None):
        self.ir = ir
        self.fake = fake
        self.target = target
        self.notes = list(notes)
        self._float = reference
        self._fake64 = None          # float64 copy of the fake-quant model, made on first use

    # -- execution ---------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quant forward in torch (float32); after fxq.load, the integer backend's output."""
        if self.fake is None:
            return torch.from_numpy(self.run(x.detach().cpu().numpy())).float()
        self._check(x)
        with torch.no_grad():
            return self.fake(model_input(x))

    def fake_codes(self, x: torch.Tensor) -> np.ndarray:
        """Output codes from the fake-quant model run in float64, where its sums are exact."""
        if self.fake is None:
            raise InputError("this model was loaded from disk and has no fake-quant torch graph; use run_codes")
        self._check(x)
        if self._fake64 is None:
            self._fake64 = copy.deepcopy(self.fake).double()
        with torch.no_grad():
            out = self._fake64(model_input(x, torch.float64)).numpy()
        t = self.ir.output_codes().out
        return codes_of(out, t.frac, t.mant, t.zp)

    def run(self, x) -> np.ndarray:
        """The integer reference backend: float input, float64 output (dequantized codes)."""
        from .backends import reference
        return reference.run(self.ir, _numpy(x))

    def run_codes(self, x) -> np.ndarray:
        from .backends import reference
        return reference.run_codes(self.ir, _numpy(x))

    def _check(self, x: torch.Tensor) -> None:
        from .backends.reference import check_input_spec
        dtype = np.float32 if x.is_floating_point() else np.int64
        check_input_spec(self.ir, tuple(x.shape), dtype)

    # -- inspection and export ---------------------------------------------------------------------
    def report(self, x: torch.Tensor | None = None, sensitivity: bool = False, progress: bool = True):
        """Per quantization point: formats, shifts, SQNR against float on ``x``; with ``sensitivity`` also the
        output SQNR with only that point (its codes, its layer's weights) quantized: one forward pass each."""
        from .report import build_report
        return build_report(self, x, sensitivity, progress)

    def export_onnx(self, path, **kwargs):
        from .backends.onnx_qdq import export
        return export(self.ir, path, **kwargs)

    def save(self, path) -> None:
        self.ir.save(path)
        with zipfile.ZipFile(path, "a") as z:
            z.writestr("notes.json", json.dumps({"notes": self.notes}))

    def __repr__(self) -> str:
        name = self.target.name if isinstance(self.target, Target) else self.target.get("name")
        return f"QuantizedModel(target={name!r}, {len(self.ir.nodes)} IR nodes)"


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def load(path) -> QuantizedModel:
    """Load a model saved by ``QuantizedModel.save`` (JSON + npz; nothing is unpickled)."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file")
    ir = Graph.load(path)
    try:
        with zipfile.ZipFile(path) as z:
            notes = json.loads(z.read("notes.json")).get("notes", []) if "notes.json" in z.namelist() else []
    except (zipfile.BadZipFile, ValueError) as exc:
        raise LoadError(f"{path}: unreadable notes ({exc})") from exc
    return QuantizedModel(ir, None, ir.target, notes)
