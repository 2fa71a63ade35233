"""The fxq command line, driven through click's runner on a model outside the zoo."""
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import fxq

from fxq.cli import main
from fxq.errors import CalibrationError


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()


@pytest.fixture
def saved(tmp_path):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32))
    out = tmp_path / "m.fxq"
    r = CliRunner().invoke(main, ["compile", "test_cli:small_model", "-o", str(out), "--calib-npy", str(calib), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "saved" in r.output
    return out


def test_show_prints_the_integer_graph(saved):
    r = CliRunner().invoke(main, ["show", str(saved)])
    assert r.exit_code == 0
    assert "conv2d_int(" in r.output and "requant(" in r.output and "dequantize(" in r.output


def test_export_writes_a_checked_onnx_model(saved, tmp_path):
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["export", str(saved), "-o", str(out)])
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(onnx.load(str(out)))


def test_report_and_targets(saved):
    r = CliRunner().invoke(main, ["report", str(saved)])
    assert r.exit_code == 0 and "rescales: " in r.output and "0 integer multiply + shift" in r.output
    r = CliRunner().invoke(main, ["targets"])
    assert r.exit_code == 0
    for name in ("shift-int", "fixed-point8", "dfp-cluster"):
        assert name in r.output
    assert "ternary, cluster N=4, u8 scale" in r.output


def test_report_compiles_a_zoo_model_and_plots(tmp_path):
    png = tmp_path / "sqnr.png"
    r = CliRunner().invoke(main, ["report", "resnet", "--target", "dfp-cluster", "--set", "w_bits=4", "--calib", "32",
                                  "--samples", "8", "--plot", str(png), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "mult->acc" in r.output and "97.2%" in r.output and "SQNR dB" in r.output
    assert png.stat().st_size > 0


def test_report_sensitivity_of_a_zoo_model_and_its_refusal_for_a_file(saved):
    r = CliRunner().invoke(main, ["report", "resnet", "--calib", "32", "--samples", "8", "--sensitivity", "--quiet"])
    assert r.exit_code == 0, r.output
    header = next(line for line in r.output.splitlines() if line.startswith("layer"))
    assert "act alone dB" in header and "w alone dB" in header
    r = CliRunner().invoke(main, ["report", str(saved), "--sensitivity"])
    assert r.exit_code != 0 and "--sensitivity runs the model" in r.output


def test_report_of_unknown_source_is_a_usage_error():
    r = CliRunner().invoke(main, ["report", "no-such-model"])
    assert r.exit_code != 0 and "neither a saved .fxq file nor a zoo model" in r.output


def test_compile_with_overrides_and_data_free(tmp_path):
    out = tmp_path / "m.fxq"
    r = CliRunner().invoke(main, ["compile", "test_cli:small_model", "-o", str(out), "--data-free",
                                  "--input-shape", "1,1,12,12", "--input-range", "-1,1", "--set", "w_bits=6", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "note: data-free" in r.output
    r = CliRunner().invoke(main, ["show", str(out)])
    assert "w:i6[" in r.output


def test_bad_override_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(main, ["compile", "test_cli:small_model", "-o", str(tmp_path / "m.fxq"), "--data-free",
                                  "--input-shape", "1,1,12,12", "--set", "w_bits"])
    assert r.exit_code != 0 and "name=value" in r.output


def test_model_outside_zoo_needs_data(tmp_path):
    r = CliRunner().invoke(main, ["compile", "test_cli:small_model", "-o", str(tmp_path / "m.fxq")])
    assert r.exit_code != 0 and "--calib-npy" in r.output


@pytest.mark.parametrize("choice,note", [("weights", "bias correction (weights)"),
                                         ("empirical", "bias correction (empirical)"),
                                         ("checked", "bias correction (checked)"),
                                         ("auto", "bias correction (weights)"), ("off", None)])
def test_compile_bias_correction_option(tmp_path, choice, note):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32))
    out = tmp_path / "m.fxq"
    r = CliRunner().invoke(main, ["compile", "test_cli:small_model", "-o", str(out), "--calib-npy", str(calib),
                                  "--bias-correction", choice, "--quiet"])
    assert r.exit_code == 0, r.output
    notes = fxq.load(out).notes
    assert any(note in n for n in notes) if note else not any("bias correction" in n for n in notes)
    r = CliRunner().invoke(main, ["compile", "test_cli:small_model", "-o", str(out), "--calib-npy", str(calib),
                                  "--bias-correction", "sometimes"])
    assert r.exit_code == 2 and "sometimes" in r.output


def test_compile_reconstruct_options(tmp_path):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32))
    out = tmp_path / "m.fxq"
    r = CliRunner().invoke(main, ["compile", "test_cli:small_model", "-o", str(out), "--calib-npy", str(calib),
                                  "--set", "w_bits=4", "--reconstruct", "rapq", "--recon-iters", "5", "--quiet"])
    assert r.exit_code == 0, r.output
    assert any(n.startswith("reconstruct (rapq)") and "(5 it" in n for n in fxq.load(out).notes)
    r = CliRunner().invoke(main, ["compile", "test_cli:small_model", "-o", str(out), "--calib-npy", str(calib),
                                  "--reconstruct", "rapq", "--recon-iters", "0"])
    assert r.exit_code == 2 and "--recon-iters" in r.output


def test_set_and_recon_set_values_are_python_literals():
    from fxq.cli import _parse_overrides
    got = _parse_overrides(("w_bits=4", "fit_clamps=True", "out_bits = 16", "lr=1e-3", "beta=(20, 2)",
                            "rounding=nearest", "relative_loss=false", "lp=none"))
    assert got == {"w_bits": 4, "fit_clamps": True, "out_bits": 16, "lr": 1e-3, "beta": (20, 2),
                   "rounding": "nearest", "relative_loss": False, "lp": None}
    assert type(got["fit_clamps"]) is bool and type(got["lr"]) is float


def test_compile_recon_set(tmp_path):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32))
    out = tmp_path / "m.fxq"
    base = ["compile", "test_cli:small_model", "-o", str(out), "--calib-npy", str(calib), "--set", "w_bits=4", "--quiet"]
    r = CliRunner().invoke(main, base + ["--reconstruct", "adaround", "--recon-iters", "3", "--recon-set", "init=gptq",
                                         "--recon-set", "relative_loss=true", "--recon-set", "rounding_weight=100"])
    assert r.exit_code == 0, r.output
    assert any(n.startswith("reconstruct (adaround, from GPTQ)") and "(3 it" in n for n in fxq.load(out).notes)
    r = CliRunner().invoke(main, base + ["--recon-set", "init=gptq"])              # no --reconstruct
    assert r.exit_code == 2 and "needs --reconstruct" in r.output
    r = CliRunner().invoke(main, base + ["--reconstruct", "rapq", "--recon-set", "iters=5"])
    assert r.exit_code == 2 and "--recon-iters" in r.output
    r = CliRunner().invoke(main, base + ["--reconstruct", "rapq", "--recon-set", "init"])
    assert r.exit_code == 2 and "name=value" in r.output
    r = CliRunner().invoke(main, base + ["--reconstruct", "rapq", "--recon-set", "temperature=3"])
    assert isinstance(r.exception, CalibrationError) and "temperature" in str(r.exception)
    r = CliRunner().invoke(main, base + ["--reconstruct", "rapq", "--recon-set", "relative_loss=maybe"])
    assert isinstance(r.exception, CalibrationError) and "relative_loss='maybe'" in str(r.exception)
