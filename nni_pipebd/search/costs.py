"""Budgets (``params=N``, ``flops=N``, ``latency_ms=X``) and the cost of one block path: parameters, MACs, CPU latency."""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import nn

from ..plan.cost import forward_macs
from .errors import BudgetError

__all__ = ["METRICS", "Budget", "fits", "slack_limit", "parse_budget", "count_params", "frozen_path", "path_params",
           "measure_latency_ms", "module_costs"]

METRICS = ("params", "flops", "latency_ms")
"""Budgetable metrics: parameter count, multiply-accumulates of one sample's forward, CPU latency at batch 1."""

_SUFFIX = {"": 1.0, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgG]?)\s*$")


@dataclass(frozen=True)
class Budget:
    """An upper bound on one metric of the whole network.

    Parameters
    ----------
    metric : str
        ``params``, ``flops`` (multiply-accumulates, the usual "FLOPs" of NAS papers) or ``latency_ms``.
    limit : float
        The largest allowed value (inclusive).
    """

    metric: str
    limit: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise BudgetError(f"unknown budget metric {self.metric!r}; valid: {list(METRICS)}")
        if not self.limit >= 0:
            raise BudgetError(f"budget {self.metric}={self.limit!r} must be a number >= 0")

    def fits(self, cost: float) -> bool:
        """Whether ``cost`` is within the budget (see :func:`fits`)."""
        return fits(cost, self.limit)

    def __str__(self) -> str:
        return f"{self.metric}={self.limit:g}"


def fits(cost: float, limit: float) -> bool:
    """Whether ``cost <= limit``, with a relative slack of 1e-9 that absorbs the float summation order."""
    return cost <= slack_limit(limit)


def slack_limit(limit: float) -> float:
    """The largest cost :func:`fits` accepts under ``limit``."""
    return limit * (1 + 1e-9) + 1e-12


def parse_budget(text: str) -> Budget:
    """Parse ``METRIC=VALUE``, e.g. ``params=2.5M``, ``flops=3e7``, ``latency_ms=4``.

    ``VALUE`` is a non-negative number with an optional suffix ``k``, ``M`` or ``G`` (x1e3, x1e6, x1e9).

    Raises
    ------
    BudgetError
        Naming the text and the valid metrics.
    """
    hint = f"write METRIC=VALUE with METRIC one of {list(METRICS)}, e.g. params=2.5M, flops=3e7, latency_ms=4"
    if not isinstance(text, str) or text.count("=") != 1:
        raise BudgetError(f"budget {text!r} is not METRIC=VALUE; {hint}")
    metric, value = (part.strip() for part in text.split("="))
    if metric not in METRICS:
        raise BudgetError(f"budget {text!r} has unknown metric {metric!r}; {hint}")
    match = _NUMBER.match(value)
    if match is None:
        raise BudgetError(f"budget {text!r}: {value!r} is not a non-negative number; {hint}")
    return Budget(metric, float(match.group(1)) * _SUFFIX[match.group(2)])


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
