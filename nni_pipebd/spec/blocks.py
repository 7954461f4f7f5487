"""BlockSpec: teacher blocks T_i paired with student blocks S_i, shapes checked on a sample batch."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

from ..precision import autocast, cast_dtype, formatted

__all__ = ["BlockSpec", "ShapeMismatchError", "teacher_shapes", "teacher_dtypes", "block_seed"]

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


@torch.no_grad()
def teacher_dtypes(teacher: Sequence[nn.Module], sample: torch.Tensor, device: torch.device,
                   precision: str = "fp32", channels_last: bool = False) -> List[Tuple[torch.dtype, torch.dtype]]:
    """(input, output) dtype of every teacher block on ``device`` under ``precision``'s autocast.

    Measured, not assumed: autocast keeps some ops in fp32 (and CPU and CUDA autocast keep different ones), so the
    probe runs where the blocks will run, cast as they will run (``fp64``: blocks and data in float64). Block 0's
    input is ``sample``'s dtype (the data's) after that cast. Each block visits ``device`` for its probe and returns
    to where it was, in the dtype it had.
    """
    dtypes = []
    dtype = cast_dtype(precision)
    x = formatted(sample[:1].to(device, dtype), channels_last)
    for block in teacher:
        state = list(block.parameters()) + list(block.buffers())
        home = next((t.device for t in state), device)
        home_dtype = next((t.dtype for t in state if t.is_floating_point()), None) if dtype else None
        block.to(device, dtype)
        try:
            with autocast(precision, device):
                y = block(x)
        finally:
            block.to(home, home_dtype)
        dtypes.append((x.dtype, y.dtype))
        x = formatted(y, channels_last)
    return dtypes


@dataclass
class BlockSpec:
    """Teacher blocks and the student blocks trained to mimic them.

    Parameters
    ----------
    teacher : list of nn.Module
        T_0..T_{N-1}, frozen (eval mode, no grad) here.
    student : list of nn.Module
        S_0..S_{N-1}: supernet blocks (with ``choices``/``set_path``, e.g. ``BlockSupernet``) or fixed modules.
    sample : torch.Tensor
        A small input batch; construction runs it through every block (and every candidate of every label of a
        supernet block) and raises :class:`ShapeMismatchError` naming the block, the label and both shapes.
    """

    teacher: List[nn.Module]
    student: List[nn.Module]
    sample: torch.Tensor = field(repr=False)
    shapes: List[Tuple[Shape, Shape]] = field(init=False)
    _dtypes: Dict[Tuple[str, str, bool], List[Tuple[torch.dtype, torch.dtype]]] = field(
        init=False, default_factory=dict, repr=False)

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

    def dtypes(self, device: torch.device, precision: str = "fp32",
               channels_last: bool = False) -> List[Tuple[torch.dtype, torch.dtype]]:
        """Per block, the dtypes of the teacher's input and output on ``device`` under ``precision`` (cached):
        what relayed activations and their receive buffers hold."""
        key = (str(device), precision, channels_last)
        if key not in self._dtypes:
            self._dtypes[key] = teacher_dtypes(self.teacher, self.sample, torch.device(device), precision,
                                               channels_last)
        return self._dtypes[key]

    def _check_students(self) -> None:
        """Run every student block on its teacher block's input shape, every candidate of every label at least once.

        A supernet block runs ``max(len(candidates))`` paths: path ``p`` takes candidate ``min(p, n - 1)`` of each
        label. A failing path is narrowed down to the label whose value breaks it (that value on top of the first
        candidate of every other label), and the error names the block, that label and both shapes.
        """
        for i, ((shape_in, shape_out), student) in enumerate(zip(self.shapes, self.student)):
            probe = copy.deepcopy(student).eval()
            choices = getattr(probe, "choices", {})
            sweeps = max((len(values) for values in choices.values()), default=1)
            for position in range(sweeps):
                path = {label: values[min(position, len(values) - 1)] for label, values in choices.items()}
                problem = _run(probe, path, shape_in, shape_out, self.sample.dtype)
                if problem is not None:
                    where = _culprit(probe, path, choices, shape_in, shape_out, self.sample.dtype)
                    if isinstance(problem, Exception):
                        raise ShapeMismatchError(f"block {i}: student block fails on the teacher block's input shape "
                                                 f"{shape_in}{where}: {problem}") from problem
                    raise ShapeMismatchError(
                        f"block {i}: student output shape {problem}{where} != teacher output shape {shape_out} "
                        f"(block input {shape_in}); make S_{i} map {shape_in} to {shape_out}"
                    )


def _run(probe: nn.Module, path: Dict[str, Any], shape_in: Shape, shape_out: Shape,
         dtype: torch.dtype) -> Union[None, Shape, Exception]:
    """``None`` when ``probe`` on ``path`` maps ``shape_in`` to ``shape_out``, else the wrong shape or the error."""
    if path:
        probe.set_path(path)
    with torch.no_grad():
        try:
            out = probe(torch.zeros((2,) + tuple(shape_in), dtype=dtype))
        except (RuntimeError, ValueError) as err:
            return err
    shape = tuple(out.shape[1:])
    return None if shape == tuple(shape_out) else shape


def _culprit(probe: nn.Module, path: Dict[str, Any], choices: Dict[str, List[Any]], shape_in: Shape,
             shape_out: Shape, dtype: torch.dtype) -> str:
    """`` with LABEL = VALUE (path ...)`` naming the first label whose value alone breaks ``path``, else `` (path ...)``."""
    if not choices:
        return ""
    base = {label: values[0] for label, values in choices.items()}
    if _run(probe, base, shape_in, shape_out, dtype) is None:
        for label, value in path.items():
            if value != base[label] and _run(probe, {**base, label: value}, shape_in, shape_out, dtype) is not None:
                return f" with {label} = {value!r} (path {path})"
    elif len(choices) == 1:
        label = next(iter(choices))
        return f" with {label} = {path[label]!r} (path {path})"
    return f" (path {path})"
