"""Whole-classifier training under PyTorch Lightning: teacher pretraining and finetuning of found architectures.

Importing this package is cheap; ``pytorch_lightning`` (seconds to import) loads with the first name used from it,
so config checks (:mod:`.options`) stay light.
"""

from ..imports import lazy_names

_WHERE = {
    "ClassificationData": "data", "EpochBatchSampler": "data", "ValBatchSampler": "data",
    "FitResult": "fit", "fit_classifier": "fit", "validate_classifier": "fit",
    "ClassifierModule": "module", "DivergedError": "module",
    "PRECISIONS": "options", "STRATEGIES": "options", "TrainerOptions": "options", "check_trainer_options": "options",
    "build_trainer": "trainer", "lightning_session": "trainer",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
