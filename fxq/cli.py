"""The ``fxq`` command line: demo, compile, show, export, report, targets, passes."""
from __future__ import annotations

import ast
import importlib
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

import fxq
from fxq.context import BIAS_CORRECTION_MODES, RECONSTRUCT_MODES, SEARCH_MODES
from fxq.errors import FxqError


def _load_model(spec: str) -> torch.nn.Module:
    """A zoo name (``resnet``) or ``package.module:attr`` naming a module or a zero-argument factory."""
    from fxq import zoo
    if spec in zoo.names():
        return zoo.load(spec)
    if ":" not in spec:
        raise click.BadParameter(f"{spec!r} is neither a zoo model {zoo.names()} nor 'module:attribute'")
    mod_name, attr = spec.split(":", 1)
    obj = getattr(importlib.import_module(mod_name), attr)
    model = obj() if not isinstance(obj, torch.nn.Module) else obj
    if not isinstance(model, torch.nn.Module):
        raise click.BadParameter(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


_WORDS = {"true": True, "false": False, "none": None}


def _parse_value(text: str):
    """A Python literal (``4``, ``1e-3``, ``True``, ``(20, 2)``; ``true``/``false``/``none`` too), else the
    text itself, so that ``rounding=nearest`` needs no quotes."""
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_overrides(items: tuple[str, ...], option: str = "--set", example: str = "w_bits=4") -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{option} {item!r} must look like name=value (e.g. {example})")
        out[key.strip()] = _parse_value(value.strip())
    return out


_bias_correction_option = click.option(
    "--bias-correction", type=click.Choice(["auto", *BIAS_CORRECTION_MODES, "off"]), default="auto",
    show_default=True, help="Cancel each layer's mean output error on calibration data (auto: weights, or "
                            "checked after --reconstruct).")


_search_option = click.option(
    "--search", type=click.Choice([*SEARCH_MODES, "off"]), default="off", show_default=True,
    help="Re-choose steps by the task-loss-weighted (Hessian-guided) error; hessian-activations: activation "
         "steps only (with --reconstruct gptq).")


_reconstruct_options = [
    click.option("--reconstruct", type=click.Choice([*RECONSTRUCT_MODES, "off"]), default="off", show_default=True,
                 help="Reconstruction: rapq (block-wise rounding + power-of-two steps), adaround (block-wise rounding only) "
                      "or gptq (layer-wise rounding in closed form, seconds)."),
    click.option("--recon-iters", type=click.IntRange(min=1), default=None,
                 help="Reconstruction iterations per block (default: fxq's)."),
    click.option("--recon-budget", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Reconstruction time budget in seconds for the whole model."),
    click.option("--recon-set", "recon_overrides", multiple=True,
                 help="Any other reconstruction option (fxq.ReconstructOptions), e.g. --recon-set init=gptq "
                      "(repeatable)."),
]


def _reconstruct_arg(mode: str, iters, budget, overrides: tuple[str, ...] = ()):
    extra = _parse_overrides(overrides, "--recon-set", "init=gptq")
    if mode == "off":
        if extra:
            raise click.UsageError(f"--recon-set {sorted(extra)} needs --reconstruct rapq, adaround or gptq")
        return None
    for key, given in (("mode", "--reconstruct"), ("iters", "--recon-iters"), ("time_budget", "--recon-budget")):
        if key in extra:
            raise click.UsageError(f"--recon-set {key}=... : use {given}")
    opts = {"mode": mode, **extra}
    if iters is not None:
        opts["iters"] = iters
    if budget is not None:
        opts["time_budget"] = budget
    return opts


def _bc(choice: str):
    return None if choice == "off" else choice


def _fmnist_split(calib: int, seed: int):
    """Calibration images from the training set and the full test set; or the bundled 500-image subset."""
    from fxq import data
    if data.fashion_mnist_available():
        train_x, _ = data.load_fashion_mnist("train")
        idx = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:calib]
        test_x, test_y = data.load_fashion_mnist("test")
        return train_x[idx], test_x, test_y, "calibration: Fashion-MNIST train, evaluation: full test set"
    x, y = data.load_test_subset()
    half = len(x) // 2
    return (x[:min(calib, half)], x[half:], y[half:],
            "Fashion-MNIST package not installed (`make fashion-mnist`): calibration on bundled test images "
            f"0..{half - 1}, evaluation on {half}..{len(x) - 1}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(fxq.__version__, prog_name="fxq")
def main():
    """fxq: compile PyTorch models to shift-only integer graphs, run them bit-exactly, export ONNX QDQ."""


@main.command()
@click.option("--model", "model_name", default="resnet", show_default=True, help="Zoo model.")
@click.option("--target", default="shift-int", show_default=True)
@click.option("--calib", default=512, show_default=True, help="Calibration images.")
@click.option("--seed", default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(model_name, target, calib, seed, quiet):
    """Compile a bundled model, print its integer graph, accuracy and the three-executor check."""
    from fxq import zoo
    from fxq.evaluate import agreeing, batched, executor_codes
    model = zoo.load(model_name)
    calib_x, test_x, test_y, provenance = _fmnist_split(calib, seed)
    click.echo(f"model: {model_name} ({zoo.provenance(model_name).get('fp32_test_accuracy', '?')}% FP32 recorded); {provenance}")
    t0 = time.perf_counter()
    qm = fxq.compile(model, calib_x, target=target, progress=not quiet, seed=seed)
    click.echo(f"compiled for {target} in {time.perf_counter() - t0:.1f} s\n")
    click.echo(qm.ir)
    with torch.no_grad():
        fp32 = batched(lambda b: model(b).numpy(), test_x, desc="fp32", progress=not quiet)
    codes, _ = executor_codes(qm, test_x, progress=not quiet)
    ref = codes["reference"]
    y = test_y.numpy()
    acc = lambda logits: 100.0 * float((logits.argmax(1) == y).mean())  # noqa: E731
    n = len(y)
    click.echo(f"\naccuracy on {n} test images: FP32 {acc(fp32):.2f}%   {target} {acc(ref):.2f}%   "
               f"delta {acc(ref) - acc(fp32):+.2f} points")
    same = agreeing(codes)
    click.echo(f"exactness: reference == onnxruntime == fake-quant on {int(same.sum())}/{n} images "
               f"({100.0 * same.mean():.2f}%), output codes compared bit for bit")
    for note in qm.notes:
        click.echo(f"note: {note}")


@main.command("compile")
@click.argument("model_spec")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Where to save (.fxq).")
@click.option("--target", default="shift-int", show_default=True)
@click.option("--calib", default=512, show_default=True, help="Calibration images (zoo models: Fashion-MNIST).")
@click.option("--calib-npy", type=click.Path(exists=True, dir_okay=False), help="Calibration inputs as an .npy array [N, ...].")
@click.option("--data-free", is_flag=True, help="No calibration data: formats from BatchNorm statistics.")
@click.option("--input-shape", help="Data-free: input shape, e.g. 1,1,28,28.")
@click.option("--input-range", help="Data-free: input value range, e.g. -0.81,2.02.")
@click.option("--set", "overrides", multiple=True, help="Target field override, e.g. --set w_bits=4 (repeatable).")
@_bias_correction_option
@_search_option
@_reconstruct_options[0]
@_reconstruct_options[1]
@_reconstruct_options[2]
@_reconstruct_options[3]
@click.option("--quiet", is_flag=True)
def compile_cmd(model_spec, output, target, calib, calib_npy, data_free, input_shape, input_range, overrides,
                bias_correction, search, reconstruct, recon_iters, recon_budget, recon_overrides, quiet):
    """Compile MODEL_SPEC (a zoo name or module:attribute) and save it."""
    from fxq import zoo
    kwargs = _parse_overrides(overrides)
    recon = _reconstruct_arg(reconstruct, recon_iters, recon_budget, recon_overrides)
    model = _load_model(model_spec)
    if data_free:
        if input_shape:
            kwargs["input_shape"] = tuple(int(v) for v in input_shape.split(","))
        elif model_spec in zoo.names():
            kwargs["input_shape"] = (1, 1, 28, 28)
        if input_range:
            kwargs["input_range"] = tuple(float(v) for v in input_range.split(","))
        data = None
    elif calib_npy:
        data = torch.from_numpy(np.load(calib_npy, allow_pickle=False)).float()
    elif model_spec in zoo.names():
        data = _fmnist_split(calib, 0)[0]
    else:
        raise click.UsageError("give --calib-npy FILE or --data-free for a model outside the zoo")
    qm = fxq.compile(model, data, target=target, progress=not quiet, bias_correction=_bc(bias_correction),
                     search=_bc(search), reconstruct=recon, **kwargs)
    qm.save(output)
    click.echo(f"saved {output}: {len(qm.ir.nodes)} IR nodes, target {target}")
    for note in qm.notes:
        click.echo(f"note: {note}")


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def show(path):
    """Print the integer graph of a saved model."""
    click.echo(fxq.load(path).ir)


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="ONNX file to write.")
def export(path, output):
    """Export a saved model as an ONNX QDQ model."""
    qm = fxq.load(path)
    model = qm.export_onnx(output)
    click.echo(f"wrote {output}: {len(model.graph.node)} ONNX nodes, opset {model.opset_import[0].version}")


@main.command()
@click.argument("source")
@click.option("--target", default="shift-int", show_default=True, help="Target, when SOURCE is a model to compile.")
@click.option("--set", "overrides", multiple=True, help="Target field override, e.g. --set w_bits=4 (repeatable).")
@click.option("--calib", default=512, show_default=True, help="Calibration images (zoo models).")
@click.option("--samples", default=256, show_default=True, help="Held-out images SQNR is measured on.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Also write a per-layer SQNR chart (PNG; needs matplotlib).")
@click.option("--sensitivity", is_flag=True, help="Also the output SQNR with only one row's codes (or its layer's "
              "weights) quantized: which quantizer limits the output (one forward pass per quantizer).")
@_bias_correction_option
@click.option("--quiet", is_flag=True)
def report(source, target, overrides, calib, samples, plot, sensitivity, bias_correction, quiet):
    """Per-layer formats, shifts, multiplications replaced and SQNR.

    SOURCE is a saved .fxq model (formats and shifts only: the float model is not in the file) or a zoo
    model name, which is compiled for --target and measured against float on held-out images.
    """
    from fxq import zoo
    if source in zoo.names():
        calib_x, test_x, _, _ = _fmnist_split(calib, 0)
        qm = fxq.compile(zoo.load(source), calib_x, target=target, progress=not quiet,
                         bias_correction=_bc(bias_correction), **_parse_overrides(overrides))
        rep = qm.report(test_x[:samples], sensitivity=sensitivity, progress=not quiet)
    elif Path(source).is_file():
        if sensitivity:
            raise click.BadParameter("--sensitivity runs the model in float and quantized, and a saved .fxq file "
                                     "holds only the integer graph: pass a zoo model name", param_hint="SOURCE")
        rep = fxq.load(source).report()
    else:
        raise click.BadParameter(f"{source!r} is neither a saved .fxq file nor a zoo model {zoo.names()}")
    click.echo(rep)
    if plot:
        rep.plot(plot)
        click.echo(f"wrote {plot}")


@main.command()
def targets():
    """List the registered hardware targets."""
    from fxq.report import format_table
    rows = [t.as_row() for t in fxq.targets().values()]
    click.echo(format_table(rows, list(rows[0])))


@main.command()
def passes():
    """List the pipeline's passes in order: when each runs, what it requires and writes (key?: where found)."""
    from fxq.passes import PIPELINE
    from fxq.report import format_table
    rows = PIPELINE.rows()
    click.echo(format_table(rows, list(rows[0])))


@main.command()
def ops():
    """List the integer IR's ops: what each does, its attributes (= default) and its kind properties."""
    from fxq.ops import table
    from fxq.report import format_table
    rows = [{"op": r["op"], "attributes": ", ".join(r["attrs"]) or "-", "kinds": ", ".join(r["kinds"]) or "-",
             "what it does": r["doc"]} for r in table()]
    click.echo(format_table(rows, list(rows[0])))


def run():
    """Entry point that turns fxq's own errors into one clear line and exit status 1."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (FxqError, FileNotFoundError) as exc:
        click.echo(f"fxq: error: {exc}", err=True)
        sys.exit(1)
