"""Data sets (digits, synthetic, CIFAR-10, ImageFolder) and the deterministic, shardable sample order.

Importing this package is cheap; torch and torchvision load with the first name used from :mod:`.datasets`, so the
config's data set name check (:mod:`.names`) stays light.
"""

from ..imports import lazy_names

_WHERE = {"build_dataset": "datasets", "make_loader": "datasets", "BatchOrder": "order", "shard": "order",
          "shard_sizes": "order"}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
