"""The cost of one block path: parameters, MACs, CPU latency (budgets live in :mod:`.inputs`, re-exported here)."""

from __future__ import annotations

import statistics
import time
from typing import Dict, Tuple

import torch
from torch import nn

from ..plan.cost import forward_macs
from .inputs import METRICS, Budget, fits, parse_budget, slack_limit

__all__ = ["METRICS", "Budget", "fits", "slack_limit", "parse_budget", "count_params", "frozen_path", "path_params",
           "measure_latency_ms", "module_costs"]


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module`` (shared ones counted once)."""
    return sum(p.numel() for p in module.parameters())


def frozen_path(module: nn.Module) -> nn.Module:
    """``module`` itself, or for a supernet block (``choices``/``path``/``freeze``) its active path frozen: a plain
    module holding the supernet's weights, whatever the space's mutables (candidates, depths, widths)."""
    if getattr(module, "choices", {}):
        return module.freeze(module.path)
    return module


def path_params(module: nn.Module) -> int:
    """Parameters a module uses: of a supernet block, those of its active path frozen (:func:`frozen_path`)."""
    return count_params(frozen_path(module))


@torch.no_grad()
def measure_latency_ms(module: nn.Module, shape_in: Tuple[int, ...], runs: int = 5, warmup: int = 2,
                       min_time_s: float = 2e-3, threads: int = 1) -> float:
    """Median CPU latency (ms) of one forward at batch 1, in eval mode, on ``threads`` torch threads.

    Each of the ``runs`` timings repeats the forward until it lasts ``min_time_s`` (short modules would
    otherwise measure the clock), and reports the time per forward. One thread by default: batch-1 latency of
    small blocks is dominated by thread synchronisation otherwise, and single-thread figures are reproducible on
    a busy machine.
    """
    module = module.eval()
    x = torch.zeros((1,) + tuple(shape_in))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            module(x)
        start = time.perf_counter()
        module(x)
        once = time.perf_counter() - start
        repeat = max(1, int(min_time_s / max(once, 1e-7))) if once < min_time_s else 1
        timings = []
        for _ in range(runs):
            start = time.perf_counter()
            for _ in range(repeat):
                module(x)
            timings.append((time.perf_counter() - start) / repeat)
    finally:
        torch.set_num_threads(previous)
    return 1e3 * statistics.median(timings)


def module_costs(module: nn.Module, shape_in: Tuple[int, ...], latency_runs: int = 5) -> Dict[str, float]:
    """``params``, ``flops`` (MACs of one sample) and ``latency_ms`` (``None`` when ``latency_runs`` is 0) of a
    module on CPU — a plain module, or a supernet block on its active path (measured on that path frozen, see
    :func:`frozen_path`); ``module`` is left in eval mode."""
    module = frozen_path(module.cpu().eval()).eval()
    return {
        "params": path_params(module),
        "flops": forward_macs(module, shape_in),
        "latency_ms": measure_latency_ms(module, shape_in, latency_runs) if latency_runs > 0 else None,
    }
