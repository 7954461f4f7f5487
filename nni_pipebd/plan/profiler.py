"""The profile the solver plans from: per block and per data-parallel degree, time and memory; link costs."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..distill.trainer import BlockTrainer
from ..job import Job
from ..precision import autocast, cast_dtype, formatted, memory_format

__all__ = ["BlockProfile", "LinkModel", "Profile", "profile_job", "profile_key", "mean_profile"]

MB = 1024.0 * 1024.0


@dataclass
class LinkModel:
    """Time of moving ``n`` bytes: ``latency_s + n * s_per_byte`` (fitted to measurements)."""

    latency_s: float = 0.0
    s_per_byte: float = 0.0

    def time(self, nbytes: float) -> float:
        return self.latency_s + nbytes * self.s_per_byte


@dataclass
class BlockProfile:
    """One block, keyed by data-parallel degree g (per-device batch = ceil(B / g)).

    ``teacher_s`` / ``student_s``: seconds per step of the teacher forward and the student
    forward+backward+step; ``memory_mb``: per-device memory of the block (weights, optimizer state,
    activations); ``activation_in_bytes``: bytes per sample entering the block; ``grad_bytes``: bytes of the
    gradients all-reduced per step (mean over sampled paths); ``bn_layers``: BatchNorm layers on a path;
    ``teacher_mb``: the teacher block's weights (included in ``memory_mb``); ``activation_out_bytes``: bytes per
    sample leaving the block (the teacher target; ``None`` in profiles saved before it was measured: the next
    block's ``activation_in_bytes``, or this block's own for the last block, see :meth:`Profile.out_bytes`);
    ``param_bytes``: bytes of every trainable parameter of the student (a path split all-reduces all their
    gradients; ``None`` in older profiles: ``grad_bytes``, see :meth:`Profile.param_bytes`).
    """

    teacher_s: Dict[int, float]
    student_s: Dict[int, float]
    memory_mb: Dict[int, float]
    activation_in_bytes: int
    grad_bytes: float
    bn_layers: float
    teacher_mb: float = 0.0
    activation_out_bytes: Optional[int] = None
    param_bytes: Optional[float] = None


@dataclass
class Profile:
    """Everything the solver needs, saved as JSON and reused when its ``key`` matches.

    ``paths_per_step``: the job's ``distill.paths_per_step``, at which every ``student_s`` was measured (a student
    on ``h`` devices may split its paths instead of its batch when it is at least ``h``; 1 in older profiles).
    """

    key: str
    device: str
    batch_size: int
    max_devices: int
    blocks: List[BlockProfile]
    p2p: LinkModel = field(default_factory=LinkModel)
    allreduce: Dict[int, LinkModel] = field(default_factory=dict)
    paths_per_step: int = 1

    def allreduce_time(self, nbytes: float, devices: int) -> float:
        """All-reduce time over ``devices``: measured model for that size, else a ring model from the largest."""
        if devices <= 1:
            return 0.0
        if devices in self.allreduce:
            return self.allreduce[devices].time(nbytes)
        if not self.allreduce:
            return 0.0
        g0 = max(self.allreduce)
        base = self.allreduce[g0]
        # ring all-reduce: 2(g-1) latency hops, 2(g-1)/g of the data through each link
        return (base.latency_s * (devices - 1) / max(g0 - 1, 1)
                + nbytes * base.s_per_byte * ((devices - 1) / devices) / ((g0 - 1) / g0))

    def out_bytes(self, index: int) -> int:
        """Bytes per sample leaving block ``index``: measured, else the next block's input (the last block: its
        own input, a guess for profiles saved before outputs were measured)."""
        block = self.blocks[index]
        if block.activation_out_bytes is not None:
            return block.activation_out_bytes
        following = self.blocks[index + 1] if index + 1 < len(self.blocks) else block
        return following.activation_in_bytes

    def param_bytes(self, index: int) -> float:
        """Bytes of every trainable parameter of student block ``index``: measured, else ``grad_bytes`` (profiles
        saved before it was measured)."""
        block = self.blocks[index]
        return block.grad_bytes if block.param_bytes is None else block.param_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "Profile":
        def keyed(d):
            return {int(k): float(v) for k, v in d.items()}
        blocks = [BlockProfile(keyed(b["teacher_s"]), keyed(b["student_s"]), keyed(b["memory_mb"]),
                               int(b["activation_in_bytes"]), float(b["grad_bytes"]), float(b["bn_layers"]),
                               float(b.get("teacher_mb", 0.0)),
                               None if b.get("activation_out_bytes") is None else int(b["activation_out_bytes"]),
                               None if b.get("param_bytes") is None else float(b["param_bytes"]))
                  for b in raw["blocks"]]
        return cls(raw["key"], raw["device"], int(raw["batch_size"]), int(raw["max_devices"]), blocks,
                   LinkModel(**raw["p2p"]), {int(g): LinkModel(**m) for g, m in raw["allreduce"].items()},
                   int(raw.get("paths_per_step", 1)))

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Profile":
        return cls.from_dict(json.loads(Path(path).read_text()))


METHOD = 5
"""How :func:`profile_job` measures (part of the key: a cached profile measured otherwise is measured again)."""


def profile_key(job: Job, max_devices: int, device: torch.device) -> str:
    """Model + batch size + device kind (+ the settings that change costs: precision, memory format), hashed."""
    config = job.config
    what = {"method": METHOD, "teacher": asdict(config.model.teacher), "student": asdict(config.model.student),
            "image": [config.data.image_size, config.data.channels], "batch_size": config.data.batch_size,
            "optimizer": config.distill.optimizer, "paths_per_step": config.distill.paths_per_step,
            "device": device.type, "max_devices": max_devices, "threads": torch.get_num_threads(),
            "precision": config.execution.precision, "channels_last": config.execution.channels_last,
            "sync_bn": config.execution.sync_bn}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def profile_job(job: Job, max_devices: int, device: torch.device = torch.device("cpu"), repeats: int = 4,
                warmup: int = 1, paths: int = 16, sync: Optional[Callable[[], None]] = None,
                split_student: Optional[Callable[[nn.Module], nn.Module]] = None) -> Profile:
    """Measure every block at per-device batch ceil(B/g) for g = 1..max_devices (compute only, this process).

    Link costs (``p2p``, ``allreduce``) are left empty; the launcher measures them with real workers. A student
    step is ``distill.paths_per_step`` paths (recorded in the profile). Blocks run as the runtime runs them: under
    ``execution.precision``'s autocast (``fp64``: in float64) and in its memory format, so times, memory and the
    bytes a relay carries (``activation_in_bytes``: bf16 halves them, fp64 doubles them) are those of the setting.
    The teacher is timed as the relay runs it: the whole chain, block after block, on a batch of its own per round
    (``teacher_s``: the median over ``paths`` rounds; a block timed alone, again and again on one input, runs from
    warm caches and reads 10-15% fast on a CPU). Each student step samples its own path, and a supernet's paths
    differ in cost several-fold: ``student_s[1]`` is the mean over ``paths`` paths, and ``student_s[g]`` scales it
    by how much faster the first ``repeats`` of those same paths ran at degree ``g`` (a ratio estimator: the costs
    at every degree follow the same paths, for ``repeats`` steps per degree instead of ``paths``).

    The degrees are interleaved round by round (a chain at every degree, then the next round; a block's step at
    every degree on one path, then the next path), so that a slow moment of a shared machine weighs on every
    degree alike and the ratios between degrees, which decide how many devices a block gets, stay true. ``sync``,
    when given, is called before every timed loop (the chain, each block's steps): processes profiling the same job
    side by side (see :func:`mean_profile`) stay in step, each one's loop running under the load of the others.
    ``split_student``, when given, is how the runtime prepares a student whose batch is split over devices (with
    ``execution.sync_bn``, its BatchNorm layers become group BatchNorm, which on a CPU can make a step up to twice
    as slow as the native layer): the steps at g >= 2 run on the student it returns, here without communication
    (the all-reduces are the link model's).
    """
    if paths < repeats:
        raise ValueError(f"paths = {paths} must be >= repeats = {repeats} (the paths every degree times)")
    batch = job.config.data.batch_size
    precision, channels_last = job.config.execution.precision, job.config.execution.channels_last
    layout, dtype = memory_format(channels_last), cast_dtype(precision)
    degrees = [g for g in range(1, max_devices + 1) if g <= batch]
    teachers = [teacher.to(device, dtype, memory_format=layout) for teacher in job.spec.teacher]
    sync = sync or (lambda: None)
    chain = _chain_times(job, teachers, degrees, warmup + paths, warmup, device, sync)
    images = torch.stack([job.dataset[i % len(job.dataset)][0] for i in range(batch)]).to(device, dtype)
    blocks: List[BlockProfile] = []
    x = formatted(images, channels_last)
    slots = 2 if job.config.distill.optimizer == "adam" else (1 if job.config.distill.momentum else 0)

    def trainer(index: int, student: nn.Module, g: int, steps: int) -> BlockTrainer:
        student = copy.deepcopy(student).to(device, dtype, memory_format=layout)
        if g > 1 and split_student is not None:
            student = split_student(student)
        return BlockTrainer(index, student, job.config.distill, steps, precision)

    for index, (teacher, student) in enumerate(zip(teachers, job.spec.student)):
        with torch.no_grad(), autocast(precision, device):
            y = formatted(teacher(x), channels_last)
        rows = {g: math.ceil(batch / g) for g in degrees}
        trainers = {g: trainer(index, student, g, warmup + (paths if g == 1 else repeats)) for g in degrees}
        times: Dict[int, List[float]] = {g: [] for g in degrees}
        grads, bns = [], []
        sync()
        for round_ in range(warmup + paths):
            for g in degrees if round_ < warmup + repeats else degrees[:1]:
                start = _now(device)
                trainers[g].step(x[:rows[g]], y[:rows[g]])
                end = _now(device)
                if round_ >= warmup:
                    times[g].append(end - start)
                    if g == 1:
                        grads.append(sum(p.numel() * p.element_size() for p in trainers[1].parameters_with_grad()))
                        bns.append(_bn_on_path(trainers[1].student))
        s_s = {1: sum(times[1]) / len(times[1])}
        first = sum(times[1][:repeats])
        for g in degrees[1:]:
            s_s[g] = s_s[1] * sum(times[g]) / first if first > 0 else sum(times[g]) / repeats
        if device.type == "cuda":
            del trainers
            mem = {g: _cuda_memory_mb(teacher, trainer(index, student, g, warmup + 1), x[:rows[g]], y[:rows[g]],
                                      warmup + 1, precision) for g in degrees}
        else:
            mem = {g: _cpu_memory_mb(teacher, trainers[g], x[:rows[g]], y[:rows[g]], slots, precision)
                   for g in degrees}
        params = sum(p.numel() * (dtype or p.dtype).itemsize for p in student.parameters() if p.requires_grad)
        blocks.append(BlockProfile(chain[index], s_s, mem, int(x[0].numel() * x.element_size()),
                                   sum(grads) / len(grads), sum(bns) / len(bns), _bytes(teacher) / MB,
                                   int(y[0].numel() * y.element_size()), float(params)))
        x = y
    return Profile(profile_key(job, max_devices, device), device.type, batch, max_devices, blocks,
                   paths_per_step=job.config.distill.paths_per_step)


def _chain_times(job: Job, teachers: List[nn.Module], degrees: List[int], rounds: int, warmup: int,
                 device: torch.device, sync: Callable[[], None]) -> List[Dict[int, float]]:
    """Per teacher block and degree g, the median seconds of its forward on ceil(B/g) rows, timed inside the whole
    chain on a fresh batch per round (as a relay runs it), the degrees interleaved round by round."""
    config = job.config
    batch, size = config.data.batch_size, len(job.dataset)
    precision, channels_last = config.execution.precision, config.execution.channels_last
    times: List[Dict[int, List[float]]] = [{g: [] for g in degrees} for _ in teachers]
    sync()
    for round_ in range(rounds):
        for g in degrees:
            first = (round_ * len(degrees) + g - 1) * batch
            x = torch.stack([job.dataset[(first + i) % size][0] for i in range(math.ceil(batch / g))])
            x = formatted(x.to(device, cast_dtype(precision)), channels_last)
            with torch.no_grad(), autocast(precision, device):
                for index, teacher in enumerate(teachers):
                    start = _now(device)
                    x = formatted(teacher(x), channels_last)
                    if round_ >= warmup:
                        times[index][g].append(_now(device) - start)
    return [{g: sorted(values)[len(values) // 2] for g, values in block.items()} for block in times]


def _cuda_memory_mb(teacher: nn.Module, trainer: BlockTrainer, x: torch.Tensor, y: torch.Tensor, steps: int,
                    precision: str) -> float:
    """Peak CUDA memory of ``steps`` student steps on ``x`` beside the teacher block's forward (a co-located stage
    holds both), plus the teacher's and the student's weights."""
    device = x.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    for _ in range(steps):
        with torch.no_grad(), autocast(precision, device):
            teacher(x)
        trainer.step(x, y)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base + _bytes(teacher) + _bytes(trainer.student)) / MB


def mean_profile(profiles: Sequence[Profile]) -> Profile:
    """One profile from several measured side by side (one per process): every time is the mean of theirs, the
    rest (memory, bytes, key) the first one's.

    Raises ``ValueError`` when the profiles are of different jobs (their keys differ) or none is given.
    """
    if not profiles:
        raise ValueError("mean_profile needs at least one profile")
    keys = sorted({p.key for p in profiles})
    if len(keys) > 1:
        raise ValueError(f"profiles of different jobs cannot be averaged: keys {keys}; profile one job per call")
    mean = copy.deepcopy(profiles[0])
    for index, block in enumerate(mean.blocks):
        for name in ("teacher_s", "student_s"):
            times = [getattr(p.blocks[index], name) for p in profiles]
            setattr(block, name, {g: sum(t[g] for t in times) / len(times) for g in times[0]})
    return mean


def _bn_on_path(student: nn.Module) -> int:
    return sum(1 for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.weight is not None and m.weight.grad is not None)


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def _cpu_memory_mb(teacher: nn.Module, trainer: BlockTrainer, x: torch.Tensor, y: torch.Tensor, slots: int,
                   precision: str = "fp32") -> float:
    """Estimate: teacher weights + student weights, gradients and optimizer slots + activations kept for backward."""
    saved = 0

    def hook(_module, _inputs, output):
        nonlocal saved
        if isinstance(output, torch.Tensor):
            saved += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in trainer.student.modules() if not list(m.children())]
    try:
        with torch.no_grad(), autocast(precision, x.device):
            trainer.student(x)
    finally:
        for handle in handles:
            handle.remove()
    student = _bytes(trainer.student)
    grads = sum(p.numel() * p.element_size() for p in trainer.parameters_with_grad())
    io = x.numel() * x.element_size() + y.numel() * y.element_size()
    return (_bytes(teacher) + student + grads * (1 + slots) + saved + io) / MB


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def load_or_none(path: Optional[Union[str, Path]], key: str) -> Optional[Profile]:
    """A saved profile at ``path`` if its key matches, else ``None``."""
    if path is None or not Path(path).is_file():
        return None
    try:
        profile = Profile.load(path)
    except (ValueError, KeyError, TypeError):
        return None
    return profile if profile.key == key else None
