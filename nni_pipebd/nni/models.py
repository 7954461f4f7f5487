"""What the strategies submit to NNI's execution engine: the distillation task and architectures of the library."""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Mapping, Optional

from nni.mutable import LabeledMutable, Sample, SampleValidationError
from nni.nas.space import ExecutableModelSpace, ModelStatus

from ..spaces.values import is_value

__all__ = ["DistillationTask", "ArchitectureModel", "ROLES"]

_logger = logging.getLogger(__name__)

ROLES = ("candidate", "predictor")
"""``candidate``: a search result (exported as a top model); ``predictor``: finetuned to fit DONNA's predictor."""


class _FrozenModel(ExecutableModelSpace):
    """An already-frozen executable model: nothing left to choose, serialised as plain data."""

    def __init__(self, evaluator: Any, sample: Optional[Dict[str, Any]]):
        super().__init__(ModelStatus.Frozen)
        self.evaluator = evaluator
        self.sample = sample

    def freeze(self, sample: Sample) -> "_FrozenModel":
        return self

    def check_contains(self, sample: Sample) -> Optional[SampleValidationError]:
        return None

    def leaf_mutables(self, is_leaf) -> Iterable[LabeledMutable]:
        return iter(())

    def _dump(self) -> Dict[str, Any]:
        return {"status": self.status, "evaluator": self.evaluator, "metrics": self.metrics, **self._fields()}

    def _fields(self) -> Dict[str, Any]:
        return {}

    def __str__(self) -> str:
        metric = f", metric={self.metric:.4f}" if isinstance(self.metric, float) else ""
        return f"{type(self).__name__}({self.extra_repr()}{metric}, {self.status.value!r})"


class DistillationTask(_FrozenModel):
    """Blockwise distillation of the whole block library, submitted to NNI's engine as one model.

    Executing it (in the strategy's process with the sequential engine, or as an NNI trial with the training-service
    engine) runs :meth:`BlockwiseDistillation.distill <nni_pipebd.nni.evaluator.BlockwiseDistillation.distill>`:
    the configured executor's workers train every block; per-epoch block losses are its intermediate metrics and
    minus the mean final block loss its final metric. Its ``sample`` is empty: it stands for no architecture.

    Parameters
    ----------
    evaluator : BlockwiseDistillation
        The job and the library folder.
    """

    def __init__(self, evaluator: Any):
        super().__init__(evaluator, {})

    def extra_repr(self) -> str:
        return f"library_dir={str(getattr(self.evaluator, 'library_dir', '?'))!r}"

    def executable_model(self) -> Any:
        """The library's :class:`~nni_pipebd.spaces.dna.StudentSpace`, its blocks holding the trained weights."""
        from ..search.loaded import open_library

        return open_library(self.evaluator.library_dir).job.space

    @classmethod
    def _load(cls, **attrs: Any) -> "DistillationTask":
        task = cls(attrs["evaluator"])
        task.status = attrs["status"]
        task.metrics = attrs["metrics"]
        return task


class ArchitectureModel(_FrozenModel):
    """One architecture of the block library (an NNI sample dict), submitted to NNI's engine for finetuning.

    Executing it runs :meth:`BlockwiseDistillation.evaluate_architecture
    <nni_pipebd.nni.evaluator.BlockwiseDistillation.evaluate_architecture>`; its final metric is the validation
    accuracy. ``executable_model()`` builds the network from the library's block weights (before finetuning).

    Parameters
    ----------
    sample : dict
        ``{label: value}`` for every label of the library's space (candidate names, ints, floats).
    evaluator : BlockwiseDistillation
        The job and the library folder.
    role : str
        ``candidate`` (a search result) or ``predictor`` (DONNA: finetuned to fit the accuracy predictor).
    rank : int
        Position in the search's output (or among the predictor architectures).
    search : dict, optional
        What the search said about it (cost; DNA score or DONNA predicted accuracy).
    """

    def __init__(self, sample: Mapping[str, Any], evaluator: Any, role: str = "candidate", rank: int = 0,
                 search: Optional[Mapping[str, Any]] = None):
        if role not in ROLES:
            raise ValueError(f"role = {role!r} is not valid; choose one of {list(ROLES)}")
        if not isinstance(sample, Mapping) or not all(is_value(v) for v in sample.values()):
            raise TypeError(f"sample must be a dict {{label: candidate name or number, or a list of chosen inputs}}; "
                            f"got {sample!r}")
        super().__init__(evaluator, dict(sample))
        self.role = role
        self.rank = int(rank)
        self.search = dict(search or {})

    def extra_repr(self) -> str:
        return f"{self.role} #{self.rank}, sample={self.sample}"

    def executable_model(self) -> Any:
        """The architecture as a standalone network holding the library's block weights (not finetuned)."""
        from ..search.finetune import build_network
        from ..search.loaded import open_library

        return build_network(open_library(self.evaluator.library_dir), self.sample)

    def _fields(self) -> Dict[str, Any]:
        return {"sample": self.sample, "role": self.role, "rank": self.rank, "search": self.search}

    @classmethod
    def _load(cls, **attrs: Any) -> "ArchitectureModel":
        model = cls(attrs["sample"], attrs["evaluator"], attrs["role"], attrs["rank"], attrs.get("search"))
        model.status = attrs["status"]
        model.metrics = attrs["metrics"]
        return model

