"""Whether this process is a rank started by torchrun (or another ``env://`` launcher); standard library only."""

from __future__ import annotations

import os

__all__ = ["under_torchrun"]


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another env:// launcher)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
