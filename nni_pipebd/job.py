"""Job: what every worker builds from the config — block spec, training data and sample order."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Iterator, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .config import Config
from .data.datasets import build_dataset, make_loader
from .data.order import BatchOrder, shard
from .spaces.builder import build_student
from .spaces.dna import StudentSpace
from .spec.blocks import BlockSpec, teacher_shapes
from .spec.teachers import build_teacher, build_teacher_blocks

__all__ = ["Job", "build_job", "build_student_space", "probe_teacher"]

_logger = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything an executor needs, built the same way in every process.

    Attributes
    ----------
    config : Config
        The resolved configuration.
    spec : BlockSpec
        Teacher and student blocks (shapes checked).
    space : StudentSpace
        The student blocks as one NNI model space (``space.freeze(sample)`` gives a network).
    dataset : Dataset
        Training data, items ``(image, label)``.
    order : BatchOrder
        Which samples form each step of each epoch.
    """

    config: Config
    spec: BlockSpec
    space: StudentSpace
    dataset: Dataset
    order: BatchOrder

    @property
    def num_blocks(self) -> int:
        return len(self.spec)

    @property
    def steps_per_block(self) -> int:
        """Optimizer steps of each block over the whole run."""
        return self.config.distill.epochs * self.order.steps_per_epoch

    def loader(self, epoch: int, rank: int = 0, world: int = 1, start_step: int = 0,
               pin_memory: bool = False) -> Iterator[Tuple[Tensor, Tensor]]:
        """``(images, labels)`` of every step of ``epoch``: the whole batch, or this rank's contiguous shard
        (in pinned host memory with ``pin_memory``, for asynchronous copies to a GPU)."""
        batches = self.order.batches(epoch, start_step)
        if world > 1:
            batches = (shard(batch, rank, world) for batch in batches)
        return iter(make_loader(self.dataset, batches, self.config.data.num_workers, pin_memory))


def probe_teacher(config: Config, weights: bool = True) -> Tuple[Dataset, Tensor, torch.nn.Module]:
    """The training data, a probe batch of it and the teacher (its weights loaded unless ``weights`` is false)."""
    dataset = build_dataset(config.data, config.base_dir, "train")
    sample = torch.stack([dataset[i][0] for i in range(min(2, len(dataset)))])
    teacher = config.model.teacher if weights else dataclasses.replace(config.model.teacher, checkpoint=None,
                                                                         weights=None)
    with torch.random.fork_rng(devices=[]):  # a teacher without weights is still the same in every process
        torch.manual_seed(config.distill.seed)
        model = build_teacher(teacher, config.base_dir)
    return dataset, sample, model


def _teacher(config: Config) -> Tuple[Dataset, Tensor, list, list]:
    """The training data, a probe batch, the frozen teacher blocks and their (input, output) shapes."""
    dataset, sample, model = probe_teacher(config)
    t = config.model.teacher
    teacher, _ = build_teacher_blocks(model, sample, t.boundaries, leaf_modules=t.leaf_modules,
                                      autowrap_functions=t.autowrap_functions)
    return dataset, sample, teacher, teacher_shapes(teacher, sample)


def build_job(config: Config) -> Job:
    """Build data, teacher blocks (weights loaded, frozen) and student blocks from ``config``."""
    dataset, sample, teacher, shapes = _teacher(config)
    space = build_student(config.model.student, teacher, shapes, config.distill.seed, config.base_dir)
    spec = BlockSpec(teacher, list(space.blocks), sample)
    order = BatchOrder(len(dataset), config.data.batch_size, config.distill.seed,
                       config.distill.max_steps_per_epoch)
    return Job(config, spec, space, dataset, order)


def build_student_space(config: Config) -> StudentSpace:
    """The student as plain NNI block spaces (not supernets): the space ``NasExperiment`` explores and freezes."""
    _, _, teacher, shapes = _teacher(config)
    return build_student(config.model.student, teacher, shapes, config.distill.seed, config.base_dir,
                         supernet=False)
