"""Errors of the search package: each carries the offending values and a hint."""

from __future__ import annotations

from typing import Dict, List, Sequence

__all__ = ["SearchError", "BudgetError", "InfeasibleBudgetError", "ArchitectureError"]


class SearchError(ValueError):
    """A search or finetuning request cannot be carried out as asked."""


class BudgetError(SearchError):
    """A budget is not ``METRIC=VALUE`` with a known metric and a non-negative number."""


class InfeasibleBudgetError(SearchError):
    """No scored architecture fits the budget.

    Attributes
    ----------
    metric : str
        The budgeted metric (``params``, ``flops`` or ``latency_ms``).
    budget : float
        The budget asked for.
    smallest : float
        The smallest cost any architecture built from scored paths has (fixed blocks included): the
        smallest feasible budget.
    """

    def __init__(self, metric: str, budget: float, smallest: float, fixed: float):
        self.metric, self.budget, self.smallest, self.fixed = metric, budget, smallest, fixed
        super().__init__(
            f"no architecture fits the budget {metric}={budget:g}: the smallest architecture built from scored "
            f"paths needs {metric}={smallest:g} (of which {fixed:g} are fixed blocks such as the head); "
            f"raise the budget to at least {metric}={smallest:g}")


class ArchitectureError(SearchError):
    """An architecture (NNI sample dict) does not match the library's search space.

    Attributes
    ----------
    unknown, missing : list of str
        Labels the sample has but the space lacks, and labels of the space the sample lacks.
    invalid : dict
        Label -> the chosen name, for choices that are not candidates of that label.
    valid : dict
        Label -> candidate names of the space.
    """

    def __init__(self, unknown: Sequence[str], missing: Sequence[str], invalid: Dict[str, str],
                 valid: Dict[str, List[str]]):
        self.unknown, self.missing, self.invalid, self.valid = list(unknown), list(missing), dict(invalid), valid
        parts = []
        if unknown:
            parts.append(f"unknown labels {self.unknown}")
        if missing:
            parts.append(f"missing labels {self.missing}")
        for label, name in self.invalid.items():
            parts.append(f"{label}={name!r} is not a candidate (valid: {valid[label]})")
        shown = {label: names for label, names in valid.items()}
        super().__init__(f"the architecture does not match the library's space: {'; '.join(parts)}. "
                         f"Give one choice for each label: {shown}")
