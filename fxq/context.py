"""What every pass may read besides the graph: the target, the data and the user's options."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .errors import CalibrationError
from .targets import Target

# What bias_correction measures a layer's error against: its own float weights, or the float model; or
# the float model, kept only if the network's output gets closer to the float model's ("checked").
BIAS_CORRECTION_MODES = ("weights", "empirical", "checked")
# compile()'s default: "weights" alone; "checked" after reconstruct, whose learned rounding is biased on
# purpose (it compensates the error arriving from upstream) and which "weights" would therefore undo;
# none after reconstruct mode "gptq" on quantized inputs, which solves each bias with its weights.
BIAS_CORRECTION_AUTO = {"plain": "weights", "reconstructed": "checked", "bias solved": None}
# How hessian_search scores a candidate step: squared error weighted by the squared task-loss gradient.
# "hessian-activations" leaves the weight steps to choose_formats: a search for round-to-nearest steps
# works against reconstruct="gptq", which rounds with error feedback.
SEARCH_MODES = ("hessian", "hessian-activations")


# What reconstruct learns: rounding + power-of-two steps (RAPQ), or the rounding only (AdaRound).
RECONSTRUCT_MODES = ("rapq", "adaround", "gptq")
# Mode "gptq": the inputs a layer's rounding is fitted on. "float": the float model's (GPTQ); "quantized":
# the quantized model's, upstream layers already rounded, against the float layer's output on the float
# inputs, the bias solved with the weights (passes/reconstruct_gptq).
GPTQ_INPUTS = ("float", "quantized")
# Where learned rounding starts: "float" AdaRound's h(V) = frac(W/Δ); "gptq" the same on GPTQ's
# compensated weights (the soft weights start at those values); "gptq-codes" h(V) within a margin of
# GPTQ's codes (the soft weights start next to the rounding GPTQ chose).
RECONSTRUCT_INITS = ("float", "gptq", "gptq-codes")


# ReconstructOptions' integer options: name, least, greatest (None: no bound), what the error says.
_INTEGER_OPTIONS = (
    ("iters", 1, None, "must be an integer >= 1"),
    ("batch", 1, None, "must be an integer >= 1"),
    ("chain_layers", 1, None, "must be an integer >= 1"),
    ("samples", 0, None, "must be an integer >= 0 (0: every calibration sample)"),
    ("act_search", 0, 4, "must be an integer in 0..4"),
    ("step_search", 0, 4, "must be an integer in 0..4"),
    ("patch", 0, None, "must be an integer >= 0 (output pixels per side; 0: whole maps)"),
)


@dataclass(frozen=True)
class ReconstructOptions:
    mode: str = "rapq"
    iters: int = 2000                 # per block
    batch: int = 32
    samples: int = 1024               # calibration samples cached (0: all)
    time_budget: float | None = None  # seconds for the whole pass
    # rounding variables V; 4e-3, not AdaRound's 1e-3, which converges too slowly at W2A4 (docs/notes/from_code.md)
    lr: float = 4e-3
    exp_lr: float = 1e-2              # exponent variables s (they must be able to cross h = 1/2 in the warm-up)
    act_lr: float = 4e-4              # log2 of the activation steps
    # Once a block is learned, each activation step it learned tries the powers of two this far either
    # side and keeps the one with the least block loss (0: LSQ's value rounded in log2, kept).
    act_search: int = 1
    rounding_weight: float = 0.01     # λ
    beta: tuple = (20.0, 2.0)
    warmup: float = 0.2               # fraction of iters: steps learn, no rounding regulariser
    lp: float | None = None           # None: BN-based p
    bn_p_coeff: float = 2.0
    bn_match: float = 0.0
    qdrop: float = 0.5
    chain_layers: int = 3
    # mode "gptq": H + damp * mean(diag H) * I, GPTQ's 1%: invertible where an input never varies
    damp: float = 0.01
    inputs: str = "float"             # mode "gptq": one of GPTQ_INPUTS
    step_search: int = 0              # GPTQ rounding: each row tries its weight step times 2**j, |j| <= this
    # modes "rapq"/"adaround": where the learned rounding starts. "float": AdaRound's h(V) = frac(W/Δ);
    # "gptq": the weights as GPTQ compensated them before rounding (float-input moments, damp,
    # step_search), so training starts at GPTQ's codes and a block never ends worse than them.
    init: str = "float"
    # modes "rapq"/"adaround": train a convolutional block on crops whose exact output is patch x patch
    # pixels (fxq.passes.calibration.patches) where its output map is at least twice that; 0: whole maps. The before/after
    # losses stay whole-map. Buys iterations where maps are large.
    patch: int = 0
    # modes "rapq"/"adaround": each block's loss is divided by its value before training and the rounding
    # regulariser is averaged over the block's weights instead of summed, so λ weighs the same whatever
    # the activations' magnitude and the layer sizes.
    relative_loss: bool = False

    @property
    def from_gptq(self) -> bool:
        """Learned rounding that starts from GPTQ's (before the first block, weights become GPTQ's)."""
        return self.init in ("gptq", "gptq-codes")

    @property
    def solves_bias(self) -> bool:
        return self.mode == "gptq" and self.inputs == "quantized"

    def __post_init__(self):
        def bad(name, why):
            raise CalibrationError(f"reconstruct option {name}={getattr(self, name)!r} {why}")
        if self.mode not in RECONSTRUCT_MODES:
            bad("mode", f"must be one of {RECONSTRUCT_MODES}")
        if self.inputs not in GPTQ_INPUTS:
            bad("inputs", f"must be one of {GPTQ_INPUTS}")
        if self.init not in RECONSTRUCT_INITS:
            bad("init", f"must be one of {RECONSTRUCT_INITS}")
        for name, low, high, why in _INTEGER_OPTIONS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
                bad(name, why)
        if not isinstance(self.relative_loss, bool):
            bad("relative_loss", "must be True or False")
        # options that only one family of modes reads: set elsewhere, they would be silently ignored
        if self.inputs != "float" and self.mode != "gptq":
            bad("inputs", f"applies to mode 'gptq' only (mode is {self.mode!r})")
        if self.init != "float" and self.mode == "gptq":
            bad("init", "applies to the learned modes 'rapq' and 'adaround' (mode 'gptq' is the GPTQ rounding itself)")
        if self.init == "gptq-codes" and self.mode != "adaround":
            bad("init", f"applies to mode 'adaround' only (mode is {self.mode!r}: it learns the steps, and GPTQ's "
                        f"codes belong to the steps it started from)")
        if self.step_search and self.mode != "gptq" and not self.from_gptq:
            bad("step_search", f"applies to GPTQ rounding only: mode 'gptq' or init 'gptq'/'gptq-codes' (mode is "
                               f"{self.mode!r})")
        for name in ("patch", "relative_loss"):
            if getattr(self, name) and self.mode == "gptq":
                bad(name, "applies to the learned modes 'rapq' and 'adaround' (mode 'gptq' does not train)")
        if self.time_budget is not None and not (isinstance(self.time_budget, (int, float)) and self.time_budget > 0):
            bad("time_budget", "must be None or a positive number of seconds")
        for name in ("lr", "exp_lr", "act_lr", "bn_p_coeff"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                bad(name, "must be a positive number")
        for name in ("rounding_weight", "bn_match", "damp"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0):
                bad(name, "must be a number >= 0")
        if not (isinstance(self.qdrop, (int, float)) and 0 <= self.qdrop < 1):
            bad("qdrop", "must be a probability in [0, 1)")
        if not (isinstance(self.warmup, (int, float)) and 0 <= self.warmup < 1):
            bad("warmup", "must be a fraction in [0, 1)")
        if self.lp is not None and not (isinstance(self.lp, (int, float)) and self.lp > 0):
            bad("lp", "must be None (BN-based) or a positive exponent")
        if len(tuple(self.beta)) != 2 or not all(isinstance(b, (int, float)) and b > 0 for b in self.beta):
            bad("beta", "must be two positive numbers (start, end)")

    @classmethod
    def from_user(cls, value) -> "ReconstructOptions | None":
        """compile(reconstruct=...): None/False, True, a mode name, a dict of options or an instance."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(mode=value)
        if isinstance(value, dict):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise CalibrationError(f"unknown reconstruct option(s) {unknown}; options are {sorted(names)}")
            return cls(**value)
        raise CalibrationError(f"reconstruct={value!r} must be None/False, True, one of {RECONSTRUCT_MODES}, "
                               f"a dict of ReconstructOptions fields or a ReconstructOptions")


@dataclass
class CompileContext:
    target: Target
    example_input: torch.Tensor            # one batch; shapes and dtypes come from it
    calib_batches: list | None = None      # None: data-free formats from BN statistics
    input_range: tuple[float, float] | None = None   # data-free: range of the model's input
    progress: bool = True
    seed: int = 0
    bias_correction: str | None = "weights"   # one of BIAS_CORRECTION_MODES, or None (passes/bias_correction)
    bias_correction_samples: int = 128        # calibration samples it runs (0: all)
    search: str | None = None                 # one of SEARCH_MODES, or None (passes/hessian_search)
    search_samples: int = 32                  # calibration samples the Hessian search runs (0: all)
    reconstruct: ReconstructOptions | None = None     # passes/reconstruct
    reconstruct_history: list = field(default_factory=list)   # written by reconstruct: per-block losses
    notes: list[str] = field(default_factory=list)    # what fxq decided on the user's behalf

    def samples(self, n: int) -> torch.Tensor:
        """A seeded random subset of ``n`` calibration samples (0: all), in their original order
        (photos often come as runs of crops of one image, so the first n would be few images)."""
        x = torch.cat([model_input(b) for b in self.calib_batches])
        if n and x.shape[0] > n:
            idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))[:n]
            x = x[idx.sort().values]
        return x

    def note(self, text: str) -> None:
        self.notes.append(text)


def model_input(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float inputs in ``dtype``; integer inputs (token ids) unchanged."""
    return x.to(dtype) if x.is_floating_point() else x
