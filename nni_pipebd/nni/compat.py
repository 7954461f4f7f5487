"""NNI 3.0 workarounds here: JSON comment stripping, ``pkg_resources`` for nnictl, a fresh evaluator per model."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = [
    "PATCHED_MODULES", "load_keeping_comments", "patch_json_comments", "unpatch_json_comments",
    "json_comments_patched", "nnictl_problem", "require_nnictl", "fresh_trainer", "fresh_evaluator",
]

_logger = logging.getLogger(__name__)

PATCHED_MODULES: Tuple[str, ...] = (
    "nni",
    "nni.common",
    "nni.common.serializer",
    "nni.runtime.msg_dispatcher",
    "nni.runtime.msg_dispatcher_base",
    "nni.runtime.tuner_command_channel.channel",
    "nni.runtime.trial_command_channel.local_legacy",
)
"""Modules whose ``load`` (NNI's JSON loader, bound at their import) :func:`patch_json_comments` replaces."""

_original_load: Optional[Callable[..., Any]] = None
_replaced: Dict[str, Any] = {}


def _serializer_load() -> Callable[..., Any]:
    from nni.common import serializer

    return _original_load if _original_load is not None else serializer.load


def load_keeping_comments(string: Optional[str] = None, *, fp: Optional[Any] = None, preserve_order: bool = False,
                          ignore_comments: bool = False, **json_tricks_kwargs: Any) -> Any:
    """NNI's ``nni.load`` with ``ignore_comments=False`` by default.

    NNI 3.0 passes ``ignore_comments=True`` to json-tricks, which strips everything after ``#`` or ``//`` on a line
    unless it can tell the symbol sits inside a string; it miscounts quotes around escaped quotes, so a payload such
    as ``{"a": "x\\"//y"}`` (or a base64 pickle, upstream issue #5684) is cut and fails to parse. NNI's own payloads
    are plain JSON: there are no comments to strip.
    """
    return _serializer_load()(string, fp=fp, preserve_order=preserve_order, ignore_comments=ignore_comments,
                              **json_tricks_kwargs)


def patch_json_comments() -> None:
    """Make every NNI loader keep comment-like text (``ignore_comments=False``); idempotent.

    Applied by the strategy when the experiment runs on NNI's training-service engine (the websocket channel and the
    engine's model listing load payloads), by :class:`~nni_pipebd.nni.tuner.BlockwiseTuner` (the dispatcher process)
    and by the trial entry point before it asks for its parameters. The sequential engine needs none of it.
    """
    global _original_load
    from nni.common import serializer

    if _original_load is None:
        _original_load = serializer.load
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        current = getattr(module, "load", None)
        if current is load_keeping_comments:
            continue
        if current is not _original_load:
            _logger.debug("%s.load is not NNI's loader (%r); leaving it alone", name, current)
            continue
        _replaced[name] = current
        setattr(module, "load", load_keeping_comments)
    _logger.debug("NNI's JSON loader keeps comment-like text in %s", sorted(_replaced))


def unpatch_json_comments() -> None:
    """Undo :func:`patch_json_comments` (tests)."""
    for name, original in list(_replaced.items()):
        setattr(importlib.import_module(name), "load", original)
        del _replaced[name]


def json_comments_patched() -> bool:
    """Whether :func:`patch_json_comments` is in effect for ``nni.load``."""
    import nni

    return nni.load is load_keeping_comments


def nnictl_problem() -> Optional[str]:
    """Why ``nnictl`` cannot start here, or ``None`` when it can.

    ``nnictl`` imports ``pkg_resources``, which setuptools 81 removed; this package depends on ``setuptools<81``.
    """
    if importlib.util.find_spec("pkg_resources") is None:
        return ("nnictl cannot start: it imports pkg_resources, which setuptools >= 81 no longer ships; install "
                "'setuptools<81' (a dependency of nni-pipebd), or run the experiment from Python with "
                "nni.experiment.Experiment(ExperimentConfig.load(PATH)).run(PORT), which does not need it")
    return None


def require_nnictl() -> None:
    """Raise ``RuntimeError`` with the fix when ``nnictl`` cannot start (see :func:`nnictl_problem`)."""
    problem = nnictl_problem()
    if problem is not None:
        raise RuntimeError(problem)


def fresh_trainer(evaluator: Any) -> Any:
    """Give an NNI Lightning evaluator a new ``Trainer`` built from its traced arguments; returns the evaluator.

    NNI 3.0's sequential engine reuses one evaluator object for every model; a ``Trainer`` that already ran keeps
    its state, and the second model fails with ``KeyError: 'val_acc'``. Anything that is not a Lightning evaluator
    with a traced trainer is returned unchanged.
    """
    trainer = getattr(evaluator, "trainer", None)
    if trainer is None or not hasattr(trainer, "trace_copy"):
        return evaluator
    evaluator.trainer = trainer.trace_copy().get()
    return evaluator


def fresh_evaluator(evaluator: Any) -> Any:
    """A new instance of a traced NNI evaluator, rebuilt from its traced arguments, with its own ``Trainer`` and
    Lightning module (a deep copy when the module is an argument that is not traced); data loaders are shared.

    What the final evaluation runs every architecture with: every one starts from the same state, and a ``Trainer``
    that already ran is never reused (see :func:`fresh_trainer`). An untraced evaluator is returned unchanged.
    """
    import copy

    if not hasattr(evaluator, "trace_copy"):
        return evaluator
    fresh = evaluator.trace_copy().get()
    if getattr(fresh, "trainer", None) is getattr(evaluator, "trainer", None):
        fresh_trainer(fresh)
    module = getattr(fresh, "module", None)
    if module is not None and module is getattr(evaluator, "module", None):
        fresh.module = module.trace_copy().get() if hasattr(module, "trace_copy") else copy.deepcopy(module)
    return fresh
