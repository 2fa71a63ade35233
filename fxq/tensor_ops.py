"""Canonical graph functions that torch has no single spelling for."""
from __future__ import annotations

import torch


def expand_batch(const: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A batch-1 constant (a class token) repeated along ``like``'s batch dimension."""
    return const.expand(like.shape[0], *const.shape[1:])
