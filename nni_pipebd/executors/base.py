"""The executor interface, what a worker reports, and the registry of executor names."""

from __future__ import annotations

import datetime
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Type

import torch

from ..config import Config
from ..job import Job
from ..report.metrics import MetricsWriter
from ..report.progress import ProgressWriter
from ..report.trace import Tracer
from .checkpoint import Checkpointer, common_step, load_checkpoint
from .stopping import StopControl

__all__ = ["WorkerContext", "BlockReport", "WorkerReport", "Executor", "register", "get_executor",
           "executor_names", "stage_state", "rss_mb"]


@dataclass
class WorkerContext:
    """Where a worker runs: its rank in the world, its device and the process group (None alone)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout: datetime.timedelta
    group: Any = None
    tracer: Tracer = field(default_factory=lambda: Tracer(enabled=False))
    out_dir: Optional[str] = None
    resume: bool = False
    role_dir: Optional[str] = None
    progress: ProgressWriter = field(default_factory=lambda: ProgressWriter(None, 0))
    stop: StopControl = field(default_factory=StopControl)
    metrics: MetricsWriter = field(default_factory=lambda: MetricsWriter(None, None, 0))

    def announce(self, role: str) -> None:
        """Tell the launcher what this rank does (named if the rank fails)."""
        if self.role_dir is not None:
            Path(self.role_dir, f"rank{self.rank}.role").write_text(role)

    def checkpointer(self, key: str, every: Optional[int]) -> Checkpointer:
        """Checkpoints of this rank's state under ``key`` (a stage), every ``every`` steps."""
        return Checkpointer(self.out_dir or ".", key, every)

    def resume_state(self, keys: List[str], key: str) -> Optional[Dict[str, Any]]:
        """When resuming: the state ``key`` saved at the latest step all ``keys`` share (else ``None``)."""
        if not self.resume or self.out_dir is None:
            return None
        step = common_step(self.out_dir, keys)
        return None if step is None else load_checkpoint(self.out_dir, key, step)

    @property
    def distributed(self) -> bool:
        return self.group is not None


@dataclass
class BlockReport:
    """What one worker learned about one block it trained: mean loss per epoch, steps taken, and why it stopped
    (``{"reason": "epochs" | "plateau", "epoch": e, "steps": n}``; ``None`` while it trains)."""

    losses: List[float] = field(default_factory=list)
    steps: int = 0
    _epoch: List[float] = field(default_factory=list, repr=False)
    stopped: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"losses": list(self.losses), "steps": self.steps, "_epoch": list(self._epoch),
                "stopped": self.stopped}

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "BlockReport":
        return cls(list(raw["losses"]), int(raw["steps"]), list(raw["_epoch"]), raw.get("stopped"))

    def add(self, loss: float) -> None:
        """Record the loss of one step."""
        self._epoch.append(float(loss))
        self.steps += 1

    def end_epoch(self) -> None:
        """Close the epoch: its mean step loss joins ``losses``."""
        if self._epoch:
            self.losses.append(sum(self._epoch) / len(self._epoch))
            self._epoch = []

    def stop(self, reason: str) -> None:
        """Mark the block finished (``epochs``: all of them; ``plateau``: converged) after its epochs so far."""
        if self.stopped is None:
            self.stopped = {"reason": reason, "epoch": len(self.losses), "steps": self.steps}


@dataclass
class WorkerReport:
    """A worker's results: the blocks it owns (and saved) and its counters."""

    rank: int
    label: str = ""
    blocks: Dict[int, BlockReport] = field(default_factory=dict)
    counters: Dict[str, int] = field(default_factory=dict)
    spans: list = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    peak_rss_mb: float = 0.0
    rss_mb_per_epoch: List[float] = field(default_factory=list)

    def end_epoch(self) -> None:
        """Record this worker's resident memory at the end of an epoch (the soak benchmark reads it)."""
        self.rss_mb_per_epoch.append(rss_mb())

    def count(self, name: str, value: int) -> None:
        self.counters[name] = self.counters.get(name, 0) + int(value)


class Executor(ABC):
    """Runs a :class:`~nni_pipebd.job.Job` on one or more worker processes.

    A subclass implements :meth:`run_worker`, called once in every worker with the job built there; it trains
    the blocks the worker owns, writes them with ``save_block`` and returns a :class:`WorkerReport`. Launching
    (in-process, local spawn or torchrun) and writing the block library are not its business.

    Counters every executor reports: ``teacher_block_forwards`` (sample x teacher-block forwards) and
    ``samples_loaded``, summed over workers.
    """

    name: ClassVar[str]
    needs_process_group: ClassVar[bool] = True

    def __init__(self, config: Config):
        self.config = config

    def check(self, world_size: int, num_blocks: Optional[int] = None) -> None:
        """Raise ``ValueError`` if this executor cannot run on ``world_size`` workers (and ``num_blocks``)."""

    @abstractmethod
    def run_worker(self, ctx: WorkerContext, job: Job, save_block) -> WorkerReport:
        """Train this worker's share; ``save_block(index, state_dict)`` stores a finished block."""


def rss_mb(field_name: str = "VmRSS") -> float:
    """Resident memory of this process in MB (``VmHWM``: its peak), from /proc; 0 where unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def stage_state(trainers, report: WorkerReport, converged=()) -> dict:
    """What a stage checkpoints: its trainers, its block reports, its counters and the blocks known converged."""
    return {"trainers": {t.index: t.full_state() for t in trainers},
            "reports": {i: r.to_dict() for i, r in report.blocks.items()},
            "counters": dict(report.counters), "converged": sorted(converged)}


_REGISTRY: Dict[str, Type[Executor]] = {}


def register(cls: Type[Executor]) -> Type[Executor]:
    """Class decorator adding an executor under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def executor_names() -> List[str]:
    """Registered executor names."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_executor(name: str) -> Type[Executor]:
    """The executor class called ``name``; an unknown name lists the valid ones."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown executor {name!r}; valid: {sorted(_REGISTRY)}") from None


def _load_builtin() -> None:
    from . import dp, ls, pipebd, reference  # noqa: F401  (registration side effect)
