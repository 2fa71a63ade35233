"""make bench: fxq against FP32, torch.ao FX PTQ and ONNX Runtime quantize_static, in one run.

For every zoo model, on the full Fashion-MNIST test set (10k real images), calibration on 512 training
images: accuracy, compile/calibration seconds, ONNX Runtime latency at batch 1 and 64 (FP32 vs fxq's
export vs ORT's own quantized model), reference-backend throughput and the three-executor exactness
rate. Writes docs/bench/cnn.md and docs/bench/cnn.json (README.md's summary table is copied by hand).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "docs" / "bench"     # every bench tool writes its tables here

import baselines  # noqa: E402

import fxq  # noqa: E402
from fxq import data, zoo  # noqa: E402
from fxq.backends import onnx_qdq  # noqa: E402
from fxq.evaluate import agreeing, batched, executor_codes  # noqa: E402

# (row label, target, bits, overrides; None = data-free). Cluster targets keep 8-bit first/last layers.
# Calibrated rows use fxq's default bias correction ("weights"); two rows show each target without it.
FXQ_CONFIGS = [
    ("fxq shift-int (calibrated)", "shift-int", "W8A8", {}),
    ("fxq shift-int (calibrated, no bias correction)", "shift-int", "W8A8", {"bias_correction": None}),
    ("fxq shift-int (data-free, BN statistics)", "shift-int", "W8A8", None),
    ("fxq fixed-point8 (F8Net std rule)", "fixed-point8", "W8A8", {}),
    ("fxq int8 (affine, integer multiplier + shift)", "int8", "W8A8", {}),
    ("fxq int8 (no bias correction)", "int8", "W8A8", {"bias_correction": None}),
    ("fxq dfp-cluster 4-bit, N=4", "dfp-cluster", "W4A8", {"w_bits": 4}),
    ("fxq dfp-cluster ternary, N=4", "dfp-cluster", "W2A8", {}),
]


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _acc(logits: np.ndarray, y: np.ndarray) -> float:
    return round(100.0 * float((logits.argmax(1) == y).mean()), 2)


def bench_model(name: str, calib_x, test_x, test_y, tmp: Path, threads: int) -> list[dict]:
    y = test_y.numpy()
    model = zoo.load(name)
    rows = []
    fp32_logits = batched(lambda b: model(b).detach().numpy(), test_x)
    fp32 = _acc(fp32_logits, y)
    fp32_onnx = tmp / f"{name}_fp32.onnx"
    baselines.export_fp32_onnx(model, test_x[:1], fp32_onnx)
    fp32_sess = baselines.ort_session(fp32_onnx, intra_op_num_threads=threads)
    lat_fp32 = {b: baselines.latency_ms(baselines.ort_fn(fp32_sess), test_x[:b]) for b in (1, 64)}
    rows.append({"model": name, "method": "FP32 (torch)", "bits": "W32A32", "accuracy": fp32, "delta": 0.0,
                 "seconds": 0.0, "lat1_ms": lat_fp32[1], "lat64_ms": lat_fp32[64], "exact": None})

    def add(method, bits, logits, seconds, lat=None, exact=None, extra=None):
        acc = _acc(logits, y)
        row = {"model": name, "method": method, "bits": bits, "accuracy": acc, "delta": round(acc - fp32, 2),
               "seconds": round(seconds, 1), "lat1_ms": lat[1] if lat else None,
               "lat64_ms": lat[64] if lat else None, "exact": exact}
        row.update(extra or {})
        rows.append(row)
        print(f"  {method:<44} {bits:<6} acc {acc:6.2f}  delta {acc - fp32:+.2f}  {seconds:7.1f} s", flush=True)

    # fxq: every target (calibrated), and shift-int data-free from the BN statistics
    data_free = {"calib_data": None, "input_shape": (1, 1, 28, 28),
                 "input_range": (float(data.normalize(np.zeros(1, np.uint8))[0]),
                                 float(data.normalize(np.full(1, 255, np.uint8))[0]))}
    for label, target, bits, kwargs in FXQ_CONFIGS:
        kwargs = dict(data_free) if kwargs is None else {"calib_data": calib_x, **kwargs}
        qm, secs = _timed(lambda: fxq.compile(model, target=target, progress=False, **kwargs))
        codes, exec_secs = executor_codes(qm, test_x)
        ref_codes, ref_secs = codes["reference"], exec_secs["reference"]
        same = float(agreeing(codes).mean())
        path = tmp / f"{name}_fxq.onnx"
        qm.export_onnx(path)
        sess = onnx_qdq.session(path, threads=threads)
        lat = {b: baselines.latency_ms(lambda t: sess.run(None, {"input": t.numpy()}), test_x[:b]) for b in (1, 64)}
        replaced = qm.report().summary["multiplications replaced by accumulations"]
        add(label, bits, ref_codes, secs, lat, round(100 * same, 2),
            {"ref_images_per_s": round(len(test_x) / ref_secs, 1), "mults_replaced": replaced.split("(")[-1].rstrip(")")})

    # torch.ao FX PTQ
    for cfg_name, cfg in baselines.torch_ao_fx_configs().items():
        try:
            qmodel, secs = _timed(lambda: baselines.torch_ao_fx_int8(model, list(calib_x.split(64)), test_x[:1], **cfg))
            logits = batched(baselines.torch_fn(qmodel), test_x)
            add(f"torch.ao FX PTQ ({cfg_name})", "W8A8", logits, secs)
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            print(f"  torch.ao FX {cfg_name}: failed: {exc}")

    # ONNX Runtime quantize_static (QDQ, per-channel, MinMax) with ORT's kernels and float-emulated
    for cfg_name in ("u8-MinMax", "s8-MinMax"):
        cfg = baselines.ort_configs()[cfg_name]
        out = tmp / f"{name}_ort_{cfg_name}.onnx"
        try:
            _, secs = _timed(lambda: baselines.ort_quantize_static(fp32_onnx, out, list(calib_x.split(64)), **cfg))
        except Exception as exc:  # noqa: BLE001
            print(f"  ORT quantize_static {cfg_name}: failed: {exc}")
            continue
        sess = baselines.ort_session(out, intra_op_num_threads=threads)
        lat = {b: baselines.latency_ms(baselines.ort_fn(sess), test_x[:b]) for b in (1, 64)}
        add(f"ORT quantize_static ({cfg_name}, ORT kernels)", "W8A8", batched(baselines.ort_fn(sess), test_x), secs, lat)
        emu = baselines.ort_float_emulated_session(out, intra_op_num_threads=threads)
        add(f"ORT quantize_static ({cfg_name}, float-emulated)", "W8A8", batched(baselines.ort_fn(emu), test_x), secs)
    for r in rows:
        if r["lat1_ms"] is not None:
            r["lat1_ratio"] = round(r["lat1_ms"] / lat_fp32[1], 2)
            r["lat64_ratio"] = round(r["lat64_ms"] / lat_fp32[64], 2)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    head = ("| model | method | bits | accuracy % | Δ vs FP32 | compile s | ORT latency b=1 (×FP32) | "
            "ORT latency b=64 (×FP32) | exact % | mults → adds |")
    out = [head, "|" + "---|" * 10]
    for r in rows:
        lat = lambda k, rk: f"{r[k]:.2f} ms ({r[rk]:.2f}×)" if r.get(k) is not None else "–"  # noqa: E731
        exact = f"{r['exact']:.2f}" if r.get("exact") is not None else "–"
        out.append(f"| {r['model']} | {r['method']} | {r['bits']} | {r['accuracy']:.2f} | {r['delta']:+.2f} | "
                   f"{r['seconds']:.1f} | {lat('lat1_ms', 'lat1_ratio')} | {lat('lat64_ms', 'lat64_ratio')} | {exact} | "
                   f"{r.get('mults_replaced') or '–'} |")
    ref = [f"{r['model']} {r['method'].removeprefix('fxq ')}: {r['ref_images_per_s']}" for r in rows
           if r.get("ref_images_per_s")]
    out += ["", "\"exact\" = reference backend == ONNX Runtime on the export == float64 fake-quant, output codes, "
            "every test image. \"mults → adds\": share of the products done as additions (cluster targets; "
            "first and last layers stay 8-bit).",
            "", f"Reference backend throughput (numpy, images/s): {'; '.join(ref)}.",
            f"Measured {meta['date']} with `{meta['command']}` on {meta['machine']} "
            f"(torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, {meta['threads']} ORT thread(s)); "
            f"test set: {meta['test_images']} images, calibration: {meta['calib_images']} training images."]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=zoo.cnn_names())
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=BENCH_DIR)
    p.add_argument("--no-readme", action="store_true", help="no effect: README.md is never written (kept so "
                   "recorded commands still run)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    calib_x, test_x, test_y = fashion_mnist_split(args.calib, args.limit)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"[{name}]", flush=True)
            rows += bench_model(name, calib_x, test_x, test_y, Path(tmp), args.threads)
    meta = {"date": dt.date.today().isoformat(), "command": "make bench" if argv is None and len(sys.argv) == 1
            else "python tools/bench.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
            "test_images": len(test_x), "calib_images": len(calib_x)}
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, meta)
    (args.out / "cnn.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "cnn.md").write_text("# fxq benchmark\n\n" + md + "\n")
    print("\n" + md)


def fashion_mnist_split(calib: int, limit: int | None):
    """Seeded calibration images from the training set and the (first ``limit``) test images."""
    if not data.fashion_mnist_available():
        sys.exit("bench needs the real Fashion-MNIST test set: `make fashion-mnist` (Debian dataset-fashion-mnist)")
    train_x, _ = data.load_fashion_mnist("train")
    calib_x = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:calib]]
    test_x, test_y = data.load_fashion_mnist("test")
    if limit:
        test_x, test_y = test_x[:limit], test_y[:limit]
    return calib_x, test_x, test_y


if __name__ == "__main__":
    main()
