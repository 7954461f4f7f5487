"""Measured per-block cost: teacher forward and student forward+backward+step, in this process."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import List

import torch

from ..distill.trainer import BlockTrainer
from ..job import Job

__all__ = ["BlockTiming", "profile_blocks"]


@dataclass
class BlockTiming:
    """Seconds per step of one block at one batch size."""

    teacher_s: float
    student_s: float

    @property
    def total_s(self) -> float:
        return self.teacher_s + self.student_s


def profile_blocks(job: Job, batch_size: int, repeats: int = 5, warmup: int = 2,
                   device: torch.device = torch.device("cpu")) -> List[BlockTiming]:
    """Median time of every block's teacher forward and student step on a batch of ``batch_size``.

    Student steps run on copies (the job's students are not touched) with paths drawn by the block's own
    sampler, so a supernet's time is that of the paths training will take, on average.
    """
    images = torch.stack([job.dataset[i % len(job.dataset)][0] for i in range(batch_size)]).to(device)
    timings = []
    x = images
    for index, (teacher, student) in enumerate(zip(job.spec.teacher, job.spec.student)):
        teacher = teacher.to(device)
        with torch.no_grad():
            y = teacher(x)
        trainer = BlockTrainer(index, copy.deepcopy(student).to(device), job.config.distill, warmup + repeats)
        teacher_times, student_times = [], []
        for round_ in range(warmup + repeats):
            start = _now(device)
            with torch.no_grad():
                teacher(x)
            middle = _now(device)
            trainer.step(x, y)
            end = _now(device)
            if round_ >= warmup:
                teacher_times.append(middle - start)
                student_times.append(end - middle)
        timings.append(BlockTiming(_median(teacher_times), sum(student_times) / len(student_times)))
        x = y
    return timings


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _median(values: List[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
