"""Choice values as hashable keys: an InputChoice's list of chosen inputs becomes a tuple, everything else stays."""

from __future__ import annotations

from typing import Any

__all__ = ["value_key", "is_value"]


def value_key(value: Any) -> Any:
    """``value`` usable as a dict key or set member: lists (of an ``InputChoice``) become tuples, recursively."""
    if isinstance(value, (list, tuple)):
        return tuple(value_key(v) for v in value)
    return value


def is_value(value: Any) -> bool:
    """Whether ``value`` is what a path holds for one label: a name or a number (``nni.choice``, ``LayerChoice``,
    ``Repeat``), or a list of them (the chosen inputs of an ``InputChoice``)."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, (str, int, float)) for v in value)
    return isinstance(value, (str, int, float))
