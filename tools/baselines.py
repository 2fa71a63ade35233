"""Baseline quantizers and measurement helpers for ``make bench``.

The benchmark compares fxq against two off-the-shelf post-training quantizers:

* PyTorch FX graph mode (``torch.ao.quantization.quantize_fx``), and
* ONNX Runtime static quantization (``onnxruntime.quantization.quantize_static``, QDQ).

Pitfalls found while writing this (torch 2.13 CPU, onnxruntime 1.32, AVX2 without VNNI):

* ``torch.onnx.export(..., dynamo=False)`` works without onnxscript; it emits a
  DeprecationWarning about the legacy TorchScript exporter, which we silence.
* ``torch.ao.quantization`` emits a DeprecationWarning ("will be removed in 2.10")
  although it is still present and working in 2.13; silenced here.
* torch's quantized engine is a *global* (``torch.backends.quantized.engine``).
  ``convert_fx`` packs weights for the engine active at that moment, and the packed
  object then picks the conv/linear kernels, so we switch engines around conversion
  (and restore the old one).  Weight-free ops (add, relu6, pooling) dispatch on the
  engine active at run time: the result records it as ``model.qengine`` and
  ``accuracy_torch`` / ``torch_fn`` switch to it.
* torch 2.13 bug: under the qnnpack engine, quantized hardtanh/ReLU6 is wrong on
  channels_last tensors (which quantized convs produce): errors of the full clamp
  range.  A qnnpack-converted MobileNetV2 drops to chance accuracy; running it with
  ``run_engine="x86"`` (qnnpack-packed convs, x86 elementwise kernels) restores it.
  ReLU-only nets such as the ResNet are unaffected.
* x86/fbgemm default qconfigs quantize activations with ``reduce_range=True``
  (7-bit) to avoid int16 saturation in the u8s8 kernels; qnnpack uses full 8 bit
  with per-tensor weights.
* ORT's optimised CPU session fuses QDQ into integer kernels (QLinearConv etc.).
  Without VNNI the u8s8 path uses ``vpmaddubsw``, whose int16 pairwise sums can
  saturate with full-range 8-bit weights; ``reduce_range=True`` (7-bit weights)
  avoids that.  ``ort_float_emulated_session`` disables all graph optimisations
  so the QDQ graph runs as float DequantizeLinear -> op -> QuantizeLinear,
  i.e. the "ideal" accuracy of the quantization parameters.  Measured on the zoo
  models (briefly trained): u8 without reduce_range loses 1.8-3 points with ORT's
  kernels but none when float-emulated; with reduce_range both agree.
* ``quantize_static`` logs a warning recommending ``quant_pre_process``; we run it
  when ``preprocess=True`` and fall back to the raw model if it raises.
* ``quantize_static(calibrate_method=Entropy)`` silently equals MinMax: it cannot
  forward histogram sizes, and the Entropy calibrator's defaults (128 bins, 128
  quantized bins) leave a single candidate threshold (the full range).  We
  calibrate Entropy ourselves with 2048 bins (``create_calibrator``) and pass the
  ranges in as a calibration cache.  That costs roughly 0.7 s per activation
  tensor (pure-Python KL search), versus well under a second in total for MinMax.
* With int8 (signed) activations ORT 1.32 turns only some Convs into QLinearConv
  on this CPU (6 of 15 in the zoo ResNet, 14 of 22 in MobileNetV2); the rest stay
  DQ -> float Conv -> Q, so s8 latency is a mix of integer and float kernels.
* ORT's Percentile calibrator defaults to a symmetric histogram of |x| (range
  [-p, p] clipped to the observed min/max), unlike MinMax/Entropy.
* ORT's calibrators ``print`` progress; we swallow stdout around them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import statistics
import tempfile
import time
import warnings
from typing import Callable, Iterable

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader

log = logging.getLogger(__name__)

SEED = 0


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _torch(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(_np(x))


# --------------------------------------------------------------------------- export


def export_fp32_onnx(model: torch.nn.Module, example_input, path, opset: int = 17) -> str:
    """Export ``model`` (evaluated in eval mode, not mutated) to ONNX with a dynamic batch axis."""
    model = copy.deepcopy(model).eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (_torch(example_input),),
            str(path),
            dynamo=False,  # legacy exporter: no onnxscript dependency
            opset_version=opset,
            do_constant_folding=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return str(path)


# --------------------------------------------------------------------------- torch.ao FX


@contextlib.contextmanager
def quantized_engine(engine: str | None):
    """Temporarily select torch's quantized engine (no-op for ``None``)."""
    if engine is None:
        yield
        return
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def torch_ao_fx_configs() -> dict[str, dict]:
    """Named keyword sets for :func:`torch_ao_fx_int8`."""
    return {
        "x86_per_channel": {"backend": "x86"},
        "fbgemm_per_channel": {"backend": "fbgemm"},
        "qnnpack_per_tensor": {"backend": "qnnpack"},
        # same weights/qparams; x86 elementwise kernels dodge the qnnpack ReLU6 bug
        "qnnpack_per_tensor_x86_run": {"backend": "qnnpack", "run_engine": "x86"},
    }


def torch_ao_fx_int8(
    model: torch.nn.Module,
    calib_batches: Iterable,
    example_input,
    backend: str = "x86",
    run_engine: str | None = None,
) -> torch.nn.Module:
    """Post-training static int8 via ``prepare_fx``/``convert_fx`` with the backend's default qconfig.

    The input model is deep-copied. The result carries ``qengine`` (``run_engine``,
    default ``backend``); run it inside ``quantized_engine(model.qengine)``.
    """
    if backend not in ("x86", "fbgemm", "qnnpack"):
        raise ValueError(f"unknown backend {backend!r}")
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(SEED)
    model = copy.deepcopy(model).eval()
    with warnings.catch_warnings(), quantized_engine(backend), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qmap = get_default_qconfig_mapping(backend)
        prepared = prepare_fx(model, qmap, (_torch(example_input),))
        for batch in calib_batches:
            prepared(_torch(batch))
        quantized = convert_fx(prepared)
    quantized.qengine = run_engine or backend
    return quantized


# --------------------------------------------------------------------------- ONNX Runtime


class _BatchReader(CalibrationDataReader):
    """Calibration batches fed as input ``input``; rewindable so it can be reused."""

    def __init__(self, batches: Iterable, input_name: str = "input"):
        self._feeds = [{input_name: _np(b)} for b in batches]
        self._it = iter(self._feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._feeds)

    def __len__(self):
        return len(self._feeds)


def ort_configs() -> dict[str, dict]:
    """Named keyword sets for :func:`ort_quantize_static`, e.g. ``u8-MinMax``, ``s8-Entropy-rr``.

    {u8,s8} activations x {MinMax,Percentile,Entropy} x reduce_range (``-rr``: 7-bit weights).
    """
    configs = {}
    for act in ("uint8", "int8"):
        for method in ("MinMax", "Percentile", "Entropy"):
            for rr in (False, True):
                name = f"{'u8' if act == 'uint8' else 's8'}-{method}{'-rr' if rr else ''}"
                configs[name] = dict(
                    per_channel=True, activation_type=act, calibrate_method=method, reduce_range=rr
                )
    return configs


def ort_quantize_static(
    fp32_onnx_path,
    out_path,
    calib_batches: Iterable,
    per_channel: bool = True,
    activation_type: str = "uint8",
    calibrate_method: str = "MinMax",
    reduce_range: bool = False,
    preprocess: bool = True,
    entropy_num_bins: int | None = 2048,
    extra_options: dict | None = None,
) -> str:
    """Quantize an FP32 ONNX model to QDQ format (int8 weights) with ORT's static quantizer.

    ``entropy_num_bins``: quantize_static cannot pass histogram sizes to the Entropy
    calibrator, whose default (128 bins = 128 quantized bins) leaves a single candidate
    threshold, i.e. plain MinMax. When set, Entropy ranges are computed with
    ``create_calibrator`` at this many bins and handed over as a calibration cache.
    ``None`` keeps ORT's behaviour.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activation_type]
    method = getattr(CalibrationMethod, calibrate_method)
    import onnx

    graph = onnx.load(str(fp32_onnx_path), load_external_data=False).graph
    reader = _BatchReader(calib_batches, input_name=graph.input[0].name)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        model_in = str(fp32_onnx_path)
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = os.path.join(tmp, "pre.onnx")
            try:
                quant_pre_process(model_in, pre)
                model_in = pre
            except Exception as e:  # pre-processing is an optimisation, not a requirement
                log.warning("quant_pre_process failed (%s); quantizing the raw model", e)
        cache = None
        if calibrate_method == "Entropy" and entropy_num_bins:
            cache = _entropy_cache(model_in, reader, os.path.join(tmp, "calib.json"), entropy_num_bins)
            reader = None  # ranges come from the cache
        with contextlib.redirect_stdout(io.StringIO()):  # ORT's calibrators print progress
            quantize_static(
                model_in,
                str(out_path),
                reader,
                calibration_cache_path=cache,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=act,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                extra_options=extra_options,
            )
    return str(out_path)


def _entropy_cache(model_path: str, reader, cache_path: str, num_bins: int) -> str:
    """KL-divergence (TensorRT-style) activation ranges with a usable histogram size."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator, save_tensors_data

    with contextlib.redirect_stdout(io.StringIO()):
        calibrator = create_calibrator(
            model_path,
            augmented_model_path=os.path.join(os.path.dirname(cache_path), "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": num_bins, "num_quantized_bins": 128},
        )
        calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), cache_path)
    return cache_path


def ort_session(path, optimized: bool = True, intra_op_num_threads: int = 1):
    """CPU InferenceSession; ``optimized=False`` disables all graph optimisations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_num_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_float_emulated_session(path, intra_op_num_threads: int = 1):
    """Run a QDQ model as float DQ -> op -> Q: no integer-kernel fusion, hence no saturation."""
    return ort_session(path, optimized=False, intra_op_num_threads=intra_op_num_threads)


# --------------------------------------------------------------------------- measurement


def torch_fn(model: torch.nn.Module) -> Callable:
    """Callable batch -> numpy logits for a torch model (honours ``model.qengine``)."""
    engine = getattr(model, "qengine", None)

    def fn(batch):
        with torch.no_grad(), quantized_engine(engine):
            return model(_torch(batch)).numpy()

    return fn


def ort_fn(session) -> Callable:
    """Callable batch -> numpy logits for an ORT session."""
    name = session.get_inputs()[0].name

    def fn(batch):
        return session.run(None, {name: _np(batch)})[0]

    return fn


def _accuracy(fn: Callable, images, labels, batch_size: int) -> float:
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = fn(images[i : i + batch_size])
        correct += int((np.argmax(logits, axis=1) == labels[i : i + batch_size]).sum())
    return 100.0 * correct / max(len(labels), 1)


def accuracy_torch(model: torch.nn.Module, images, labels, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent (model should already be in eval mode)."""
    return _accuracy(torch_fn(model), images, labels, batch_size)


def accuracy_ort(session, images, labels, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    return _accuracy(ort_fn(session), images, labels, batch_size)


def latency_ms(fn: Callable, batch, warmup: int = 5, repeats: int = 30) -> float:
    """Median wall-clock milliseconds of ``fn(batch)``."""
    for _ in range(warmup):
        fn(batch)
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(batch)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
