"""Derive the student blocks from the teacher's blocks: a block-space factory per block, each space an NNI supernet."""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from nni.nas.nn.pytorch import ModelSpace

from ..config import ConfigError, StudentConfig
from ..imports import import_object
from ..spec.blocks import block_seed
from .dna import StudentSpace, block_geometry, dna_space
from .donna import donna_space
from .supernet import BlockSupernet
from .vit import vit_space

__all__ = ["BlockFactory", "block_geometry", "build_student", "student_factory", "make_block", "fixed_block",
           "fresh_copy"]

Shape = Tuple[int, ...]

BlockFactory = Callable[..., Optional[nn.Module]]
"""``factory(index=, shape_in=, shape_out=, teacher_block=, **options)`` -> an NNI ``ModelSpace`` (a block space), a
plain ``nn.Module`` (a fixed block) or ``None`` (a freshly initialised copy of the teacher block)."""


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


def fixed_block(index: int, shape_in: Shape, shape_out: Shape, teacher_block: nn.Module, *,
                path: Union[Mapping[str, Any], str, None], **dna_options: Any) -> Optional[nn.Module]:
    """The block factory of ``model.student.kind: fixed``: one path of the DNA block space, frozen.

    ``path`` is an NNI sample dict or one candidate name used for every layer (e.g. ``k3e3``); ``dna_options`` are
    those of :func:`~nni_pipebd.spaces.dna.dna_space`.
    """
    space = dna_space(index, shape_in, shape_out, teacher_block, **dna_options)
    if space is None:
        return None
    supernet = BlockSupernet(space, index)
    return supernet.freeze(_fixed_sample(supernet.choices, path, index))


def _fixed_sample(choices: Mapping[str, List[Any]], path: Union[Mapping[str, Any], str, None],
                  index: int) -> Dict[str, Any]:
    if path is None:
        raise ConfigError("model.student.path is required for kind: fixed — an NNI sample dict "
                          "(e.g. {s0_i0: k3e3, ...}) or one candidate name used everywhere (e.g. k3e3)")
    if isinstance(path, str):
        missing = [label for label, names in choices.items() if path not in names]
        if missing:
            raise ConfigError(f"model.student.path = {path!r} is not a candidate of {missing} "
                              f"(block {index}); candidates there: {choices[missing[0]]}")
        return {label: path for label in choices}
    sample = {label: path[label] for label in choices if label in path}
    absent = sorted(set(choices) - set(sample))
    if absent:
        raise ConfigError(f"model.student.path has no choice for {absent} (block {index})")
    invalid = {label: value for label, value in sample.items() if value not in choices[label]}
    if invalid:
        label = next(iter(invalid))
        raise ConfigError(f"model.student.path: {label} = {invalid[label]!r} is not a candidate (block {index}); "
                          f"valid: {choices[label]}")
    return sample


def student_factory(config: StudentConfig, num_blocks: int,
                    base_dir: Optional[str] = None) -> Tuple[BlockFactory, Callable[[int], Dict[str, Any]], str]:
    """The block factory ``config`` names, the options it gets for block ``i``, and how to name it in errors.

    ``model.student.class_path`` (with ``init_args``) names a user factory; otherwise ``kind`` names a built-in one:
    ``dna`` (:func:`~nni_pipebd.spaces.dna.dna_space`), ``fixed`` (:func:`fixed_block`), ``donna``
    (:func:`~nni_pipebd.spaces.donna.donna_space`) or ``vit`` (:func:`~nni_pipebd.spaces.vit.vit_space`).
    """
    if config.module is not None:
        return _module_factory(config.module, num_blocks)
    if config.class_path is not None:
        where = f"model.student.class_path = {config.class_path!r}"
        factory = import_object(config.class_path, "model.student.class_path", base_dir)
        init_args = dict(config.init_args)
        return factory, lambda i: dict(init_args), where
    if config.layers is not None and len(config.layers) != num_blocks:
        raise ConfigError(f"model.student.layers has {len(config.layers)} entries but the teacher has "
                          f"{num_blocks} blocks; give one layer count per block")

    def options(i: int) -> Dict[str, Any]:
        layers = None if config.layers is None else config.layers[i]
        if config.kind == "vit":
            vit = {"widths": tuple(config.candidate_widths()), "layers": layers}
            vit.update({key: tuple(getattr(config, key)) for key in ("heads", "mlp_ratios")
                        if getattr(config, key) is not None})
            return vit
        common = {"kernels": tuple(config.kernels), "expansions": tuple(config.candidate_expansions()),
                  "layers": None if config.layers is None else config.layers[i]}
        if config.kind == "donna":
            return {**common, "widths": tuple(config.candidate_widths()),
                    "attentions": tuple(config.candidate_attention())}
        dna = {**common, "identity": config.identity, "width_mult": config.width_mult}
        return {**dna, "path": config.path} if config.kind == "fixed" else dna

    factories = {"dna": dna_space, "fixed": fixed_block, "donna": donna_space, "vit": vit_space}
    factory = factories[config.kind]
    return factory, options, f"model.student.kind = {config.kind!r}"


def _module_factory(path: str, num_blocks: int) -> Tuple[BlockFactory, Callable[[int], Dict[str, Any]], str]:
    """The factory of ``model.student.module``: block ``i`` of the saved space's ``blocks``."""
    from ..library import load_object_file

    where = f"model.student.module = {path!r}"
    space = load_object_file(path, "student space")
    blocks = getattr(space, "blocks", space)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential, list, tuple)):
        raise ConfigError(f"{where} holds a {type(space).__name__} without `blocks`; save a ModelSpace whose `blocks` "
                          "(an nn.ModuleList) are the block spaces, one per teacher block")
    blocks = list(blocks)
    if len(blocks) not in (num_blocks, num_blocks - 1):
        raise ConfigError(f"{where} has {len(blocks)} blocks but the teacher has {num_blocks}; give one block space "
                          f"per teacher block (or {num_blocks - 1}: the head is then a fresh copy of the teacher's)")

    def factory(index: int, **_: Any) -> Optional[nn.Module]:
        return blocks[index] if index < len(blocks) else None

    return factory, lambda i: {}, where


def make_block(factory: BlockFactory, index: int, teacher_block: nn.Module, shape_in: Shape, shape_out: Shape,
               options: Mapping[str, Any], where: str = "the block factory", supernet: bool = True) -> nn.Module:
    """Student block ``index`` from ``factory``: a :class:`BlockSupernet` of a returned ``ModelSpace`` (the space
    itself with ``supernet=False``), a returned plain module as it is, or a fresh copy of the teacher block for
    ``None``."""
    block = factory(index=index, shape_in=tuple(shape_in), shape_out=tuple(shape_out), teacher_block=teacher_block,
                    **options)
    if block is None:
        return fresh_copy(teacher_block)
    if isinstance(block, ModelSpace):
        return BlockSupernet(block, index) if supernet else block
    if isinstance(block, nn.Module):
        return block
    raise ConfigError(f"{where} returned a {type(block).__name__} for block {index} ({shape_in} -> {shape_out}); "
                      "return an NNI ModelSpace (a block space), an nn.Module (a fixed block) or None (a fresh copy "
                      "of the teacher block)")


def build_student(config: StudentConfig, teacher: Sequence[nn.Module], shapes: Sequence[Tuple[Shape, Shape]],
                  seed: int, base_dir: Optional[str] = None, supernet: bool = True) -> StudentSpace:
    """Student blocks for ``teacher`` as a :class:`StudentSpace`, one factory call per teacher block.

    With ``supernet=False`` the block spaces stay plain NNI spaces (what ``NasExperiment`` explores and freezes);
    training uses the supernets.

    Block i is built (and its supernet made) under the seed :func:`block_seed` (seed, i), whatever else is built.
    Labels must be unique across blocks: a sample dict of the whole student names each block's choices.
    """
    factory, options, where = student_factory(config, len(teacher), base_dir)
    blocks: List[nn.Module] = []
    for i, (block, (shape_in, shape_out)) in enumerate(zip(teacher, shapes)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(block_seed(seed, i))
            blocks.append(make_block(factory, i, block, shape_in, shape_out, options(i), where, supernet))
    check_unique_labels(blocks)
    return StudentSpace(blocks)


def check_unique_labels(blocks: Sequence[nn.Module]) -> None:
    """Raise :class:`ConfigError` when two blocks share a label (naming both blocks and the label)."""
    owner: Dict[str, int] = {}
    for i, block in enumerate(blocks):
        for label in getattr(block, "choices", {}):
            if label in owner:
                raise ConfigError(f"label {label!r} is used by block {owner[label]} and block {i}; labels must be "
                                  "unique across blocks — put the block index in them (e.g. f'b{index}_width')")
            owner[label] = i
