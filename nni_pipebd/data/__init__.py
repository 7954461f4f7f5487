"""Data sets (digits, synthetic, CIFAR-10, ImageFolder) and the deterministic, shardable sample order."""

from .datasets import build_dataset, make_loader
from .order import BatchOrder, shard, shard_sizes

__all__ = ["build_dataset", "make_loader", "BatchOrder", "shard", "shard_sizes"]
