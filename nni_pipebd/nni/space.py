"""Layer choices of a search space (NNI model space, legacy search-space dict) and the check against a library's."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Sequence

__all__ = ["SpaceMismatchError", "UnsupportedChoiceError", "space_choices", "check_space", "legacy_search_space"]

_logger = logging.getLogger(__name__)


class SpaceMismatchError(ValueError):
    """The student space given to NNI differs from the block library's space.

    Attributes
    ----------
    only_given, only_library : list of str
        Labels found in only one of the two spaces.
    different : dict
        Label -> (given candidates, library candidates) where both have the label but not the same candidates.
    """

    def __init__(self, only_given: Sequence[str], only_library: Sequence[str],
                 different: Mapping[str, tuple], where: str):
        self.only_given, self.only_library, self.different = list(only_given), list(only_library), dict(different)
        parts = []
        if self.only_given:
            parts.append(f"labels only in {where}: {self.only_given}")
        if self.only_library:
            parts.append(f"labels only in the library's space: {self.only_library}")
        for label, (given, library) in self.different.items():
            parts.append(f"{label}: candidates {list(given)} in {where} but {list(library)} in the library's space")
        super().__init__(f"{where} does not match the block library's space: {'; '.join(parts)}. Build the space "
                         "from the same config (BlockwiseDistillation(...).student_space(), or "
                         "`nni-pipebd nni-space CONFIG` for an nnictl searchSpaceFile)")


class UnsupportedChoiceError(SpaceMismatchError, TypeError):
    """A label of the student space that one-shot path sampling cannot sample (not a mismatch the user made)."""

    def __init__(self, label: str, message: str):
        self.only_given, self.only_library, self.different = [label], [], {}
        ValueError.__init__(self, message)


def space_choices(space: Any) -> Dict[str, List[Any]]:
    """Label -> candidate values of ``space``.

    Parameters
    ----------
    space : nni Mutable (ModelSpace, ExecutableModelSpace) or dict
        An NNI space (its ``simplify()`` must hold only what one-shot path sampling samples: ``LayerChoice``,
        ``Repeat`` depths, ``nni.choice``, ``InputChoice`` with a fixed ``n_chosen``), a legacy search-space dict
        (``{label: {"_type": "choice", "_value": [values]}}``) or ``{label: [values]}``; values are candidate names,
        ints or floats, or lists of them (an ``InputChoice``'s chosen inputs).

    Raises
    ------
    UnsupportedChoiceError
        A label of an NNI space that path sampling cannot sample (a continuous distribution, ``n_chosen=None``); the
        message names the label, the mutable and what to use instead.
    SpaceMismatchError
        An entry of a dict is not a list of candidate names or numbers.
    TypeError
        ``space`` is none of the forms above.
    """
    if hasattr(space, "simplify"):
        from ..spaces.supernet import candidate_values

        choices = {}
        for label, mutable in space.simplify().items():
            try:
                values = candidate_values(label, mutable, "the student space")
            except TypeError as err:
                raise UnsupportedChoiceError(label, str(err)) from None
            if not _scalars(values):
                raise UnsupportedChoiceError(label, f"the student space: label {label!r} ({type(mutable).__name__}) "
                                             f"has values {values!r}; a path holds names or numbers (or lists of "
                                             "them): use nni.choice over names or numbers")
            choices[label] = values
        return choices
    if isinstance(space, Mapping):
        choices = {}
        for label, entry in space.items():
            if isinstance(entry, Mapping):
                if entry.get("_type") != "choice" or not isinstance(entry.get("_value"), list):
                    raise SpaceMismatchError([label], [], {}, f"the search space ({label} = {entry!r} is not "
                                             "{'_type': 'choice', '_value': [...]})")
                entry = entry["_value"]
            if not isinstance(entry, (list, tuple)) or not _scalars(entry):
                raise SpaceMismatchError([label], [], {}, f"the search space ({label} = {entry!r} is not a list of "
                                         "candidate names or numbers)")
            choices[str(label)] = list(entry)
        return choices
    raise TypeError(f"cannot read layer choices from {type(space).__name__}; give an NNI model space, a legacy "
                    "search-space dict or {label: [candidate names]}")


def _scalars(values: Sequence[Any]) -> bool:
    """Whether every value is a candidate name or a number, or a list of them (what a path of a block space holds)."""
    from ..spaces.values import is_value

    return all(is_value(v) for v in values)


def check_space(given: Mapping[str, Sequence[str]], library: Mapping[str, Sequence[str]],
                where: str = "the student space") -> None:
    """Raise :class:`SpaceMismatchError` unless ``given`` and ``library`` have the same labels and candidate sets."""
    only_given = sorted(set(given) - set(library))
    only_library = sorted(set(library) - set(given))
    from ..spaces.values import value_key

    different = {label: (list(given[label]), list(library[label])) for label in sorted(set(given) & set(library))
                 if {value_key(v) for v in given[label]} != {value_key(v) for v in library[label]}}
    if only_given or only_library or different:
        raise SpaceMismatchError(only_given, only_library, different, where)
    _logger.debug("%s matches the library's space (%d labels)", where, len(library))


def legacy_search_space(choices: Mapping[str, Sequence[str]]) -> Dict[str, Dict[str, Any]]:
    """``{label: {"_type": "choice", "_value": names}}``: the search space nnictl and the web UI show."""
    return {label: {"_type": "choice", "_value": list(names)} for label, names in choices.items()}
