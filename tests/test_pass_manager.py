"""The pass manager: PIPELINE's declarations, the runner's checks of them, `when` gating, `fxq passes`."""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import fxq
import fxq.passes
from conftest import tiny
from fxq import meta
from fxq.cli import main
from fxq.context import CompileContext, ReconstructOptions
from fxq.errors import PassError
from fxq.passes import PIPELINE, canonicalize, fold_bn, propagate_shapes, reconstruct
from fxq.pipeline import CHECK_ENV, PassSpec, Pipeline, checks_on, run_passes
from fxq.targets import get_target
from fxq.trace import trace

X = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
PASS_FILES = sorted(p.stem for p in Path(fxq.passes.__file__).parent.glob("*.py") if p.stem != "__init__")


def ctx(target="shift-int", calib=True, example=X[:1], **kw):
    return CompileContext(get_target(target), example, [X] if calib else None, progress=False, **kw)


# --- the pipeline as printed ---------------------------------------------------------------------

def test_every_pass_file_is_one_pipeline_entry_in_order():
    names = [s.name for s in PIPELINE]
    assert sorted(names) == PASS_FILES
    assert names.index("insert_fake_quant") < names.index("reconstruct_gptq") < names.index("reconstruct") \
        < names.index("bias_correction") < names.index("fit_shift_range")


def test_fxq_passes_prints_one_line_per_pass_with_when_requires_writes():
    r = CliRunner().invoke(main, ["passes"])
    assert r.exit_code == 0, r.output
    header, rule, *lines = r.output.rstrip("\n").splitlines()
    assert header.split() == ["pass", "runs", "when", "requires", "writes"] and set(rule) <= {"-", " "}
    assert [line.split()[0] for line in lines] == [s.name for s in PIPELINE]
    by_name = {line.split()[0]: line for line in lines}
    assert "reconstruct mode 'gptq'" in by_name["reconstruct_gptq"]
    assert "'rapq' or 'adaround'" in by_name["reconstruct"]
    assert "no calibration data" in by_name["data_free_stats"]
    assert by_name["canonicalize"].split()[1] == "always"
    assert "choose_formats, share_scales" in by_name["insert_fake_quant"]
    assert "fxq.role, fxq.observer, fxq.fused_act?" in by_name["insert_observers"]


def test_every_required_pass_comes_earlier_and_every_key_is_a_meta_key():
    keys = {v for k, v in vars(meta).items() if k.isupper() and isinstance(v, str)}
    for i, spec in enumerate(PIPELINE):
        earlier = {s.name for s in PIPELINE[:i]}
        for req in spec.requires:
            assert req in keys or req in earlier, (spec.name, req)
        assert set(spec.writes + spec.may_write) <= keys, spec.name


def test_pipeline_finds_an_entry_by_function_name_or_spec():
    i = PIPELINE.index(reconstruct)
    assert PIPELINE.index("reconstruct") == PIPELINE.index(PIPELINE[i]) == i
    with pytest.raises(ValueError, match="no pass 'nope'"):
        PIPELINE.index("nope")
    with pytest.raises(TypeError, match="once"):
        Pipeline((PassSpec(fold_bn), PassSpec(fold_bn)))


def test_a_when_predicate_must_say_in_words_when():
    with pytest.raises(TypeError, match="docstring"):
        PassSpec(fold_bn, when=lambda c: True)


# --- the runner's checks ---------------------------------------------------------------------------

def forgets_kind(gm, c):
    """A broken canonicalize: rewrites the graph, then drops the meta[KIND] it declares."""
    gm = canonicalize(gm, c)
    for n in gm.graph.nodes:
        n.meta.pop(meta.KIND, None)
    return gm


def test_the_test_suite_runs_with_checks_on():
    assert checks_on()


def test_a_declared_write_the_pass_does_not_do_is_caught():
    spec = PassSpec(forgets_kind, writes=(meta.KIND,))
    with pytest.raises(PassError, match=r"pass 'forgets_kind'.*writes meta\['fxq.kind'\].*no node carries it"):
        run_passes(trace(tiny("residual")), ctx(), [spec])
    honest = PassSpec(canonicalize, writes=(meta.KIND, meta.SHAPE))     # canonicalize writes no shapes
    with pytest.raises(PassError, match=r"pass 'canonicalize'.*meta\['fxq.shape'\]"):
        run_passes(trace(tiny("residual")), ctx(), [honest])


def test_a_write_the_pass_does_not_declare_is_caught():
    specs = [PassSpec(canonicalize, writes=(meta.KIND,)), PassSpec(propagate_shapes)]
    with pytest.raises(PassError, match=r"pass 'propagate_shapes' \(after canonicalize\) wrote meta\['fxq.shape'\]"):
        run_passes(trace(tiny("residual")), ctx(), specs)


def test_a_requirement_not_met_is_caught():
    with pytest.raises(PassError, match=r"pass 'fold_bn' \(after nothing\) requires meta\['fxq.kind'\]"):
        run_passes(trace(tiny("residual")), ctx(), [PIPELINE[PIPELINE.index(fold_bn)]])
    needs_shapes = PassSpec(fold_bn, requires=("propagate_shapes",), writes=(meta.BN_STATS,))
    with pytest.raises(PassError, match=r"pass 'fold_bn' \(after canonicalize\) requires pass 'propagate_shapes'"):
        run_passes(trace(tiny("residual")), ctx(), [PassSpec(canonicalize, writes=(meta.KIND,)), needs_shapes])


def test_a_pass_that_changed_nothing_need_not_show_its_writes():
    """fold_bn on a model without BatchNorm: nothing to fold, no meta[BN_STATS], no violation."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()).eval()
    gm = run_passes(trace(model), ctx(), PIPELINE[: PIPELINE.index(fold_bn) + 1])
    assert not any(meta.BN_STATS in n.meta for n in gm.graph.nodes)


def test_checks_follow_the_environment_and_the_argument(monkeypatch):
    spec = PassSpec(forgets_kind, writes=(meta.KIND,))
    run_passes(trace(tiny("residual")), ctx(), [spec], check=False)
    monkeypatch.setenv(CHECK_ENV, "0")
    run_passes(trace(tiny("residual")), ctx(), [spec])
    with pytest.raises(PassError):
        run_passes(trace(tiny("residual")), ctx(), [spec], check=True)
    monkeypatch.setenv(CHECK_ENV, "1")
    with pytest.raises(PassError):
        run_passes(trace(tiny("residual")), ctx(), [spec])


def test_the_whole_pipeline_keeps_its_declarations():
    for c in (ctx(), ctx(calib=False, input_range=(-3.0, 3.0)), ctx("int8"), ctx("dfp-cluster")):
        run_passes(trace(tiny("residual")), c, PIPELINE, check=True)


# --- `when`: the same passes run as when each pass decided for itself -------------------------------

def old_decision(name: str, c: CompileContext) -> bool:
    """Each pass's own check before the pass manager (a skip was `return gm` at the top of the pass),
    and reconstruct's dispatch of mode "gptq" to reconstruct_gptq."""
    t, data, rec = c.target, c.calib_batches is not None, c.reconstruct
    return {
        "token_masks": not c.example_input.is_floating_point(),
        "fit_clamp_range": t.fit_clamps and t.scale_kind != "dyadic",
        "calibrate": data,
        "data_free_stats": not data,
        "hessian_search": c.search is not None and data,
        "reconstruct_gptq": rec is not None and data and rec.mode == "gptq",
        "reconstruct": rec is not None and data and rec.mode != "gptq",
        "bias_correction": data and c.bias_correction is not None,
        "fit_shift_range": t.scale_kind != "dyadic",
    }.get(name, True)


COMBOS = list(itertools.product(sorted(fxq.targets()), (True, False), (None, "hessian", "hessian-activations"),
                                (None, "rapq", "adaround", "gptq"), (None, "weights", "checked")))


def combo_ctx(target, calib, search, recon, bc, example=X[:1]):
    return ctx(target, calib, example, search=search, bias_correction=bc,
               reconstruct=None if recon is None else ReconstructOptions(mode=recon))


def test_when_matches_the_passes_old_decisions():
    ids = torch.zeros(1, 6, dtype=torch.long)
    checked = 0
    for combo in COMBOS:
        for example in (X[:1], ids):
            c = combo_ctx(*combo, example=example)
            for spec in PIPELINE:
                assert bool(spec.runs(c)) == bool(old_decision(spec.name, c)), (spec.name, combo)
                checked += 1
    assert checked == len(COMBOS) * 2 * len(PIPELINE)


def recording(ran: list):
    """PIPELINE with every pass replaced by one that records its name and changes nothing."""
    def stub(fn):
        @functools.wraps(fn)
        def run(gm, c):
            ran.append(fn.__name__)
            return gm
        return run
    return [dataclasses.replace(s, fn=stub(s.fn)) for s in PIPELINE]


@pytest.mark.parametrize("combo", [("shift-int", True, None, "gptq", None),
                                   ("shift-int", True, "hessian", "rapq", "checked"),
                                   ("int8", True, None, "adaround", "weights"),
                                   ("fixed-point8", False, None, None, "weights")])
def test_the_runner_runs_exactly_the_passes_whose_when_holds(combo):
    ran: list = []
    run_passes(trace(tiny("residual")), combo_ctx(*combo), recording(ran), check=False)
    c = combo_ctx(*combo)
    assert ran == [s.name for s in PIPELINE if old_decision(s.name, c)]
    assert ("reconstruct_gptq" in ran) == (combo[3] == "gptq")
    assert ("reconstruct" in ran) == (combo[3] in ("rapq", "adaround"))


def test_gptq_mode_runs_reconstruct_gptq_and_not_the_learned_reconstruction():
    """The slice up to reconstruct holds both entries (reconstruct_gptq comes first); only GPTQ's rounding runs."""
    c = combo_ctx("shift-int", True, None, "gptq", None)
    c = dataclasses.replace(c, reconstruct=ReconstructOptions(mode="gptq", samples=8))
    run_passes(trace(copy.deepcopy(tiny("residual"))), c, PIPELINE[: PIPELINE.index(reconstruct) + 1])
    notes = [n for n in c.notes if n.startswith("reconstruct")]
    assert len(notes) == 1 and "layer(s) rounded against their float input moments" in notes[0]
