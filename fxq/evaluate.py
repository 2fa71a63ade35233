"""Running a compiled model over many inputs: batching, and the three executors' output codes."""
from __future__ import annotations

import time

import numpy as np
from tqdm.auto import tqdm

EXECUTORS = ("reference", "fake_quant", "onnxruntime")


def batched(fn, x, batch: int = 500, desc: str | None = None, progress: bool = False) -> np.ndarray:
    """``fn`` over ``x`` in batches, outputs concatenated (bounds memory for 10k-image test sets)."""
    starts = range(0, len(x), batch)
    return np.concatenate([fn(x[i:i + batch]) for i in tqdm(starts, desc=desc, disable=not progress, leave=False)])


def executor_codes(qm, x, batch: int = 500, progress: bool = False) -> tuple[dict, dict]:
    """Output codes of the reference backend, the float64 fake-quant model and ONNX Runtime (one
    session, default options) on ``x``; and the seconds each took."""
    from .backends import onnx_qdq
    sess = onnx_qdq.session(onnx_qdq.build(qm.ir))
    fns = {"reference": qm.run_codes, "fake_quant": qm.fake_codes,
           "onnxruntime": lambda b: onnx_qdq.session_codes(qm.ir, sess, b)}
    codes, seconds = {}, {}
    for name in EXECUTORS:
        t0 = time.perf_counter()
        codes[name] = batched(fns[name], x, batch, desc=name, progress=progress)
        seconds[name] = time.perf_counter() - t0
    return codes, seconds


def agreeing(codes: dict) -> np.ndarray:
    """Per sample: True where every executor's codes equal the reference's."""
    ref = codes["reference"]
    return np.all([(c == ref).reshape(len(ref), -1).all(axis=1) for c in codes.values()], axis=0)
