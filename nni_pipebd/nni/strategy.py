"""NNI 3.0 strategies for ``NasExperiment``: distil the block library, search it (DNA or DONNA), evaluate the top-k."""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

from nni.nas.execution import ExecutionEngine, SequentialExecutionEngine
from nni.nas.space import ExecutableModelSpace, ModelStatus
from nni.nas.strategy import Strategy
from nni.nas.strategy.base import StrategyStatus

from ..library import MANIFEST
from ..search.ranking import RankingSettings
from ..spaces.values import value_key
from .compat import patch_json_comments
from .evaluator import BlockwiseDistillation
from .flow import SearchSettings, dna_candidates, donna_candidates, predictor_samples
from .models import ArchitectureModel, DistillationTask
from ..spaces.dna import StudentSpace
from .space import check_space, space_choices

__all__ = ["BlockwiseStrategy", "BlockwiseDNA", "BlockwiseDONNA", "BudgetExhaustedError"]

_logger = logging.getLogger(__name__)

_PHASES = ("distill", "predict", "search", "evaluate", "done")


class BudgetExhaustedError(RuntimeError):
    """The engine accepts no more models before the flow is complete (``max_trial_number`` too small)."""


class BlockwiseStrategy(Strategy):
    """Blockwise-distillation NAS as an NNI strategy; use :class:`BlockwiseDNA` or :class:`BlockwiseDONNA`.

    ``_run`` submits a :class:`~nni_pipebd.nni.models.DistillationTask` (the library is trained with the
    evaluator's executor and workers), searches the trained library in this process, then submits one
    :class:`~nni_pipebd.nni.models.ArchitectureModel` per found architecture; NNI's engine runs them (here with the
    sequential engine, as trials with the training-service engine) and its metric events set their metrics.
    ``list_models`` (hence ``NasExperiment.export_top_models``) gives the evaluated candidates, best accuracy first.

    The experiment's model space must be the library's student space (same labels and candidates) and its
    evaluator a :class:`~nni_pipebd.nni.evaluator.BlockwiseDistillation`.

    Parameters
    ----------
    settings : SearchSettings
        Method, budget, top-k and search options.
    final_evaluator : nni.nas.evaluator.Evaluator or str, optional
        Evaluates the found architectures in place of the built-in finetuning, e.g. a Lightning
        ``nni.nas.evaluator.pytorch.Classification`` (or the import path of a function returning one); its final
        metric ranks them (see :meth:`BlockwiseDistillation.evaluate_final
        <nni_pipebd.nni.evaluator.BlockwiseDistillation.evaluate_final>`).
    """

    def __init__(self, settings: SearchSettings, final_evaluator: Any = None):
        super().__init__()
        self.settings = settings
        self.final_evaluator = final_evaluator
        self._phase = "distill"
        self._candidates: List[Dict[str, Any]] = []
        self._predictor: Optional[Dict[str, Any]] = None
        self._models: List[ArchitectureModel] = []
        self._evaluator: Optional[BlockwiseDistillation] = None

    def extra_repr(self) -> str:
        return f"budget={self.settings.budget!r}, top_k={self.settings.top_k}"

    @property
    def phase(self) -> str:
        """``distill``, ``predict`` (DONNA), ``search``, ``evaluate`` or ``done``."""
        return self._phase

    @property
    def evaluator(self) -> BlockwiseDistillation:
        if self._evaluator is None:
            raise RuntimeError("the strategy is not initialised with a model space and an engine")
        return self._evaluator

    def _initialize(self, model_space: ExecutableModelSpace, engine: ExecutionEngine) -> ExecutableModelSpace:
        evaluator = getattr(model_space, "evaluator", None)
        if not isinstance(evaluator, BlockwiseDistillation):
            raise TypeError(f"{type(self).__name__} needs a BlockwiseDistillation evaluator (it holds the job and the "
                            f"library folder); the experiment has {evaluator!r}")
        given = getattr(model_space, "model_space", model_space)  # the user's ModelSpace inside NNI's wrapper
        if hasattr(given, "blocks") and not isinstance(given, StudentSpace):
            evaluator.bind_student(given)  # the space handed to NasExperiment is the one distilled
        if self.final_evaluator is not None:
            evaluator.bind_final_evaluator(self.final_evaluator)
        check_space(space_choices(model_space), evaluator.space_choices())
        limit = getattr(engine, "max_model_count", None)
        if limit is None:
            config = getattr(getattr(engine, "nodejs_binding", None), "config", None)
            limit = getattr(config, "max_trial_number", None)
        if isinstance(limit, int) and limit < self.settings.required_models:
            raise BudgetExhaustedError(
                f"max_trial_number = {limit} but {type(self).__name__} runs {self.settings.required_models} models "
                f"({self._model_counts()}); raise it to {self.settings.required_models} or leave it unset")
        if not isinstance(engine, SequentialExecutionEngine):
            patch_json_comments()
        self._evaluator = evaluator
        return model_space

    def _model_counts(self) -> str:
        parts = ["1 distillation"]
        if self.settings.method == "donna":
            parts.append(f"{self.settings.predictor_archs} predictor architectures")
        parts.append(f"top_k = {self.settings.top_k} evaluations")
        return " + ".join(parts)

    # --- the flow ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        if self._phase == "distill":
            self._distill()
        if self._phase in ("predict", "search"):
            self._search()
        if self._phase == "evaluate":
            self._evaluate()
        self._phase = "done"
        evaluated = [m for m in self._models if m.role == "candidate" and m.status == ModelStatus.Trained]
        _logger.info("%s done: %d of %d architectures evaluated", type(self).__name__, len(evaluated),
                     len(self._candidates))

    def _submit(self, models: Sequence[ExecutableModelSpace]) -> None:
        if not models:
            return
        for model in models:
            if not self.wait_for_resource():
                raise BudgetExhaustedError(f"the engine accepts no more models ({model} is left); the flow needs "
                                           f"{self.settings.required_models} ({self._model_counts()}): raise "
                                           "max_trial_number / max_experiment_duration")
            self.engine.submit_models(model)
        self.engine.wait_models(*models)

    def _distill(self) -> None:
        library = self.evaluator.library_dir
        task = DistillationTask(self.evaluator)
        _logger.info("phase 1: blockwise distillation into %s", library)
        self._submit([task])
        if task.status != ModelStatus.Trained or not (library / MANIFEST).is_file():
            raise RuntimeError(f"the blockwise distillation ended with status {task.status.value!r} and "
                               f"{library / MANIFEST} is {'there' if (library / MANIFEST).is_file() else 'missing'}; "
                               "see the trial's log (NNI web UI, or the experiment's trials/ folder) for its error")
        self._phase = "predict" if self.settings.method == "donna" else "search"

    def _search(self) -> None:
        library = self.evaluator.library_dir
        if self._phase == "predict":
            samples = predictor_samples(library, self.settings)
            _logger.info("phase 2: finetuning %d architectures to fit DONNA's predictor", len(samples))
            models = [ArchitectureModel(s, self.evaluator, "predictor", i) for i, s in enumerate(samples)]
            self._models += models
            self._submit(models)
            done = [m for m in models if m.status == ModelStatus.Trained and m.metric is not None]
            if len(done) < len(models):
                _logger.warning("%d of %d predictor architectures failed; fitting on the others",
                                len(models) - len(done), len(models))
            self._predictor = {"samples": [m.sample for m in done], "accuracies": [float(m.metric) for m in done]}
            self._phase = "search"
        _logger.info("phase %d: %s search under %s", 3 if self.settings.method == "donna" else 2,
                     self.settings.method.upper(), self.settings.budget)
        if self.settings.method == "dna":
            self._candidates = dna_candidates(library, self.settings)
        else:
            predictor = self._predictor or {"samples": [], "accuracies": []}
            self._candidates, fitted = donna_candidates(library, self.settings, predictor["samples"],
                                                        predictor["accuracies"])
            self._predictor = {**predictor, "r2": fitted.get("r2"), "loo_mae": fitted.get("loo_mae")}
        if len(self._candidates) < self.settings.top_k:
            _logger.warning("only %d architectures fit %s (top_k = %d)", len(self._candidates), self.settings.budget,
                            self.settings.top_k)
        self._phase = "evaluate"

    def _evaluate(self) -> None:
        done = {value_key(sorted(m.sample.items())) for m in self._models
                if m.role == "candidate" and m.status == ModelStatus.Trained}
        models = []
        for rank, arch in enumerate(self._candidates):
            if value_key(sorted(arch["sample"].items())) in done:  # an InputChoice's value is a list
                continue
            search = {k: v for k, v in arch.items() if k not in ("sample", "rank")}
            models.append(ArchitectureModel(arch["sample"], self.evaluator, "candidate", rank, search))
        how = type(self.evaluator.resolved_final_evaluator()).__name__ if self.evaluator.final_evaluator is not None \
            else "finetuning"
        _logger.info("phase %d: evaluating %d architectures (%s)", 4 if self.settings.method == "donna" else 3,
                     len(models), how)
        self._models += models
        self._submit(models)
        failed = [m for m in models if m.status != ModelStatus.Trained]
        if failed:
            _logger.warning("%d architecture evaluations failed: %s", len(failed), [str(m) for m in failed])

    # --- results -----------------------------------------------------------------------------------------------

    def list_models(self, sort: bool = True, limit: Optional[int] = None) -> Iterator[ExecutableModelSpace]:
        """The evaluated candidate architectures (NNI models whose metrics NNI's engine set).

        Parameters
        ----------
        sort : bool
            Only trained models with a metric, highest validation accuracy first; else every candidate submitted.
        limit : int, optional
            At most this many.
        """
        if self._status in (StrategyStatus.INITIALIZED, StrategyStatus.EMPTY):
            raise RuntimeError("the strategy has not been run")
        models: List[ExecutableModelSpace] = [m for m in self._models if m.role == "candidate"]
        if sort:
            models = sorted((m for m in models if m.status == ModelStatus.Trained and m.metric is not None),
                            key=lambda m: float(m.metric), reverse=True)
        yield from models[:limit]

    def state_dict(self) -> Dict[str, Any]:
        """Plain data: the phase, the search's architectures, DONNA's predictor data and every evaluated model."""
        return {
            "phase": self._phase,
            "settings": self.settings.to_dict(),
            "candidates": self._candidates,
            "predictor": self._predictor,
            "models": [{"sample": m.sample, "role": m.role, "rank": m.rank, "search": m.search,
                        "status": m.status.value, "metric": m.metric,
                        "intermediates": list(m.metrics.intermediates)} for m in self._models
                       if m.status.completed()],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`: finished phases are skipped, evaluated models kept.

        Call after ``initialize`` (``NasExperiment.resume`` does). A library that is gone sends the flow back to the
        distillation.
        """
        phase = state_dict.get("phase", "distill")
        if phase not in _PHASES:
            raise ValueError(f"state phase {phase!r} is not one of {list(_PHASES)}")
        self._candidates = list(state_dict.get("candidates") or [])
        self._predictor = state_dict.get("predictor")
        self._models = []
        for entry in state_dict.get("models") or []:
            model = ArchitectureModel(entry["sample"], self.evaluator, entry["role"], entry["rank"], entry.get("search"))
            model.status = ModelStatus(entry["status"])
            for value in entry.get("intermediates") or []:
                model.metrics.add_intermediate(value)
            if entry.get("metric") is not None:
                model.metrics.final = entry["metric"]
            self._models.append(model)
        if phase != "distill" and not (self.evaluator.library_dir / MANIFEST).is_file():
            _logger.warning("%s is gone: distilling the library again", self.evaluator.library_dir / MANIFEST)
            phase, self._candidates, self._predictor, self._models = "distill", [], None, []
        self._phase = "evaluate" if phase == "done" else phase


class BlockwiseDNA(BlockwiseStrategy):
    """DNA: distil the library, score every block path by its loss, take the exact ``top_k`` architectures of least
    summed normalised block loss within ``budget``, finetune and evaluate them.

    Parameters
    ----------
    budget : str
        ``params=N``, ``flops=N`` or ``latency_ms=X`` (suffixes k, M, G).
    top_k : int
        Architectures evaluated (and exported).
    ranking : RankingSettings or dict, optional
        Path scoring (paths per block, validation and calibration batches, latency runs).
    normalize : str
        Block-loss normalisation: ``mean``, ``min`` or ``none``.
    seed : int
        Path sample.
    device : str
        Where ranking runs (``cpu``, ``cuda``, ``auto``).
    final_evaluator : nni.nas.evaluator.Evaluator or str, optional
        Evaluates the ``top_k`` architectures instead of finetuning them, e.g. a Lightning ``Classification``.
    """

    def __init__(self, budget: str, top_k: int = 3, *, ranking: Union[RankingSettings, Mapping[str, Any], None] = None,
                 normalize: str = "mean", seed: int = 0, device: str = "cpu", final_evaluator: Any = None):
        super().__init__(SearchSettings.create("dna", budget, top_k, ranking, normalize=normalize, seed=seed,
                                               device=device), final_evaluator)


class BlockwiseDONNA(BlockwiseStrategy):
    """DONNA: distil the library, score block paths by noise-to-signal ratio, finetune ``predictor_archs`` sampled
    architectures (submitted to NNI like any model) to fit a linear accuracy predictor, search the Pareto front of
    predicted accuracy vs cost with NSGA-II, finetune and evaluate the ``top_k`` most accurate within ``budget``.

    Parameters
    ----------
    budget : str
        ``params=N``, ``flops=N`` or ``latency_ms=X``.
    top_k : int
        Architectures evaluated (and exported).
    predictor_archs : int
        Architectures finetuned to fit the predictor (>= 2).
    ranking : RankingSettings or dict, optional
        Path scoring.
    population, generations : int
        NSGA-II size.
    seed : int
        Predictor architectures, evolution.
    device : str
        Where ranking runs.
    final_evaluator : nni.nas.evaluator.Evaluator or str, optional
        Evaluates the ``top_k`` architectures instead of finetuning them, e.g. a Lightning ``Classification`` (the
        predictor architectures are finetuned: the predictor learns finetuned accuracy).
    """

    def __init__(self, budget: str, top_k: int = 3, *, predictor_archs: int = 8,
                 ranking: Union[RankingSettings, Mapping[str, Any], None] = None, population: int = 64,
                 generations: int = 60, seed: int = 0, device: str = "cpu", final_evaluator: Any = None):
        super().__init__(SearchSettings.create("donna", budget, top_k, ranking, predictor_archs=predictor_archs,
                                               population=population, generations=generations, seed=seed,
                                               device=device), final_evaluator)
