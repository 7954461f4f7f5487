"""Data sets (digits, synthetic, CIFAR-10, ImageFolder) and the deterministic, shardable sample order.

Importing this package is cheap; torch and torchvision load with the first name used from :mod:`.datasets`, so the
config's data set name check (:mod:`.names`) stays light.
"""

import importlib
from typing import Any

_WHERE = {"build_dataset": "datasets", "make_loader": "datasets", "BatchOrder": "order", "shard": "order",
          "shard_sizes": "order"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
