"""Per-block distillation losses: each a mean over samples, so a batch split k ways averages back exactly."""

from __future__ import annotations

from typing import Callable, Dict

import torch

__all__ = ["LOSSES", "get_loss", "mse", "nmse"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements (DNA's block loss)."""
    return torch.nn.functional.mse_loss(student, teacher)


def nmse(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample MSE divided by the teacher output's mean square, averaged over the batch.

    Scale-free, so losses of blocks with different activation magnitudes are comparable (DNA normalises block
    losses before summing them in its search; DONNA's noise-to-signal ratio is the same quantity).
    """
    err = (student - teacher).pow(2).flatten(1).mean(1)
    power = teacher.pow(2).flatten(1).mean(1).clamp_min(eps)
    return (err / power).mean()


LOSSES: Dict[str, LossFn] = {"mse": mse, "nmse": nmse}


def get_loss(name: str) -> LossFn:
    """The loss function called ``name``."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {sorted(LOSSES)}") from None
