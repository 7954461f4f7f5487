"""BlockSpec: teacher blocks T_i paired with student blocks S_i, shapes checked on a sample batch."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["BlockSpec", "ShapeMismatchError", "teacher_shapes", "block_seed"]

Shape = Tuple[int, ...]


class ShapeMismatchError(ValueError):
    """A student block does not produce its teacher block's output shape."""


def block_seed(seed: int, index: int) -> int:
    """The seed of everything random that belongs to block ``index`` (its initialisation)."""
    return (seed * 1_000_003 + index * 7_919 + 17) % (2 ** 63)


@torch.no_grad()
def teacher_shapes(teacher: Sequence[nn.Module], sample: torch.Tensor) -> List[Tuple[Shape, Shape]]:
    """Per-sample (input, output) shape of every teacher block on ``sample``."""
    shapes = []
    x = sample
    for block in teacher:
        y = block(x)
        shapes.append((tuple(x.shape[1:]), tuple(y.shape[1:])))
        x = y
    return shapes


@dataclass
class BlockSpec:
    """Teacher blocks and the student blocks trained to mimic them.

    Parameters
    ----------
    teacher : list of nn.Module
        T_0..T_{N-1}, frozen (eval mode, no grad) here.
    student : list of nn.Module
        S_0..S_{N-1}: supernet blocks (with ``choices``/``set_path``) or fixed modules.
    sample : torch.Tensor
        A small input batch; construction runs it through every block (and every candidate of every layer
        of a supernet block) and raises :class:`ShapeMismatchError` naming the block and both shapes.
    """

    teacher: List[nn.Module]
    student: List[nn.Module]
    sample: torch.Tensor = field(repr=False)
    shapes: List[Tuple[Shape, Shape]] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.teacher) != len(self.student):
            raise ValueError(f"{len(self.teacher)} teacher blocks but {len(self.student)} student blocks; "
                             "give one student block per teacher block")
        if not self.teacher:
            raise ValueError("a BlockSpec needs at least one block")
        for block in self.teacher:
            block.eval()
            block.requires_grad_(False)
        self.shapes = teacher_shapes(self.teacher, self.sample)
        self._check_students()

    def __len__(self) -> int:
        return len(self.teacher)

    def _check_students(self) -> None:
        x = self.sample
        for i, ((shape_in, shape_out), student) in enumerate(zip(self.shapes, self.student)):
            probe = copy.deepcopy(student).eval()
            choices = getattr(probe, "choices", {})
            sweeps = max((len(names) for names in choices.values()), default=1)
            for position in range(sweeps):
                if choices:
                    probe.set_path({label: names[min(position, len(names) - 1)] for label, names in choices.items()})
                with torch.no_grad():
                    try:
                        out = probe(torch.zeros((2,) + shape_in, dtype=x.dtype))
                    except RuntimeError as err:
                        raise ShapeMismatchError(
                            f"block {i}: student block fails on the teacher block's input shape {shape_in}: {err}"
                        ) from err
                if tuple(out.shape[1:]) != shape_out:
                    where = f" (path {probe.path})" if choices else ""
                    raise ShapeMismatchError(
                        f"block {i}: student output shape {tuple(out.shape[1:])}{where} != teacher output shape "
                        f"{shape_out} (block input {shape_in}); make S_{i} map {shape_in} to {shape_out}"
                    )
