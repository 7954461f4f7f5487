"""When a block has converged: its epoch loss stopped improving (``distill.until: plateau``)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["plateaued"]


def plateaued(losses: Sequence[float], patience: int, min_improvement: float) -> bool:
    """Whether the last ``patience`` epoch losses all failed to improve on the best before them.

    An epoch improves when its loss is below ``(1 - min_improvement)`` times the best loss of the epochs before it.
    Deterministic in the losses, so every rank (and a resumed run) decides alike.

    Examples
    --------
    >>> plateaued([1.0, 0.5, 0.499, 0.498], patience=2, min_improvement=0.01)
    True
    >>> plateaued([1.0, 0.5, 0.4], patience=2, min_improvement=0.01)
    False
    """
    if len(losses) <= patience:
        return False
    best = min(losses[:-patience])
    return all(not loss < (1.0 - min_improvement) * best for loss in losses[-patience:])
