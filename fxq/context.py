"""What every pass may read besides the graph: the target, the data and the user's options."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .targets import Target

# What bias_correction measures a layer's error against: its own float weights, or the float model.
BIAS_CORRECTION_MODES = ("weights", "empirical")


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
    notes: list[str] = field(default_factory=list)    # what fxq decided on the user's behalf

    def note(self, text: str) -> None:
        self.notes.append(text)
