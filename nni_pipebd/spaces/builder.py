"""Derive the student blocks from the teacher's blocks: DNA supernet, fixed path, or a fresh head."""

from __future__ import annotations

import copy
from typing import List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from ..config import ConfigError, StudentConfig
from ..spec.blocks import block_seed
from .dna import BlockGeometry, DnaBlock, StudentSpace

__all__ = ["block_geometry", "build_student", "fresh_copy"]

Shape = Tuple[int, ...]


def block_geometry(index: int, teacher_block: nn.Module, shape_in: Shape, shape_out: Shape,
                   num_layers: Union[int, None] = None) -> BlockGeometry:
    """Widths, downsampling and layer count a student block needs to replace ``teacher_block``.

    The layer count defaults to the number of spatial (kernel > 1) convolutions in the teacher block.
    """
    if len(shape_in) != 3 or len(shape_out) != 3:
        raise ValueError(f"block {index}: a DNA block maps feature maps [C, H, W]; the teacher block maps "
                         f"{shape_in} -> {shape_out}")
    if shape_in[1] % shape_out[1] or shape_in[2] % shape_out[2] or \
            shape_in[1] // shape_out[1] != shape_in[2] // shape_out[2]:
        raise ValueError(f"block {index}: the teacher block resizes {shape_in[1:]} -> {shape_out[1:]}, "
                         "not an integer square downsampling a strided student can follow")
    if num_layers is None:
        num_layers = sum(1 for m in teacher_block.modules()
                         if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1)
    return BlockGeometry(shape_in[0], shape_out[0], shape_in[1] // shape_out[1], max(1, num_layers))


def fresh_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with re-initialised parameters and without dropout (a student for a head block)."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(True)
    clone.train()
    for name, child in list(clone.named_modules()):
        if hasattr(child, "reset_parameters") and child is not clone:
            child.reset_parameters()
    if hasattr(clone, "reset_parameters"):
        clone.reset_parameters()
    return _drop_dropout(clone)


def _drop_dropout(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.Dropout):
        return nn.Identity()
    for name, child in module.named_children():
        setattr(module, name, _drop_dropout(child))
    return module


def build_student(config: StudentConfig, teacher: Sequence[nn.Module], shapes: Sequence[Tuple[Shape, Shape]],
                  seed: int) -> StudentSpace:
    """Student blocks for ``teacher`` as a :class:`StudentSpace`.

    Feature blocks become :class:`DnaBlock` supernets (``kind: dna``) or one path of them (``kind: fixed``);
    a block whose output is not a feature map (the classifier head) gets a freshly initialised copy of the
    teacher block. Block i is initialised from :func:`block_seed` (seed, i), whatever else is built.
    """
    if config.layers is not None and len(config.layers) != len(teacher):
        raise ConfigError(f"model.student.layers has {len(config.layers)} entries but the teacher has "
                          f"{len(teacher)} blocks; give one layer count per block")
    blocks: List[nn.Module] = []
    for i, (block, (shape_in, shape_out)) in enumerate(zip(teacher, shapes)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(block_seed(seed, i))
            if len(shape_out) != 3:
                blocks.append(fresh_copy(block))
                continue
            layers = None if config.layers is None else config.layers[i]
            geometry = block_geometry(i, block, shape_in, shape_out, layers)
            student = DnaBlock(i, geometry, config.kernels, config.expansions, config.identity, config.width_mult)
            if config.kind == "fixed":
                student = _freeze(student, config.path, i)
            blocks.append(student)
    return StudentSpace(blocks)


def _freeze(block: DnaBlock, path: Union[Mapping[str, str], str, None], index: int) -> nn.Module:
    choices = block.choices
    if path is None:
        raise ConfigError("model.student.path is required for kind: fixed — an NNI sample dict "
                          "(e.g. {s0_i0: k3e3, ...}) or one candidate name used everywhere (e.g. k3e3)")
    if isinstance(path, str):
        missing = [label for label, names in choices.items() if path not in names]
        if missing:
            raise ConfigError(f"model.student.path = {path!r} is not a candidate of {missing} "
                              f"(block {index}); candidates there: {choices[missing[0]]}")
        sample = {label: path for label in choices}
    else:
        sample = {label: path[label] for label in choices if label in path}
        absent = sorted(set(choices) - set(sample))
        if absent:
            raise ConfigError(f"model.student.path has no choice for {absent} (block {index})")
    block.set_path(sample)
    frozen = copy.deepcopy(block.freeze(sample))
    frozen.path = {}
    return frozen
