"""Evaluate a found architecture with your NNI evaluator (e.g. a Lightning ``Classification``) instead of finetuning."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

import nni
from nni.nas.evaluator import Evaluator, MutableEvaluator
from nni.runtime.trial_command_channel import get_default_trial_command_channel, set_default_trial_command_channel
from nni.runtime.trial_command_channel.base import TrialCommandChannel

from ..imports import import_object
from .compat import fresh_evaluator

__all__ = ["FinalEvaluatorError", "resolve_final_evaluator", "run_final_evaluator", "default_metric"]

_logger = logging.getLogger(__name__)


class FinalEvaluatorError(TypeError):
    """The final evaluator is not an NNI evaluator, or it reported no usable final metric."""


def resolve_final_evaluator(value: Union[str, Evaluator], base_dir: Union[str, Path, None] = None) -> Evaluator:
    """The NNI evaluator ``value`` is or names.

    Parameters
    ----------
    value : Evaluator or str
        An NNI evaluator (``nni.nas.evaluator.pytorch.Classification``, ``Lightning``, ``FunctionalEvaluator`` ...),
        or the import path of a function without arguments returning one (``package.module:function``; what an
        ``nnictl`` config can name).
    base_dir : str or Path, optional
        Folder where a module of an import path may lie as well (the config's folder).

    Raises
    ------
    FinalEvaluatorError
        ``value`` is (or gives) something else, a ``BlockwiseDistillation``, or an evaluator with choices left
        (``nni.choice`` in its arguments).
    """
    where = "final_evaluator"
    evaluator: Any = value
    if isinstance(value, str):
        evaluator = import_object(value, where, base_dir)()
        where = f"final_evaluator = {value!r} gave {type(evaluator).__name__}:"
    if not isinstance(evaluator, Evaluator):
        raise FinalEvaluatorError(f"{where} must be an NNI evaluator (e.g. nni.nas.evaluator.pytorch.Classification) "
                                  f"or the import path of a function returning one; got {type(evaluator).__name__}")
    from .evaluator import BlockwiseDistillation

    if isinstance(evaluator, BlockwiseDistillation):
        raise FinalEvaluatorError(f"{where} is a BlockwiseDistillation: that is the built-in finetuning already; "
                                  "leave final_evaluator unset for it")
    if isinstance(evaluator, MutableEvaluator) and evaluator.is_mutable():
        raise FinalEvaluatorError(f"{where} {type(evaluator).__name__} still has choices (nni.choice in its "
                                  "arguments); give fixed values, one evaluator evaluates every architecture")
    return evaluator


class _HeldReports(TrialCommandChannel):
    """Collects the metrics an evaluator reports; passes intermediate ones on to NNI inside a trial."""

    def __init__(self, inner: Optional[TrialCommandChannel]):
        self.inner = inner
        self.intermediates: List[Any] = []
        self.final: Any = None

    def receive_parameter(self):  # pragma: no cover - evaluators do not ask
        return self.inner.receive_parameter() if self.inner is not None else None

    def send_metric(self, type, parameter_id, trial_job_id, sequence, value) -> None:  # noqa: A002 (NNI's name)
        if type == "FINAL":
            self.final = value
            return
        self.intermediates.append(value)
        if self.inner is not None:
            self.inner.send_metric(type, parameter_id, trial_job_id, sequence, value)


@contextlib.contextmanager
def _held_reports(sample: Mapping[str, Any]) -> Iterator[_HeldReports]:
    """Let an evaluator report as in an NNI trial (outside one, too), holding back its final metric."""
    import nni.trial as trial

    inner = get_default_trial_command_channel()
    inside = nni.get_current_parameter() is not None
    held = _HeldReports(inner if inside else None)
    params = trial._params
    set_default_trial_command_channel(held)
    if not inside:  # NNI's evaluators report only when a trial parameter is set
        trial._params = {"parameter_id": None, "parameters": dict(sample)}
    try:
        yield held
    finally:
        set_default_trial_command_channel(inner)
        trial._params = params


def default_metric(value: Any) -> float:
    """The number NNI ranks by: ``value`` itself, or its ``default``."""
    number = value.get("default") if isinstance(value, Mapping) else value
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise FinalEvaluatorError(f"the final evaluator reported {value!r}; NNI needs a number or a dict with a "
                                  "numeric 'default'")
    return float(number)


def run_final_evaluator(evaluator: Evaluator, network: Any, sample: Mapping[str, Any]) -> Dict[str, Any]:
    """Evaluate ``network`` (the architecture ``sample``) with a fresh copy of ``evaluator``, Lightning's info logs
    held back; the caller's random states stay as they were.

    Returns
    -------
    dict
        ``final`` (what the evaluator reported with ``nni.report_final_result``) and ``intermediates``.

    Raises
    ------
    FinalEvaluatorError
        The evaluator reported no final metric, or not a number (nor a dict with a numeric ``default``).
    """
    from ..lightning.trainer import lightning_session

    evaluator = fresh_evaluator(evaluator)
    with _held_reports(sample) as held, lightning_session(None):  # Lightning's info lines held back
        evaluator.evaluate(network)
    if held.final is None:
        logged = sorted(getattr(getattr(evaluator, "trainer", None), "callback_metrics", {}) or {})
        raise FinalEvaluatorError(
            f"the final evaluator {type(evaluator).__name__} reported no final metric (nni.report_final_result); "
            "NNI's Classification and Regression report one when fit ends, a Lightning evaluator when its module "
            "does (subclass nni.nas.evaluator.pytorch.SupervisedLearningModule)"
            + (f"; its trainer logged {logged}" if logged else ""))
    default_metric(held.final)
    return {"final": held.final, "intermediates": list(held.intermediates)}
