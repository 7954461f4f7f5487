"""Whole-classifier training under PyTorch Lightning: teacher pretraining and finetuning of found architectures.

Importing this package is cheap; ``pytorch_lightning`` (seconds to import) loads with the first name used from it,
so config checks (:mod:`.options`) stay light.
"""

import importlib
from typing import Any

_WHERE = {
    "ClassificationData": "data", "EpochBatchSampler": "data", "ValBatchSampler": "data",
    "FitResult": "fit", "fit_classifier": "fit", "validate_classifier": "fit",
    "ClassifierModule": "module", "DivergedError": "module",
    "PRECISIONS": "options", "STRATEGIES": "options", "TrainerOptions": "options", "check_trainer_options": "options",
    "build_trainer": "trainer", "lightning_session": "trainer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
