"""Fit and validate a classifier under Lightning: what teacher pretraining and finetuning run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

from torch import nn

from .data import ClassificationData
from .module import ClassifierModule
from .options import TrainerOptions
from .trainer import build_trainer, lightning_session

__all__ = ["FitResult", "fit_classifier", "validate_classifier"]


@dataclass
class FitResult:
    """What a :func:`fit_classifier` run gives back.

    Attributes
    ----------
    train_losses : list of float
        Mean training loss of every epoch.
    val_accuracies : list of float
        Top-1 validation accuracy after every epoch.
    is_global_zero : bool
        This process is rank 0 (the one that writes results; every process returns with Lightning's ``ddp``).
    log_dir : str, optional
        The run's log folder (``metrics.csv``, ``checkpoints/``).
    """

    train_losses: List[float] = field(default_factory=list)
    val_accuracies: List[float] = field(default_factory=list)
    is_global_zero: bool = True
    log_dir: Optional[str] = None

    @property
    def val_accuracy(self) -> Optional[float]:
        """The accuracy after the last epoch (``None`` without epochs or validation data)."""
        return self.val_accuracies[-1] if self.val_accuracies else None


def fit_classifier(module: ClassifierModule, data: ClassificationData, options: TrainerOptions = TrainerOptions(), *,
                   epochs: int, seed: int = 0, log_dir: Union[str, Path, None] = None, name: str = "fit",
                   progress: bool = False) -> FitResult:
    """Train ``module`` for ``epochs`` epochs on ``data`` (validating after each), seeded with ``seed``.

    ``module.model`` holds the trained weights afterwards (in this process, whatever the strategy).

    Raises
    ------
    DivergedError
        The training loss became non-finite.
    """
    if epochs < 1:
        return FitResult()
    with lightning_session(seed):
        trainer = build_trainer(options, max_epochs=epochs, log_dir=log_dir, name=name, progress=progress)
        trainer.fit(module, datamodule=data)
    return FitResult(list(module.train_losses), list(module.val_accuracies), trainer.is_global_zero,
                     trainer.log_dir if log_dir is not None else None)


def validate_classifier(model: nn.Module, data: ClassificationData, options: TrainerOptions = TrainerOptions(), *,
                        seed: int = 0) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on the whole validation set of ``data``."""
    module = model if isinstance(model, ClassifierModule) else ClassifierModule(model)
    with lightning_session(seed):
        trainer = build_trainer(options)
        trainer.validate(module, datamodule=data, verbose=False)
    return float(trainer.callback_metrics["val_acc"])
