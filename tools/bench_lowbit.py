"""make bench (low-bit part): shift-int at W8A8, W4A4 and W2A4 on the Fashion-MNIST zoo, from naive
power-of-two rounding to Hessian search and reconstruction, with a float-scale reconstruction beside it.

Rows per model and bit width (first/last layers keep 8-bit weights, the image, the last layer's input
and the logits keep 8-bit codes: ``edge_w_bits=8, edge_a_bits=8``; W2 weights are the four levels
-2..1, ``w_full_range``):

- naive: no-clip power-of-two exponents (``exp_search_radius=0``), no bias correction;
- fxq's default formats: squared-error exponent search and bias correction, no search or reconstruction;
- + Hessian search: the naive start, steps re-chosen by the gradient-weighted error;
- + float-scale reconstruction: AdaRound on the int8 target at the same bits (dyadic 8-bit-mantissa
  scales, i.e. float scales to 0.4%; affine activations), the BRECQ/AdaRound-style reference;
- + RAPQ reconstruction: Hessian search, then power-of-two reconstruction (options as first measured);
  and the same with ``act_search=1`` (each block's learned activation steps re-chosen by block loss),
  or with a 4x rounding learning rate (``lr=4e-3``). These rows and the float-scale row keep
  ``bias_correction="weights"`` and AdaRound's rounding lr 1e-3 (unless named), which they were
  first measured with;
- the rows "…, checked bias correction" take compile's default after reconstruction ("auto" =
  "checked": the empirical correction, kept only if the network output gets closer to the float one);
  with a rounding lr 4e-3, and with activation step search or 3000 iterations where the label says;
- + GPTQ reconstruction: each layer rounded in closed form against its inputs' second moments
  (``reconstruct="gptq"``, fxq's default formats, no Hessian search), and the same with
  ``fit_clamps=True`` (ReLU6 outputs rescaled so the clamp is the top code), and each layer fitted on the
  quantized model's inputs with its bias (``inputs="quantized"``; compile's "auto" bias correction is off),
  and that with each channel's weight step re-chosen by the output error of its rounding (``step_search=1``);
- RAPQ reconstruction whose learned rounding starts from GPTQ's compensated weights (``init="gptq"``).

Accuracy on the full test set, wall time of the compile, and the three-executor exactness on the first
``--exact`` test images. Writes docs/bench/lowbit.md/.json; ``--part NAME`` writes
docs/bench/lowbit_parts/NAME.json and ``--merge`` combines such parts into docs/bench/lowbit.md/.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

ROOT = Path(__file__).resolve().parent.parent

from bench import BENCH_DIR, fashion_mnist_split  # noqa: E402

import fxq  # noqa: E402
from fxq import zoo  # noqa: E402
from fxq.evaluate import agreeing, batched, executor_codes  # noqa: E402

EDGES = {"edge_w_bits": 8, "edge_a_bits": 8}
BITS = {"W8A8": {"w_bits": 8, "a_bits": 8}, "W4A4": {"w_bits": 4, "a_bits": 4, **EDGES},
        "W2A4": {"w_bits": 2, "a_bits": 4, "w_full_range": True, **EDGES},
        # Not in `make bench`: W4A4 split into its weight part and its activation part, to see where a
        # model's 4-bit loss comes from (`--bits W4A8 W8A4`).
        "W4A8": {"w_bits": 4, "a_bits": 8, **EDGES}, "W8A4": {"w_bits": 8, "a_bits": 4, **EDGES}}
MAIN_BITS = ["W8A8", "W4A4", "W2A4"]


def methods(bits: dict, recon: dict) -> list[tuple[str, str, dict]]:
    """(row label, target, compile kwargs) for one bit width. Each row pins the options it was first
    measured with where fxq's defaults have moved since: unless its label names them, bias correction
    "weights", rounding lr 1e-3 and no activation step search."""
    weights = {"bias_correction": "weights"}
    old = {**recon, "lr": 1e-3, "act_search": 0}          # reconstruct options before 2026-12-02
    new = {**recon, "lr": 4e-3, "act_search": 0}
    rapq = {"search": "hessian"}
    return [
        ("naive power-of-two (no-clip exponents)", "shift-int",
         {**bits, "exp_search_radius": 0, "bias_correction": None}),
        ("fxq default formats (squared-error exponents, bias correction)", "shift-int", {**bits}),
        ("+ Hessian search", "shift-int", {**bits, "exp_search_radius": 0, "bias_correction": None,
                                           "search": "hessian"}),
        ("+ float-scale reconstruction (AdaRound, int8 dyadic scales)", "int8",
         {**bits, **weights, "reconstruct": {**old, "mode": "adaround"}}),
        ("+ RAPQ power-of-two reconstruction", "shift-int",
         {**bits, **weights, **rapq, "reconstruct": {**old, "mode": "rapq"}}),
        ("+ RAPQ power-of-two reconstruction, activation step search ±1", "shift-int",
         {**bits, **weights, **rapq, "reconstruct": {**old, "mode": "rapq", "act_search": 1}}),
        ("+ RAPQ power-of-two reconstruction, rounding lr 4e-3", "shift-int",
         {**bits, **weights, **rapq, "reconstruct": {**new, "mode": "rapq"}}),
        ("+ RAPQ power-of-two reconstruction, checked bias correction", "shift-int",
         {**bits, **rapq, "reconstruct": {**old, "mode": "rapq"}}),
        ("+ RAPQ power-of-two reconstruction, rounding lr 4e-3, checked bias correction", "shift-int",
         {**bits, **rapq, "reconstruct": {**new, "mode": "rapq"}}),
        ("+ RAPQ power-of-two reconstruction, rounding lr 4e-3, checked bias correction, activation step search ±1",
         "shift-int", {**bits, **rapq, "reconstruct": {**new, "mode": "rapq", "act_search": 1}}),
        ("+ RAPQ power-of-two reconstruction, rounding lr 4e-3, checked bias correction, 3000 iterations",
         "shift-int", {**bits, **rapq, "reconstruct": {**new, "mode": "rapq", "iters": 3000}}),
        ("+ GPTQ reconstruction (layer-wise, closed form), checked bias correction", "shift-int",
         {**bits, "reconstruct": {"mode": "gptq"}}),
        ("+ clamp fit + GPTQ reconstruction, checked bias correction", "shift-int",
         {**bits, "fit_clamps": True, "reconstruct": {"mode": "gptq"}}),
        ("+ GPTQ reconstruction on quantized inputs (bias solved)", "shift-int",
         {**bits, "reconstruct": {"mode": "gptq", "inputs": "quantized"}}),
        ("+ GPTQ reconstruction on quantized inputs (bias solved), weight step search ±1", "shift-int",
         {**bits, "reconstruct": {"mode": "gptq", "inputs": "quantized", "step_search": 1}}),
        ("+ RAPQ power-of-two reconstruction started from GPTQ, rounding lr 4e-3, checked bias correction, "
         "activation step search ±1", "shift-int",
         {**bits, **rapq, "reconstruct": {**new, "mode": "rapq", "act_search": 1, "init": "gptq"}}),
    ]


def selected(label: str, wanted: list[str]) -> bool:
    """``--methods``: a full row label picks that row only; anything else is a prefix."""
    labels = {lab for lab, _, _ in methods({}, {})}
    return any(label == m if m in labels else label.startswith(m) for m in wanted)


def _acc(logits: np.ndarray, y: np.ndarray) -> float:
    return round(100.0 * float((logits.argmax(1) == y).mean()), 2)


def bench_model(name, calib_x, test_x, test_y, args) -> list[dict]:
    y = test_y.numpy()
    model = zoo.load(name)
    fp32 = _acc(batched(lambda b: model(b).detach().numpy(), test_x), y)
    rows = [{"model": name, "bits": "W32A32", "method": "FP32", "accuracy": fp32, "delta": 0.0, "seconds": 0.0,
             "exact": None}]
    print(f"  FP32 {fp32:.2f}", flush=True)
    recon = {"iters": args.iters} if args.iters else {}
    for bits_name in args.bits:
        for label, target, kwargs in methods(BITS[bits_name], recon):
            if args.methods and not selected(label, args.methods):
                continue
            t0 = time.perf_counter()
            qm = fxq.compile(model, calib_x, target, progress=False, **kwargs)
            secs = time.perf_counter() - t0
            acc = _acc(batched(lambda b: qm(b).detach().numpy(), test_x), y)
            codes, _ = executor_codes(qm, test_x[: args.exact])
            exact = round(100.0 * float(agreeing(codes).mean()), 2)
            row = {"model": name, "bits": bits_name, "method": label, "target": target, "accuracy": acc,
                   "delta": round(acc - fp32, 2), "seconds": round(secs, 1), "exact": exact,
                   "notes": [n for n in qm.notes if n.startswith(("reconstruct", "hessian"))]}
            rows.append(row)
            print(f"  {bits_name} {label:<62} acc {acc:6.2f} ({acc - fp32:+.2f})  {secs:7.1f} s  exact {exact}",
                  flush=True)
    return rows


def recovered(rows: list[dict]) -> list[str]:
    """Share of the naive-to-FP32 gap each reconstruction closes, per model and bits."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        fp32 = next(r["accuracy"] for r in rows if r["model"] == model and r["bits"] == "W32A32")
        for bits in dict.fromkeys(r["bits"] for r in rows if r["model"] == model and r["bits"] != "W32A32"):
            mine = {r["method"]: r["accuracy"] for r in rows if r["model"] == model and r["bits"] == bits}
            naive = next((v for k, v in mine.items() if k.startswith("naive")), None)
            if naive is None or fp32 - naive <= 0.5:        # (the W4A8/W8A4 split rows have no naive row)
                continue
            parts = [f"{k.removeprefix('+ ').split(' (')[0]} {100 * (v - naive) / (fp32 - naive):.0f}%"
                     for k, v in mine.items() if "reconstruction" in k]
            out.append(f"{model} {bits}: " + ", ".join(parts))
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    """The table and its footer; a merged table lists each part's command."""
    parts = meta.get("parts")
    how = (f"in {len(parts)} runs of tools/bench_lowbit.py, one per part, merged with `{meta['command']}` (the first "
           f"part with a row gives it)" if parts else f"with `{meta['command']}`")
    where = " Each part's command:" if parts else ""
    out = ["| model | bits | method | accuracy % | Δ vs FP32 | compile s | exact % |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        exact = f"{r['exact']:.2f}" if r["exact"] is not None else "–"
        out.append(f"| {r['model']} | {r['bits']} | {r['method']} | {r['accuracy']:.2f} | {r['delta']:+.2f} | "
                   f"{r['seconds']:.1f} | {exact} |")
    out += ["", "Gap to FP32 closed from naive rounding: " + "; ".join(recovered(rows)) + ".",
            "", f"\"exact\" = reference backend == ONNX Runtime on the export == float64 fake-quant, output codes, on "
            f"the first {meta['exact_images']} test images. Edges (first/last layer weights, image, last layer's "
            f"input, logits) stay 8-bit below W8A8; W2 weights are the four codes -2..1. Reconstruction: "
            f"{meta['recon']}.",
            f"Measured {meta['date']} {how} on {meta['machine']} "
            f"(torch {meta['torch']}, onnxruntime {meta['onnxruntime']}); test set: {meta['test_images']} images, "
            f"calibration: {meta['calib_images']} training images." + where]
    if parts:
        out += [""] + [f"- {part}: `{cmd}`" for part, cmd in parts]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=zoo.cnn_names())
    p.add_argument("--bits", nargs="+", default=MAIN_BITS, choices=list(BITS))
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--iters", type=int, default=None, help="reconstruction iterations per block (default: fxq's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--exact", type=int, default=2000, help="test images the three executors are compared on")
    p.add_argument("--out", type=Path, default=BENCH_DIR)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 each when models run side by side)")
    p.add_argument("--methods", nargs="+", metavar="PREFIX",
                   help="only these rows: a full label picks that row, anything else is a prefix "
                        "(e.g. '+ RAPQ'); a part to merge")
    p.add_argument("--part", metavar="NAME", help="write docs/bench/lowbit_parts/NAME.json only (merge with --merge)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="combine part files (docs/bench/lowbit_parts/*.json) into docs/bench/lowbit.md/.json")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    calib_x, test_x, test_y = fashion_mnist_split(args.calib, args.limit)
    rows = []
    for name in args.models:
        print(f"[{name}]", flush=True)
        rows += bench_model(name, calib_x, test_x, test_y, args)
    full = argv is None and len(sys.argv) == 1
    opts = fxq.ReconstructOptions(**({"iters": args.iters} if args.iters else {}))
    meta = {"date": dt.date.today().isoformat(), "command": "make bench" if full
            else "python tools/bench_lowbit.py " + shlex.join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "test_images": len(test_x),
            "calib_images": len(calib_x), "exact_images": min(args.exact, len(test_x)),
            "recon": f"{opts.iters} iterations per block, batch {opts.batch}, {opts.samples} samples, "
                     f"QDrop {opts.qdrop}, BN-based p (c = {opts.bn_p_coeff}); rounding lr, activation step "
                     f"search and bias correction per row (its label, tools/bench_lowbit.py)"}
    if args.part:
        meta["command"] = "python tools/bench_lowbit.py " + shlex.join(sys.argv[1:])
        (args.out / "lowbit_parts").mkdir(parents=True, exist_ok=True)
        (args.out / "lowbit_parts" / f"{args.part}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, meta)
    suffix = "" if full or not (args.limit or args.iters) else "_partial"
    (args.out / f"lowbit{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / f"lowbit{suffix}.md").write_text("# fxq low-bit benchmark\n\n" + md + "\n")
    print("\n" + md)


def merge(parts: list[Path], out: Path) -> None:
    """One table from part files run side by side (each with its own command, recorded in the table).
    A row measured in more than one part comes from the first part that has it."""
    loaded = [json.loads(p.read_text()) for p in parts]
    rows, seen = [], set()
    for d in loaded:
        for r in d["rows"]:
            key = (r["model"], r["bits"], r["method"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    order = {b: i for i, b in enumerate(["W32A32", *BITS])}
    labels = ["FP32"] + [label for label, _, _ in methods({}, {})]
    models = list(dict.fromkeys(r["model"] for r in rows))
    rows.sort(key=lambda r: (models.index(r["model"]), order[r["bits"]], labels.index(r["method"])))
    meta = dict(loaded[0]["meta"])
    recon: dict[str, list[str]] = {}                 # each distinct reconstruction setting, with its runs
    for d in loaded:
        runs = recon.setdefault(d["meta"]["recon"], [])
        runs += [k for k in dict.fromkeys(f"{r['model']} {r['bits']}" for r in d["rows"] if r["bits"] != "W32A32")
                 if k not in runs]
    meta["recon"] = next(iter(recon)) if len(recon) == 1 else "; ".join(
        f"{text} ({', '.join(runs)})" for text, runs in recon.items())
    names = [str(p.relative_to(ROOT)) if p.is_absolute() else str(p) for p in parts]
    meta["parts"] = [(Path(n).stem.removeprefix("bench_lowbit_"), d["meta"]["command"]) for n, d in zip(names, loaded)]
    meta["command"] = "python tools/bench_lowbit.py --merge " + " ".join(names)
    meta["date"] = ", ".join(sorted({d["meta"]["date"] for d in loaded}))
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, meta)
    (out / "lowbit.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "lowbit.md").write_text("# fxq low-bit benchmark\n\n" + md + "\n")
    print(md)


if __name__ == "__main__":
    main()
