"""make bench, transformer part: the zoo ViT at W8A8 and W6A6, naive against twin-uniform + Hessian search.

On the full Fashion-MNIST test set (10k real images), calibration on 512 training images, every row in
one run: FP32; fxq "naive" (per-tensor power-of-two weights and activations at the no-clip step, one
uniform step after softmax/GELU, no bias correction: PTQ4ViT's base PTQ on a shift-only target);
fxq twin-uniform + Hessian-guided search (fxq's shift-int defaults plus ``search="hessian"``); each
with the nonlinearities as float64 islands and with fxq's integer-only kernels; and torch.ao FX PTQ and
ONNX Runtime quantize_static side by side. Accuracy is the integer reference backend's; "exact %" is
reference == ONNX Runtime on the export == float64 fake-quant, output codes, on the first --exact
test images. Writes docs/bench/vit.md/.json (with --part NAME, docs/bench/vit_NAME.md/.json).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

ROOT = Path(__file__).resolve().parent.parent

import baselines  # noqa: E402
from bench import BENCH_DIR, fashion_mnist_split  # noqa: E402

import fxq  # noqa: E402
from fxq import zoo  # noqa: E402
from fxq.evaluate import agreeing, batched, executor_codes  # noqa: E402

NAIVE = {"w_granularity": "tensor", "exp_search_radius": 0, "twin_uniform": (), "bias_correction": None}
TWIN_HESSIAN = {"search": "hessian"}
ISLANDS = {"float islands": {"float_islands": "all"}, "integer-only": {"float_islands": ()}}
BITS = {"W8A8": {"w_bits": 8, "a_bits": 8}, "W6A6": {"w_bits": 6, "a_bits": 6}}
METHODS = {"naive per-tensor": NAIVE, "twin-uniform + Hessian": TWIN_HESSIAN}


def _acc(logits: np.ndarray, y: np.ndarray) -> float:
    return round(100.0 * float((logits.argmax(1) == y).mean()), 2)


def run(name: str, calib_x, test_x, test_y, tmp: Path, exact_n: int, bits_list, threads: int,
        methods=tuple(METHODS), nonlinears=tuple(ISLANDS), baselines_too: bool = True) -> list[dict]:
    y = test_y.numpy()
    model = zoo.load(name)
    fp32 = _acc(batched(lambda b: model(b).detach().numpy(), test_x), y)
    rows = [{"model": name, "method": "FP32 (torch)", "bits": "W32A32", "nonlinear": "float32", "accuracy": fp32,
             "delta": 0.0, "seconds": 0.0, "exact": None, "float_islands": None}]

    def add(method, bits, nonlinear, logits, seconds, exact=None, islands=None):
        acc = _acc(logits, y)
        rows.append({"model": name, "method": method, "bits": bits, "nonlinear": nonlinear, "accuracy": acc,
                     "delta": round(acc - fp32, 2), "seconds": round(seconds, 1), "exact": exact,
                     "float_islands": islands})
        print(f"  {method:<40} {bits:<5} {nonlinear:<13} acc {acc:6.2f}  delta {acc - fp32:+.2f}  {seconds:6.1f} s",
              flush=True)

    for bits in bits_list:
        for method, kw in ((m, METHODS[m]) for m in methods):
            for nonlinear, island_kw in ((n, ISLANDS[n]) for n in nonlinears):
                t0 = time.perf_counter()
                qm = fxq.compile(model, calib_x, "shift-int", progress=False, **BITS[bits], **kw, **island_kw)
                secs = time.perf_counter() - t0
                logits = batched(qm.run, test_x)
                codes, _ = executor_codes(qm, test_x[:exact_n])
                add(f"fxq {method}", bits, nonlinear, logits, secs, round(100 * float(agreeing(codes).mean()), 2),
                    qm.report().summary["float islands"])

    if not baselines_too:
        return rows
    for cfg_name in ("x86_per_channel",):
        cfg = baselines.torch_ao_fx_configs()[cfg_name]
        try:
            t0 = time.perf_counter()
            qmodel = baselines.torch_ao_fx_int8(model, list(calib_x.split(64)), test_x[:1], **cfg)
            secs = time.perf_counter() - t0
            add(f"torch.ao FX PTQ ({cfg_name})", "W8A8", "float", batched(baselines.torch_fn(qmodel), test_x), secs)
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            print(f"  torch.ao FX {cfg_name}: failed: {type(exc).__name__}: {exc}")
    logging.getLogger().setLevel(logging.ERROR)      # quantize_static warns once per LayerNorm weight
    fp32_onnx = tmp / f"{name}_fp32.onnx"
    baselines.export_fp32_onnx(model, test_x[:1], fp32_onnx)
    for cfg_name in ("u8-MinMax", "s8-MinMax"):
        out = tmp / f"{name}_ort_{cfg_name}.onnx"
        try:
            t0 = time.perf_counter()
            baselines.ort_quantize_static(fp32_onnx, out, list(calib_x.split(64)), **baselines.ort_configs()[cfg_name])
            secs = time.perf_counter() - t0
            sess = baselines.ort_session(out, intra_op_num_threads=threads)
            add(f"ORT quantize_static ({cfg_name})", "W8A8", "float", batched(baselines.ort_fn(sess), test_x), secs)
        except Exception as exc:  # noqa: BLE001
            print(f"  ORT quantize_static {cfg_name}: failed: {type(exc).__name__}: {exc}")
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    out = ["| model | method | bits | softmax/GELU/LayerNorm | accuracy % | Δ vs FP32 | compile s | exact % | "
           "float islands |", "|" + "---|" * 9]
    for r in rows:
        exact = f"{r['exact']:.2f}" if r.get("exact") is not None else "–"
        islands = "–" if r.get("float_islands") is None else str(r["float_islands"])
        out.append(f"| {r['model']} | {r['method']} | {r['bits']} | {r['nonlinear']} | {r['accuracy']:.2f} | "
                   f"{r['delta']:+.2f} | {r['seconds']:.1f} | {exact} | {islands} |")
    out += ["", f"\"exact\": reference backend == ONNX Runtime on the export == float64 fake-quant, output codes, on "
            f"the first {meta['exact_images']} test images. Accuracy: the integer reference backend on all "
            f"{meta['test_images']} test images.",
            f"Measured {meta['date']} with `{meta['command']}` on {meta['machine']} (torch {meta['torch']}, "
            f"onnxruntime {meta['onnxruntime']}); calibration: {meta['calib_images']} training images."]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit")
    p.add_argument("--bits", nargs="+", default=list(BITS), choices=list(BITS))
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--exact", type=int, default=1000, help="test images for the three-executor check")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=BENCH_DIR)
    p.add_argument("--no-readme", action="store_true", help="no effect: README.md is never written (kept so "
                   "recorded commands still run)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--nonlinear", nargs="+", default=list(ISLANDS), choices=list(ISLANDS))
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--part", default=None, help="write docs/bench/vit_<part>.md/.json instead of vit.md/.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    calib_x, test_x, test_y = fashion_mnist_split(args.calib, args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[{args.model}]", flush=True)
        rows = run(args.model, calib_x, test_x, test_y, Path(tmp), min(args.exact, len(test_x)), args.bits,
                   args.threads, args.methods, args.nonlinear, not args.no_baselines)
    meta = {"date": dt.date.today().isoformat(),
            "command": shlex.join(["python", "tools/bench_vit.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "test_images": len(test_x), "calib_images": len(calib_x),
            "exact_images": min(args.exact, len(test_x))}
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, meta)
    stem = "vit" + (f"_{args.part}" if args.part else "")
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / f"{stem}.md").write_text("# fxq benchmark: vision transformer\n\n" + md + "\n")
    print("\n" + md)


if __name__ == "__main__":
    main()
