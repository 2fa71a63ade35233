"""What every pass may read besides the graph: the target, the data and the user's options."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .targets import Target

# What bias_correction measures a layer's error against: its own float weights, or the float model.
BIAS_CORRECTION_MODES = ("weights", "empirical")
# How hessian_search scores a candidate step: squared error weighted by the squared task-loss gradient.
SEARCH_MODES = ("hessian",)


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
    reconstruct: object = None                # a ReconstructOptions, or None (passes/reconstruct)
    notes: list[str] = field(default_factory=list)    # what fxq decided on the user's behalf

    def samples(self, n: int) -> torch.Tensor:
        """A seeded random subset of ``n`` calibration samples (0: all), in their original order
        (photos often come as runs of crops of one image, so the first n would be few images)."""
        x = torch.cat([b.float() for b in self.calib_batches])
        if n and x.shape[0] > n:
            idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))[:n]
            x = x[idx.sort().values]
        return x

    def note(self, text: str) -> None:
        self.notes.append(text)
