"""One student block space as an NNI one-shot supernet: its choices, the active path, frozen copies keeping its weights."""

from __future__ import annotations

import copy
import itertools
import logging
from typing import Any, Dict, List, Mapping

from torch import nn

from nni.mutable import Categorical, CategoricalMultiple
from nni.nas.nn.pytorch import InputChoice, ModelSpace, MutableModule
from nni.nas.oneshot.pytorch.supermodule.base import BaseSuperNetModule
from nni.nas.strategy import RandomOneShot

from .compat import supernet_hooks

__all__ = ["BlockSupernet", "space_choices", "candidate_values", "check_supported"]

_logger = logging.getLogger(__name__)


_REDUCTIONS = ("sum", "mean", "concat")


def candidate_values(label: str, mutable: Any, where: str = "the block space") -> List[Any]:
    """The values a path may take for ``label``: a ``Categorical``'s values, or every combination of ``n_chosen``
    inputs of an ``InputChoice`` (``CategoricalMultiple``) as a list of indices, NNI's sample format.

    Raises
    ------
    TypeError
        What NNI's one-shot path sampling cannot sample: any number of inputs (``n_chosen=None``) or a continuous
        distribution (``nni.uniform``, ``nni.normal``, ...); the message names the label, the type and what to use.
    """
    if isinstance(mutable, CategoricalMultiple):
        if mutable.n_chosen is None:
            raise TypeError(f"{where}: label {label!r} is a CategoricalMultiple of {mutable.values} with n_chosen=None "
                            "(any number of inputs), which NNI's one-shot path sampling (PathSamplingInput) cannot "
                            "sample; give the InputChoice a fixed n_chosen (1 or more)")
        return [list(c) for c in itertools.combinations(mutable.values, mutable.n_chosen)]
    if isinstance(mutable, Categorical):
        return list(mutable.values)
    raise TypeError(f"{where}: label {label!r} is a {type(mutable).__name__}, not a categorical choice of one value; "
                    "a path takes one value per label from a finite list — use nni.choice(label, [values]), "
                    "LayerChoice, InputChoice or Repeat with a depth range instead of a continuous distribution")


def space_choices(space: Any, where: str = "the block space") -> Dict[str, List[Any]]:
    """Label -> candidate values of every choice of an NNI space (``simplify()``), in NNI's order.

    Values are what the space declares: candidate names of a ``LayerChoice``, ints of a ``Repeat`` depth, any
    str / int / float of an ``nni.choice`` (expressions of it, e.g. ``w * 2``, are not labels: they follow ``w``),
    lists of input indices of an ``InputChoice`` (:func:`candidate_values`).

    Raises
    ------
    TypeError
        A label NNI's one-shot path sampling cannot sample (see :func:`candidate_values`).
    """
    return {label: candidate_values(label, mutable, where) for label, mutable in space.simplify().items()}


def check_supported(space: Any, where: str = "the block space") -> None:
    """Refuse up front what ``RandomOneShot`` cannot turn into a supermodule, naming the label: an ``InputChoice``
    reducing by other than sum, mean or concat (NNI's ``PathSamplingInput``), and every label of
    :func:`space_choices`.

    Raises
    ------
    TypeError
        The label, the mutable and what to use instead.
    """
    for module in space.modules():
        if isinstance(module, InputChoice) and module.reduction not in _REDUCTIONS:
            raise TypeError(f"{where}: InputChoice {module.label!r} reduces by {module.reduction!r}; NNI's one-shot "
                            f"path sampling (PathSamplingInput) supports {list(_REDUCTIONS)}: use one of them")
    space_choices(space, where)


class BlockSupernet(MutableModule):
    """Student block ``index`` as a weight-sharing supernet built by NNI's one-shot machinery.

    ``RandomOneShot().mutate_model(space)`` turns the block space (in place) into NNI's path-sampling supermodules —
    ``PathSamplingLayer`` for a ``LayerChoice``, ``PathSamplingRepeat`` for a ``Repeat`` with a mutable depth (here
    :class:`~nni_pipebd.spaces.compat.ZeroDepthPathSamplingRepeat`, which accepts depth 0),
    ``PathSamplingInput`` for an ``InputChoice`` and ``MixedConv2d`` / ``MixedLinear`` / ``MixedBatchNorm2d`` / ...
    for ``nni.choice`` arguments of mutable operators. :meth:`set_path` applies a sample as NNI's ENAS does:
    ``resample(memo=sample)`` on every supermodule. :meth:`freeze` is NNI's supernet freeze (the chosen candidates
    and sliced weights of the supernet), deep-copied.

    The wrapper adds no level to parameter names: its parameters, buffers and children *are* the space's (the same
    dictionaries), so ``state_dict()`` keys are those of the space and a library trained before keeps loading.

    Parameters
    ----------
    space : nni.nas.nn.pytorch.ModelSpace
        The block space; converted to a supernet in place.
    index : int
        Block index (named in errors).

    Attributes
    ----------
    path : dict
        The active path (one value per label), empty until :meth:`set_path`.
    """

    def __init__(self, space: ModelSpace, index: int):
        super().__init__()
        if not isinstance(space, ModelSpace):
            raise TypeError(f"block {index}: a block space must be an NNI ModelSpace, got {type(space).__name__}; "
                            "return a plain nn.Module for a block without choices")
        check_supported(space, f"block {index}")
        RandomOneShot(mutation_hooks=supernet_hooks()).mutate_model(space)
        for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            object.__setattr__(self, name, getattr(space, name))
        object.__setattr__(self, "_space", space)
        self.index = index
        self._choices = space_choices(space, f"block {index}")
        self.path: Dict[str, Any] = {}

    @property
    def space(self) -> ModelSpace:
        """The supernet (the block space after ``mutate_model``)."""
        return self._space

    @property
    def choices(self) -> Dict[str, List[Any]]:
        """Label -> candidate values of the block's choices (empty for a space without any)."""
        return {label: list(values) for label, values in self._choices.items()}

    def check_path(self, sample: Mapping[str, Any]) -> Dict[str, Any]:
        """The block's part of ``sample`` (which may hold labels of other blocks too), checked.

        Raises
        ------
        KeyError
            A label of the block has no value in ``sample``.
        ValueError
            A value is not a candidate of its label.
        """
        path = {}
        for label, values in self._choices.items():
            if label not in sample:
                raise KeyError(f"block {self.index}: the path has no choice for {label!r}; it needs one of {values} "
                               f"for each of {sorted(self._choices)}")
            value = list(sample[label]) if isinstance(sample[label], tuple) else sample[label]  # a tuple of inputs
            if value not in values:
                order = " (an InputChoice's chosen inputs in ascending order)" if isinstance(value, list) else ""
                raise ValueError(f"block {self.index}: {label} = {sample[label]!r} is not a candidate; valid{order}: "
                                 f"{values}")
            path[label] = value
        return path

    def set_path(self, sample: Mapping[str, Any]) -> None:
        """Make the supernet run ``sample``: ``resample(memo=sample)`` on every NNI supermodule of the block."""
        path = self.check_path(sample)
        memo = dict(path)
        for module in self._space.modules():
            if isinstance(module, BaseSuperNetModule):
                module.resample(memo=memo)
        self.path = path

    def freeze(self, sample: Mapping[str, Any]) -> nn.Module:
        """An independent plain module running ``sample`` with the supernet's current weights.

        NNI's supernet freeze: chosen ``LayerChoice`` candidates, the first ``depth`` blocks of a ``Repeat`` and
        weight slices of mixed operators (``freeze_weight``), deep-copied so that training one does not change the
        other. (``ModelSpace.freeze`` on the original space would build fresh weights.)
        """
        path = self.check_path(sample)
        return copy.deepcopy(self._space.freeze(path))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._choices and not self.path:
            raise RuntimeError(f"block {self.index}: no path selected for {sorted(self._choices)}; call "
                               "set_path(sample) before forward")
        return self._space(*args, **kwargs)

    def train(self, mode: bool = True) -> "BlockSupernet":
        super().train(mode)
        self._space.training = mode
        return self

    def extra_repr(self) -> str:
        return f"index={self.index}, labels={list(self._choices)}, path={self.path}"
