"""``BlockwiseTuner``: blockwise-distillation NAS under ``nnictl create`` (distillation trial, search, evaluation trials)."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Union

from nni.tuner import Tuner

from .compat import patch_json_comments
from .jobconfig import METHODS, resolve_config
from .space import check_space, space_choices

__all__ = ["BlockwiseTuner", "experiment_params", "NNI_RESULTS", "TASKS"]

_logger = logging.getLogger(__name__)

NNI_RESULTS = "nni_results.json"
"""Written into the library folder when every evaluation trial has ended: architectures and their metrics."""

TASKS = ("distill", "evaluate")
"""The ``task`` of a trial's parameters (see :mod:`nni_pipebd.nni.trial`)."""


def experiment_params(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The experiment config NNI's manager passes to the dispatcher process (``--exp_params``, base64 JSON).

    Returns ``{}`` outside a dispatcher process (e.g. when the tuner is built in a test).
    """
    argv = list(sys.argv if argv is None else argv)
    encoded = None
    for i, arg in enumerate(argv):
        if arg == "--exp_params" and i + 1 < len(argv):
            encoded = argv[i + 1]
        elif arg.startswith("--exp_params="):
            encoded = arg.split("=", 1)[1]
    if encoded is None:
        return {}
    try:
        return json.loads(base64.b64decode(encoded).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError) as err:
        _logger.warning("cannot read the experiment config from --exp_params (%s); relative paths resolve against "
                        "the working directory", err)
        return {}


class BlockwiseTuner(Tuner):
    """NNI tuner running blockwise-distillation NAS from ``nnictl create``.

    Trials run ``python -m nni_pipebd.nni.trial``. The first trial distils the block library (the configured executor
    spawns its workers; give it GPUs with ``trialGpuNumber``). When it has ended, this tuner searches the library
    (DNA: exact constrained search; DONNA: first ``predictor_archs`` finetuning trials fit the accuracy predictor,
    then NSGA-II) and issues one finetune/evaluate trial per found architecture. Every trial reports its final
    metric with ``nni.report_final_result`` (distillation: minus the mean block loss, per-epoch block losses as
    intermediates; evaluation: validation accuracy). Requests that come while a step is still running are answered
    once it is done. With ``maxTrialNumber`` equal to :attr:`required_trials` the experiment ends ``DONE``.

    The tuner reads the library, so it must see the library folder (shared storage on remote and Kubernetes
    training services: ``tuner_library_dir`` is the same folder where this process mounts it).

    Parameters
    ----------
    config : str or dict
        The job: a YAML path or plain data (as in the YAML).
    library_dir : str
        The block library folder, as the trials see it.
    budget : str
        ``params=N``, ``flops=N`` or ``latency_ms=X`` (suffixes k, M, G).
    method : str
        ``dna`` or ``donna``.
    top_k : int
        Architectures evaluated at the end.
    overrides : dict, optional
        Changes merged into the config's sections, e.g. ``{"execution": {"workers": 4}}``.
    finetune : dict, optional
        :class:`~nni_pipebd.search.finetune.FinetuneSettings` fields of the evaluation trials.
    ranking : dict, optional
        :class:`~nni_pipebd.search.ranking.RankingSettings` fields.
    normalize : str
        DNA block-loss normalisation (``mean``, ``min``, ``none``).
    predictor_archs, population, generations : int
        DONNA settings.
    seed : int
        Search seed.
    search_device : str
        Where this process ranks the library (``cpu``, ``cuda``, ``auto``).
    device : str
        Finetuning device of the evaluation trials (``auto``, ``cpu``, ``cuda``).
    if_exists : str
        ``reuse`` (a finished library with the same config is not trained again), ``overwrite`` or ``error``.
    code_dir : str, optional
        Folder that relative ``config`` and ``library_dir`` resolve against; default: the experiment's
        ``trialCodeDirectory``, else the working directory.
    tuner_library_dir : str, optional
        The library folder as this process sees it (default: ``library_dir``).
    final_evaluator : str or nni.nas.evaluator.Evaluator, optional
        Evaluates the candidate architectures in their trials instead of the built-in finetuning: the import path
        of a function returning an NNI evaluator (``package.module:function``, found in the code directory too;
        what ``classArgs`` can name), or, built from Python, the evaluator itself (e.g. a Lightning
        ``Classification``; trials receive it serialised by ``nni.dump``). A trial reports its final metric with
        the architecture's costs beside it.
    """

    def __init__(self, config: Union[str, Mapping[str, Any]], library_dir: str, budget: str, method: str = "dna",
                 top_k: int = 3, *, overrides: Optional[Mapping[str, Any]] = None,
                 finetune: Optional[Mapping[str, Any]] = None, ranking: Optional[Mapping[str, Any]] = None,
                 normalize: str = "mean", predictor_archs: int = 8, population: int = 64, generations: int = 60,
                 seed: int = 0, search_device: str = "cpu", device: str = "auto", if_exists: str = "reuse",
                 code_dir: Optional[str] = None, tuner_library_dir: Optional[str] = None,
                 final_evaluator: Any = None):
        patch_json_comments()
        params = experiment_params()
        root = Path(code_dir or params.get("trialCodeDirectory") or os.getcwd()).expanduser()

        def resolve(path: str) -> str:
            return str(Path(path).expanduser() if Path(path).expanduser().is_absolute() else root / path)

        if method not in METHODS:
            raise ValueError(f"method = {method!r} is not valid; choose one of {list(METHODS)}")
        for name, value in (("top_k", top_k), ("predictor_archs", predictor_archs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r} must be an int >= 1")
        if isinstance(config, str):
            config = resolve(config)
        resolve_config(config, str(root), overrides)  # a bad config fails here, before NNI starts any trial
        # Everything that imports torch waits for the first command: NNI's manager gives this process 10 seconds
        # from its start to connect, and importing torch can take longer than that on a busy machine.
        self._evaluator_args: Dict[str, Any] = dict(
            config=config, library_dir=resolve(library_dir), base_dir=str(root), overrides=overrides,
            finetune=finetune, if_exists=if_exists, device=device, final_evaluator=final_evaluator)
        self._search_args: Dict[str, Any] = dict(
            method=method, budget=budget, top_k=top_k, ranking=dict(ranking or {}), normalize=normalize,
            predictor_archs=predictor_archs, population=population, generations=generations, seed=seed,
            device=search_device)
        self._tuner_library_dir = resolve(tuner_library_dir) if tuner_library_dir else None
        self._method, self._top_k, self._predictor_archs = method, top_k, predictor_archs
        max_trials = params.get("maxTrialNumber")
        if isinstance(max_trials, int) and max_trials < self.required_trials:
            raise ValueError(f"maxTrialNumber = {max_trials} but this flow runs {self.required_trials} trials "
                             f"({self._trial_counts()}); set maxTrialNumber: {self.required_trials}")
        if params and max_trials != self.required_trials:
            _logger.warning("maxTrialNumber is %s; with maxTrialNumber: %d (%s) the experiment ends DONE, otherwise "
                            "it stays NO_MORE_TRIAL when the flow is complete", max_trials, self.required_trials,
                            self._trial_counts())
        self.evaluator: Any = None
        self.settings: Any = None
        self.library_dir: Optional[Path] = None
        self._trial_settings: Dict[str, Any] = {}
        self._lock = threading.RLock()
        self._phase = "distill"
        self._ready: Deque[Dict[str, Any]] = deque()
        self._waiting: Deque[int] = deque()
        self._callback: Optional[Callable[[int, Any], None]] = None
        self._issued: Dict[int, Dict[str, Any]] = {}
        self._ended: Dict[int, bool] = {}
        self._results: Dict[int, Any] = {}
        self._predictors: List[int] = []
        self._candidates: List[int] = []

    def _setup(self) -> None:
        """Build the evaluator and the search settings (imports torch); idempotent."""
        if self.evaluator is not None:
            return
        from .evaluator import BlockwiseDistillation
        from .flow import SearchSettings

        args = dict(self._search_args)
        self.settings = SearchSettings.create(args.pop("method"), args.pop("budget"), args.pop("top_k"),
                                              args.pop("ranking"), **args)
        self.evaluator = BlockwiseDistillation(**self._evaluator_args)
        self.evaluator.resolved_final_evaluator()  # an import path that does not import fails here, not in trials
        self.library_dir = Path(self._tuner_library_dir) if self._tuner_library_dir else self.evaluator.library_dir
        self._trial_settings = self.evaluator.settings()
        self._ready.append({"task": "distill", "evaluator": self._trial_settings})
        _logger.info("BlockwiseTuner: %s search under %s, top %d; library %s; %d trials", self.settings.method.upper(),
                     self.settings.budget, self.settings.top_k, self.evaluator.library_dir, self.required_trials)

    @property
    def required_trials(self) -> int:
        """1 distillation + (DONNA) ``predictor_archs`` + ``top_k`` evaluations: set ``maxTrialNumber`` to this."""
        return 1 + self._top_k + (self._predictor_archs if self._method == "donna" else 0)

    @property
    def phase(self) -> str:
        """``distill``, ``predict`` (DONNA), ``evaluate`` or ``done``."""
        return self._phase

    def _trial_counts(self) -> str:
        parts = ["1 distillation"]
        if self._method == "donna":
            parts.append(f"{self._predictor_archs} predictor evaluations")
        parts.append(f"top_k = {self._top_k} evaluations")
        return " + ".join(parts)

    # --- NNI's tuner interface -------------------------------------------------------------------------------

    def update_search_space(self, search_space: Mapping[str, Any]) -> None:
        """An empty search space is fine (the job defines the space); a given one must equal the library's."""
        with self._lock:
            self._setup()
        if search_space:
            check_space(space_choices(search_space), self.evaluator.space_choices(), where="the experiment's search space")

    def generate_parameters(self, parameter_id: int, **kwargs: Any) -> Dict[str, Any]:
        """Parameters of the next trial ready to run; ``NoMoreTrialError`` when none is ready now."""
        from nni import NoMoreTrialError

        params = self.generate_multiple_parameters([parameter_id], **kwargs)
        if not params:
            raise NoMoreTrialError("no trial is ready: the tuner waits for running trials (it sends the next ones "
                                   "when they are)")
        return params[0]

    def generate_multiple_parameters(self, parameter_id_list: List[int], **kwargs: Any) -> List[Dict[str, Any]]:
        """Trials ready now, in order; ids asked for beyond them are answered later through NNI's callback."""
        with self._lock:
            self._setup()
            if kwargs.get("st_callback") is not None:
                self._callback = kwargs["st_callback"]
            out: List[Dict[str, Any]] = []
            more_later = self._phase in ("distill", "predict")  # the next step's trials are not known yet
            for parameter_id in parameter_id_list:
                # NNI pairs the answer with the ids by position: once one id waits, the ids after it wait too
                if self._ready and not self._waiting:
                    out.append(self._issue(parameter_id, self._ready.popleft()))
                elif more_later:
                    self._waiting.append(parameter_id)
                else:
                    break
            return out

    def receive_trial_result(self, parameter_id: int, parameters: Any, value: Any, **kwargs: Any) -> None:
        with self._lock:
            self._setup()
            self._results[parameter_id] = value
            _logger.info("trial %d (%s) reported %s", parameter_id, self._describe(parameter_id), value)
            self._advance()

    def trial_end(self, parameter_id: int, success: bool, **kwargs: Any) -> None:
        with self._lock:
            self._setup()
            self._ended[parameter_id] = bool(success)
            if not success:
                _logger.error("trial %d (%s) failed", parameter_id, self._describe(parameter_id))
            self._advance()

    def import_data(self, data: List[Any]) -> None:
        _logger.info("BlockwiseTuner ignores %d imported results: the flow runs its own trials", len(data))

    # --- the flow -----------------------------------------------------------------------------------------------

    def _describe(self, parameter_id: int) -> str:
        params = self._issued.get(parameter_id, {})
        if params.get("task") == "evaluate":
            return f"{params['role']} #{params['rank']}"
        return params.get("task", "unknown")

    def _issue(self, parameter_id: int, params: Dict[str, Any]) -> Dict[str, Any]:
        self._issued[parameter_id] = params
        if params["task"] == "evaluate":
            (self._predictors if params["role"] == "predictor" else self._candidates).append(parameter_id)
        _logger.info("trial parameter %d: %s", parameter_id, self._describe(parameter_id))
        return params

    def _flush(self) -> None:
        while self._waiting and self._ready:
            if self._callback is None:
                return
            parameter_id = self._waiting.popleft()
            self._callback(parameter_id, self._issue(parameter_id, self._ready.popleft()))

    def _finished(self, ids: Sequence[int], need_metric: bool) -> bool:
        return all(i in self._ended and (not need_metric or not self._ended[i] or i in self._results) for i in ids)

    def _advance(self) -> None:
        from .flow import dna_candidates, donna_candidates, predictor_samples

        if self._phase == "distill":
            distill = [i for i, p in self._issued.items() if p["task"] == "distill"]
            if not distill or not self._finished(distill, need_metric=False):
                return
            if not self._ended[distill[0]]:
                raise RuntimeError(f"the distillation trial (parameter {distill[0]}) failed; its stderr is in the "
                                   "web UI (trial detail) and in the experiment folder's trials/<id>/stderr — fix it "
                                   "and create the experiment again (a finished library is reused)")
            if self.settings.method == "dna":
                self._queue_candidates(dna_candidates(self.library_dir, self.settings))
            else:
                samples = predictor_samples(self.library_dir, self.settings)
                self._queue([{"task": "evaluate", "role": "predictor", "rank": i, "sample": s,
                              "evaluator": self._trial_settings} for i, s in enumerate(samples)], "predict")
        elif self._phase == "predict":
            if len(self._predictors) < self.settings.predictor_archs or \
                    not self._finished(self._predictors, need_metric=True):
                return
            done = [i for i in self._predictors if self._ended[i] and i in self._results]
            accuracies = [_default_metric(self._results[i]) for i in done]
            architectures, _ = donna_candidates(self.library_dir, self.settings,
                                                [self._issued[i]["sample"] for i in done], accuracies)
            self._queue_candidates(architectures)
        elif self._phase == "evaluate":
            if not self._finished(self._candidates, need_metric=True) or self._ready:
                return
            self._phase = "done"
            self._write_results()

    def _queue_candidates(self, architectures: List[Dict[str, Any]]) -> None:
        if len(architectures) < self.settings.top_k:
            _logger.warning("only %d architectures fit %s (top_k = %d): the experiment will stay NO_MORE_TRIAL "
                            "instead of reaching DONE", len(architectures), self.settings.budget, self.settings.top_k)
        self._queue([{"task": "evaluate", "role": "candidate", "rank": a["rank"], "sample": a["sample"],
                      "search": {k: v for k, v in a.items() if k not in ("sample", "rank")},
                      "evaluator": self._trial_settings} for a in architectures], "evaluate")

    def _queue(self, params: List[Dict[str, Any]], phase: str) -> None:
        self._ready.extend(params)
        self._phase = phase
        _logger.info("phase %s: %d trials ready", phase, len(params))
        self._flush()
        if phase == "evaluate" and not params:
            self._phase = "done"
            self._write_results()

    def _write_results(self) -> None:
        from ..library import atomic_save

        rows = []
        for i in self._candidates:
            params = self._issued[i]
            rows.append({"parameter_id": i, "rank": params["rank"], "sample": params["sample"],
                         "search": params.get("search", {}), "succeeded": self._ended.get(i, False),
                         "metric": self._results.get(i)})
        rows.sort(key=lambda r: -_default_metric(r["metric"]) if r["metric"] is not None else float("inf"))
        path = self.library_dir / NNI_RESULTS
        atomic_save({"method": self.settings.method, "budget": self.settings.budget, "architectures": rows}, path)
        best = rows[0] if rows and rows[0]["metric"] is not None else None
        _logger.info("all %d evaluation trials ended; results in %s; best: %s", len(rows), path,
                     None if best is None else (best["sample"], best["metric"]))


def _default_metric(value: Any) -> float:
    if isinstance(value, Mapping):
        value = value.get("default")
    if not isinstance(value, (int, float)):
        raise ValueError(f"trial metric {value!r} is neither a number nor a dict with a numeric 'default'")
    return float(value)
