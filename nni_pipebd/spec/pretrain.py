"""Train and cache a teacher when its checkpoint is absent (small data such as digits)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F

from ..config import Config
from ..data.datasets import build_dataset, make_loader
from ..data.order import BatchOrder
from ..library import atomic_save
from .teachers import build_teacher

__all__ = ["prepare_teacher", "train_teacher", "evaluate"]

_logger = logging.getLogger(__name__)


def prepare_teacher(config: Config) -> None:
    """Make sure the teacher checkpoint the config names exists; train and cache it if allowed."""
    teacher = config.model.teacher
    path = config.resolve_path(teacher.checkpoint)
    if path is None or path.is_file() or not teacher.train_if_missing:
        return
    _logger.info("teacher checkpoint %s is absent: training %s on %s for %d epochs and caching it there",
                 path, teacher.class_path or teacher.arch or "mobilenet_v2", config.data.class_path or
                 config.data.name or "digits", teacher.train_epochs)
    metrics = train_teacher(config, path)
    _logger.info("teacher cached at %s (val accuracy %.4f)", path, metrics["val_accuracy"])


def train_teacher(config: Config, path: Path) -> Dict[str, float]:
    """Train the configured teacher with cross-entropy on the training split and save its state_dict to ``path``.

    Initialisation, data order and dropout are seeded by ``distill.seed`` (the global RNG is left as it was), so a
    teacher trained on first use is the same on every run (at the same torch thread count).
    """
    t, data = config.model.teacher, config.data
    train_set = build_dataset(data, config.base_dir, "train")
    order = BatchOrder(len(train_set), data.batch_size, config.distill.seed)
    with torch.random.fork_rng(devices=[]):  # initialisation and dropout: the same teacher on every run
        torch.manual_seed(config.distill.seed)
        model = build_teacher(dataclasses.replace(config.model.teacher, checkpoint=None), config.base_dir)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3,
                                                        total_steps=t.train_epochs * order.steps_per_epoch)
        model.train()
        for epoch in range(t.train_epochs):
            for images, labels in make_loader(train_set, order.batches(epoch), data.num_workers):
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    accuracy = evaluate(model, build_dataset(data, config.base_dir, "val"), data.batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(model.state_dict(), path)
    return {"val_accuracy": accuracy}


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``dataset``."""
    model.eval()
    correct = total = 0
    batches = [torch.arange(i, min(i + batch_size, len(dataset))).numpy() for i in range(0, len(dataset), batch_size)]
    for images, labels in make_loader(dataset, batches):
        correct += int((model(images).argmax(1) == labels).sum())
        total += len(labels)
    return correct / max(total, 1)
