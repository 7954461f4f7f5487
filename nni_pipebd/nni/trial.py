"""Trial entry point for ``nnictl`` experiments: ``python -m nni_pipebd.nni.trial`` (parameters from BlockwiseTuner)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..known_warnings import hide_in_script

__all__ = ["run_trial", "main"]

_logger = logging.getLogger(__name__)


def run_trial(params: Mapping[str, Any]) -> Dict[str, Any]:
    """Run the trial ``params`` describes and report its metrics to NNI (when inside a trial).

    Parameters
    ----------
    params : dict
        ``{"task": "distill", "evaluator": {...}}`` or ``{"task": "evaluate", "sample": {...}, "evaluator": {...},
        "role": ..., "rank": ...}``; ``evaluator`` holds :class:`~nni_pipebd.nni.evaluator.BlockwiseDistillation`
        arguments.

    Returns
    -------
    dict
        The library manifest (``distill``) or the finetuning result (``evaluate``; a candidate's evaluation by the
        final evaluator when the evaluator settings name one).

    Raises
    ------
    ValueError
        ``params`` is not one of these forms.
    """
    from .evaluator import BlockwiseDistillation
    from .tuner import TASKS

    if not isinstance(params, Mapping) or params.get("task") not in TASKS or not isinstance(params.get("evaluator"),
                                                                                           Mapping):
        raise ValueError(f"trial parameters must be a dict with 'task' in {list(TASKS)} and 'evaluator' (the "
                         f"BlockwiseTuner's parameters); got {str(params)[:300]}")
    evaluator = BlockwiseDistillation(**params["evaluator"])
    if params["task"] == "distill":
        return evaluator.distill()
    if not isinstance(params.get("sample"), Mapping):
        raise ValueError(f"an evaluate trial needs 'sample' ({{label: candidate}}); got {params.get('sample')!r}")
    _logger.info("evaluating %s architecture #%s: %s", params.get("role", "candidate"), params.get("rank", "?"),
                 params["sample"])
    return evaluator.evaluate_architecture(params["sample"], params.get("role", "candidate"))


def main(argv: Optional[List[str]] = None) -> int:
    """Read the parameters (from NNI, or ``--params FILE`` to rerun a trial by hand), run the trial.

    Returns 0, or 143 / 130 when SIGTERM (``nnictl stop``, a cancelled trial) / SIGINT stopped a distillation: its
    workers are gone and its checkpoint stays in the library folder for the next experiment to resume.
    """
    parser = argparse.ArgumentParser(prog="python -m nni_pipebd.nni.trial", description=__doc__)
    parser.add_argument("--params", help="JSON file with a trial's parameters (runs without NNI; nothing reported)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hide_in_script()  # the trial's log shows what the CLI would: no known third-party warnings
    if args.params:
        params = json.loads(Path(args.params).read_text())
    else:
        import nni

        from .compat import patch_json_comments

        patch_json_comments()
        params = nni.get_next_parameter()
        if params is None:
            raise SystemExit("no trial parameters: run under nnictl with the BlockwiseTuner, or pass --params FILE")
        _logger.info("NNI trial %s (experiment %s): task %r, CUDA_VISIBLE_DEVICES=%r", nni.get_trial_id(),
                     nni.get_experiment_id(), params.get("task") if isinstance(params, dict) else None,
                     os.environ.get("CUDA_VISIBLE_DEVICES"))
    from ..executors.stopping import RunStopped

    if isinstance(params, dict) and params.get("task") == "distill":  # the server imports beside this process
        from ..executors.forkserver import start_server_for

        execution = ((params.get("evaluator") or {}).get("config") or {}).get("execution") or {}
        start_server_for(execution.get("executor", "reference"), execution.get("workers", 1))
    try:
        run_trial(params)
    except RunStopped as stopped:  # nnictl stop / trial cancel: SIGTERM; the next experiment resumes the run
        _logger.warning("%s; an experiment with if_exists: reuse resumes it", stopped)
        return stopped.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
