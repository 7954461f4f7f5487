"""Estimated per-block cost (multiply-accumulates) — deterministic, so every process derives the same plan."""

from __future__ import annotations

import copy
from typing import List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["layer_macs", "forward_macs", "estimate_block_costs", "job_block_costs", "STUDENT_STEP_FACTOR"]

STUDENT_STEP_FACTOR = 3.0
"""Forward + backward of a student block is about three forwards."""


_COUNTED = (nn.Conv2d, nn.Linear, nn.MultiheadAttention)


def layer_macs(module: nn.Module, out_numel: int) -> int:
    """Multiply-accumulates of one convolution, linear layer or multi-head attention (its four projections; torch.fx
    does not enter it) producing ``out_numel`` values (0 for other layers)."""
    if isinstance(module, nn.MultiheadAttention):
        return out_numel * (2 * module.embed_dim + module.kdim + module.vdim)  # self-attention: as many keys as queries
    if isinstance(module, nn.Conv2d):
        return out_numel * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
    if isinstance(module, nn.Linear):
        return out_numel * module.in_features
    return 0


@torch.no_grad()
def forward_macs(module: nn.Module, shape_in: Tuple[int, ...]) -> int:
    """Multiply-accumulates of convolutions and linear layers in one forward of one sample."""
    total = 0

    def count(m: nn.Module, _, out: torch.Tensor) -> None:
        nonlocal total
        total += layer_macs(m, (out[0] if isinstance(out, tuple) else out).numel())

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, _COUNTED)]
    try:
        module(torch.zeros((1,) + tuple(shape_in)))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def estimate_block_costs(teacher: Sequence[nn.Module], student: Sequence[nn.Module],
                         shapes: Sequence[Tuple[Tuple[int, ...], Tuple[int, ...]]]) -> List[Tuple[float, float]]:
    """Per block: (teacher forward MACs, ``STUDENT_STEP_FACTOR`` x student forward MACs averaged over candidates).

    A supernet block (``choices`` / ``freeze``) is measured on frozen paths, so mixed operators count the sliced
    widths they run, not their largest ones.
    """
    costs = []
    for t, s, (shape_in, _) in zip(teacher, student, shapes):
        choices = getattr(s, "choices", {})
        if choices:  # a supernet block: path p takes candidate p of every label, each path measured frozen
            width = max(len(values) for values in choices.values())
            student_macs = 0.0
            for position in range(width):
                path = {label: values[position % len(values)] for label, values in choices.items()}
                student_macs += forward_macs(s.freeze(path).eval(), shape_in)
            student_macs /= width
        else:
            student_macs = forward_macs(copy.deepcopy(s).eval(), shape_in)
        costs.append((float(forward_macs(t, shape_in)), STUDENT_STEP_FACTOR * student_macs))
    return costs


def job_block_costs(job) -> List[Tuple[float, float]]:
    """(teacher, student) cost per block: ``execution.block_costs`` (e.g. measured) if given, else MAC estimates."""
    given = job.config.execution.block_costs
    if given is None:
        spec = job.spec
        return estimate_block_costs(spec.teacher, spec.student, spec.shapes)
    if len(given) != job.num_blocks or any(not isinstance(c, (list, tuple)) or len(c) != 2 for c in given):
        raise ValueError(f"execution.block_costs must hold one [teacher, student] pair per block "
                         f"({job.num_blocks} blocks), got {given!r}")
    return [(float(t), float(s)) for t, s in given]
