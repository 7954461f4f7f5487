"""``ClassifierModule``: a classifier trained with cross-entropy or distilled from a teacher, and its top-1 accuracy."""

from __future__ import annotations

import math
import multiprocessing
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from .trainer import quiet_lightning

__all__ = ["ClassifierModule", "DivergedError", "OPTIMIZERS", "SCHEDULES"]

if multiprocessing.current_process().name != "MainProcess":  # a spawned data-parallel worker: quiet, too
    quiet_lightning()

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "onecycle", "constant")


class DivergedError(RuntimeError):
    """The training loss became non-finite."""


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits as float32 (softmax at a temperature); others unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class ClassifierModule(pl.LightningModule):
    """Train ``model`` on labelled images, optionally distilling a frozen ``teacher`` into it, and measure its
    top-1 accuracy on the validation data.

    The loss is ``kd_weight * T^2 * KL(teacher || model at temperature T) + (1 - kd_weight) * CE(labels)`` with a
    teacher, ``CE(labels)`` without. Per epoch it records the mean training loss (``train_losses``) and the
    validation accuracy (``val_accuracies``); both travel with the module's ``state_dict`` (extra state), so they
    come back from spawned data-parallel processes with the weights. Under data parallelism the accuracy counts
    every validation sample of every rank once.

    Parameters
    ----------
    model : nn.Module
        The classifier (logits ``[B, classes]``); trained in place.
    teacher : nn.Module, optional
        Frozen teacher (kept in eval mode, no gradients); left out of checkpoints.
    kd_weight, temperature : float
        Knowledge-distillation weight and temperature (with a teacher).
    optimizer : str
        ``adam`` or ``sgd`` (momentum, Nesterov).
    lr, weight_decay, momentum : float
        Optimizer settings (``momentum``: SGD only).
    schedule : str
        Learning rate per step: ``cosine`` (to 0 over ``total_steps``), ``onecycle`` (peak ``lr``) or ``constant``.
    total_steps : int
        Optimizer steps of the whole run (for the schedule).
    """

    def __init__(self, model: nn.Module, *, teacher: Optional[nn.Module] = None, kd_weight: float = 0.9,
                 temperature: float = 4.0, optimizer: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0,
                 momentum: float = 0.9, schedule: str = "cosine", total_steps: int = 1):
        super().__init__()
        if optimizer not in OPTIMIZERS or schedule not in SCHEDULES:
            raise ValueError(f"optimizer = {optimizer!r}, schedule = {schedule!r}: choose the optimizer from "
                             f"{list(OPTIMIZERS)} and the schedule from {list(SCHEDULES)}")
        self.model = model
        self.teacher = None if teacher is None else teacher.eval().requires_grad_(False)
        self.kd_weight, self.temperature = kd_weight, temperature
        self.optimizer_name, self.lr, self.weight_decay, self.momentum = optimizer, lr, weight_decay, momentum
        self.schedule, self.total_steps = schedule, max(1, int(total_steps))
        self.train_losses: List[float] = []
        self.val_accuracies: List[float] = []
        self._loss_sum, self._steps = 0.0, 0
        self._correct: Optional[torch.Tensor] = None
        self._total: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train(self, mode: bool = True) -> "ClassifierModule":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # --- training ----------------------------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        self.model.train()  # Lightning 2.x keeps the modes it finds; the model may come in eval mode
        self._loss_sum, self._steps = 0.0, 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        if self.teacher is not None:
            t = self.temperature
            with torch.no_grad():
                target = F.softmax(_wide(self.teacher(images)) / t, dim=1)
            kd = F.kl_div(F.log_softmax(_wide(logits) / t, dim=1), target, reduction="batchmean") * t * t
            loss = self.kd_weight * kd + (1 - self.kd_weight) * loss
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DivergedError(f"the training loss is {value} at epoch {self.current_epoch}, step {batch_idx}; "
                                f"lower the learning rate (lr = {self.lr})")
        self._loss_sum += value
        self._steps += 1
        return loss

    def on_train_epoch_end(self) -> None:
        mean = torch.tensor(self._loss_sum / max(self._steps, 1), dtype=torch.float64, device=self.device)
        mean = float(self.trainer.strategy.reduce(mean, reduce_op="mean"))
        self.train_losses.append(mean)
        self.log("train_loss", mean, sync_dist=True)  # the same value on every rank

    def configure_optimizers(self) -> Dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=True,
                                        weight_decay=self.weight_decay)
        if self.schedule == "constant":
            return {"optimizer": optimizer}
        if self.schedule == "cosine":
            scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.total_steps)
        else:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- validation --------------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self._total = torch.zeros((), dtype=torch.int64, device=self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        self._correct += (self.model(images).argmax(1) == labels).sum()
        self._total += labels.numel()

    def on_validation_epoch_end(self) -> None:
        correct = int(self.trainer.strategy.reduce(self._correct, reduce_op="sum"))
        total = int(self.trainer.strategy.reduce(self._total, reduce_op="sum"))
        accuracy = correct / max(total, 1)
        self.log("val_acc", accuracy, sync_dist=True)
        if not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
            self.val_accuracies.append(accuracy)

    # --- state -------------------------------------------------------------------------------------------------

    def get_extra_state(self) -> Dict[str, List[float]]:
        return {"train_losses": list(self.train_losses), "val_accuracies": list(self.val_accuracies)}

    def set_extra_state(self, state: Dict[str, List[float]]) -> None:
        self.train_losses = list(state.get("train_losses", []))
        self.val_accuracies = list(state.get("val_accuracies", []))

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        weights = checkpoint.get("state_dict", {})
        for key in [k for k in weights if k.startswith("teacher.")]:
            del weights[key]
