"""The plan as data: contiguous stages of blocks, the devices serving each, and who sends which rows to whom."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["Stage", "Plan", "PlanError", "shard_ranges", "transfers"]


class PlanError(ValueError):
    """A plan does not fit the blocks, the workers or the batch."""


@dataclass(frozen=True)
class Stage:
    """Blocks ``start..stop-1`` served by ``devices`` workers in data parallel (the batch split that many ways)."""

    start: int
    stop: int
    devices: int = 1

    @property
    def blocks(self) -> range:
        return range(self.start, self.stop)


@dataclass
class Plan:
    """Stages in pipeline order; worker ranks are assigned stage by stage (stage 0 gets ranks 0..g_0-1, ...).

    ``predicted`` optionally carries the solver's per-stage figures (seconds per step, MB per device).
    """

    stages: List[Stage]
    predicted: Dict[str, list] = field(default_factory=dict)

    @classmethod
    def from_boundaries(cls, boundaries: Sequence[int], num_blocks: int) -> "Plan":
        """One device per stage; ``boundaries`` are the first blocks of the stages."""
        ends = list(boundaries[1:]) + [num_blocks]
        return cls([Stage(int(s), int(e), 1) for s, e in zip(boundaries, ends)])

    @property
    def workers(self) -> int:
        return sum(stage.devices for stage in self.stages)

    @property
    def boundaries(self) -> List[int]:
        return [stage.start for stage in self.stages]

    def validate(self, num_blocks: int, workers: int, batch_size: int) -> "Plan":
        """Raise :class:`PlanError` unless the stages tile 0..num_blocks-1 and the devices add up to ``workers``."""
        if not self.stages:
            raise PlanError("a plan needs at least one stage")
        position = 0
        for k, stage in enumerate(self.stages):
            if stage.start != position or stage.stop <= stage.start:
                raise PlanError(f"stage {k} covers blocks {stage.start}..{stage.stop - 1}, expected to start at block "
                                f"{position} and hold at least one block; stages must tile blocks 0..{num_blocks - 1}")
            if stage.devices < 1 or stage.devices > batch_size:
                raise PlanError(f"stage {k} has {stage.devices} devices; each needs >= 1 and at most the batch size "
                                f"{batch_size} (the batch is split that many ways)")
            position = stage.stop
        if position != num_blocks:
            raise PlanError(f"the plan's stages end at block {position - 1} but there are {num_blocks} blocks")
        if self.workers != workers:
            raise PlanError(f"the plan uses {self.workers} devices ({[s.devices for s in self.stages]}) but "
                            f"{workers} workers were started; start {self.workers} or re-plan for {workers}")
        return self

    def locate(self, rank: int) -> Tuple[int, int]:
        """(stage index, index of ``rank`` inside its stage's group)."""
        first = 0
        for k, stage in enumerate(self.stages):
            if rank < first + stage.devices:
                return k, rank - first
            first += stage.devices
        raise PlanError(f"rank {rank} is beyond the plan's {self.workers} devices")

    def ranks(self, k: int) -> List[int]:
        """Worker ranks serving stage ``k``."""
        first = sum(stage.devices for stage in self.stages[:k])
        return list(range(first, first + self.stages[k].devices))

    def to_dict(self) -> dict:
        return {"stages": [asdict(s) for s in self.stages], "predicted": self.predicted}

    @classmethod
    def from_dict(cls, raw: dict) -> "Plan":
        try:
            stages = [Stage(int(s["start"]), int(s["stop"]), int(s.get("devices", 1))) for s in raw["stages"]]
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"a plan needs 'stages': [{{start, stop, devices}}, ...]; got {raw!r} ({err})") from None
        return cls(stages, dict(raw.get("predicted", {})))

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {str(path)!r} does not exist; write one with `nni-pipebd plan CONFIG "
                            "--workers W --json > FILE` or use --plan auto")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise PlanError(f"plan file {path} is not JSON: {err}") from None

    def grid(self, num_blocks: Optional[int] = None) -> str:
        """Who runs what: one row per stage, one column per block, with predicted time and memory if known."""
        n = num_blocks or self.stages[-1].stop
        times, memory = self.predicted.get("stage_s", []), self.predicted.get("stage_mb", [])
        header = "stage  devices  ranks    " + " ".join(f"b{i:<2}" for i in range(n)) + "  step ms   MB/device"
        rows = [header]
        for k, stage in enumerate(self.stages):
            ranks = self.ranks(k)
            cells = " ".join(" # " if i in stage.blocks else " . " for i in range(n))
            ms = f"{1e3 * times[k]:8.1f}" if k < len(times) else "       -"
            mb = f"{memory[k]:10.1f}" if k < len(memory) else "         -"
            rows.append(f"{k:<5}  {stage.devices:<7}  {f'{ranks[0]}-{ranks[-1]}':<7}  {cells}  {ms}  {mb}")
        return "\n".join(rows)


def shard_ranges(batch: int, devices: int) -> List[Tuple[int, int]]:
    """Rows [lo, hi) of the batch each of ``devices`` holds (contiguous, sizes differ by at most one)."""
    base, extra = divmod(batch, devices)
    ranges, lo = [], 0
    for j in range(devices):
        hi = lo + base + (1 if j < extra else 0)
        ranges.append((lo, hi))
        lo = hi
    return ranges


def transfers(batch: int, senders: int, receivers: int) -> List[Tuple[int, int, int, int]]:
    """(sender index, receiver index, lo, hi): which global rows go from which device to which, between stages."""
    moves = []
    for i, (a_lo, a_hi) in enumerate(shard_ranges(batch, senders)):
        for j, (b_lo, b_hi) in enumerate(shard_ranges(batch, receivers)):
            lo, hi = max(a_lo, b_lo), min(a_hi, b_hi)
            if lo < hi:
                moves.append((i, j, lo, hi))
    return moves
