"""The plan as data: phases of a teacher relay chain, where every student block trains, and who sends which rows."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..data.order import shard_sizes

__all__ = ["Stage", "Relay", "Placement", "Phase", "Plan", "PlanError", "RankRoutes", "shard_ranges", "transfers",
           "SPLITS"]

SPLITS = ("batch", "paths")
"""How a student block's devices share its work: rows of the batch, or the sampled paths of a step."""


class PlanError(ValueError):
    """A plan does not fit the blocks, the workers or the batch."""


@dataclass(frozen=True)
class Stage:
    """Pipe-BD's stage: blocks ``start..stop-1``, teacher and students, on ``devices`` workers splitting the batch."""

    start: int
    stop: int
    devices: int = 1

    @property
    def blocks(self) -> range:
        return range(self.start, self.stop)


@dataclass(frozen=True)
class Relay:
    """One link of the teacher chain: blocks ``start..stop-1`` run once per sample on ``ranks``.

    The batch's rows are split over ``ranks`` in order (:func:`shard_ranges`); the first link loads them, every
    other receives them from the link before.
    """

    start: int
    stop: int
    ranks: Tuple[int, ...]

    @property
    def blocks(self) -> range:
        return range(self.start, self.stop)


@dataclass(frozen=True)
class Placement:
    """Student block ``block`` trains on ``ranks``: each rank a slice of the rows (``split='batch'``, BatchNorm and
    gradients synchronised) or the whole batch and its share of the step's sampled paths (``split='paths'``,
    gradients summed). Its input and target come from the relay link that owns the teacher block."""

    block: int
    ranks: Tuple[int, ...]
    split: str = "batch"

    def rows(self, batch: int, rank: int) -> Tuple[int, int]:
        """Global rows [lo, hi) that ``rank`` trains on."""
        if self.split == "paths":
            return 0, batch
        return shard_ranges(batch, len(self.ranks))[self.ranks.index(rank)]


@dataclass(frozen=True)
class Phase:
    """A relay chain running for all epochs, and the student blocks trained on its activations meanwhile.

    Phases run one after another on the ranks they name; phases on disjoint ranks run at the same time.
    """

    relays: Tuple[Relay, ...]
    students: Tuple[Placement, ...]

    @property
    def ranks(self) -> Tuple[int, ...]:
        """Every rank taking part, ascending."""
        ranks = {r for relay in self.relays for r in relay.ranks}
        ranks.update(r for placement in self.students for r in placement.ranks)
        return tuple(sorted(ranks))

    @property
    def leader(self) -> int:
        """The rank that loads the first rows and decides a stop."""
        return self.relays[0].ranks[0]

    def relay_of(self, block: int) -> Relay:
        """The link running teacher block ``block``."""
        for relay in self.relays:
            if relay.start <= block < relay.stop:
                return relay
        raise PlanError(f"no relay link runs teacher block {block} (links cover blocks 0..{self.relays[-1].stop - 1})")

    def is_pipeline(self) -> bool:
        """Every link trains exactly its own blocks on its own ranks, splitting the batch (Pipe-BD's stages)."""
        owned = {p.block: p for p in self.students}
        return all(set(owned) == set(range(self.relays[-1].stop))
                   and all(owned[i].ranks == relay.ranks and owned[i].split == "batch" for i in relay.blocks)
                   for relay in self.relays)


@dataclass
class RankRoutes:
    """What one rank does in one phase (all rows are global rows of the step's batch).

    ``relay``: index of the link it serves (``None``: students only), with ``rows``; ``relay_in`` /
    ``relay_out``: (peer rank, lo, hi) of the activation entering / leaving its link; ``feeds_out``:
    (block, peer rank, lo, hi) of a teacher block's input and output sent to a student elsewhere; ``students``:
    its placements; ``feeds_in``: per student block it trains, (peer rank, lo, hi) it assembles its rows from
    (the peer may be itself: a local copy), or ``None`` when its own link rows are the block's rows;
    ``flag_from`` / ``flag_to``: the leader's stop decision sent explicitly at the start of every step; ``late``:
    single-rank student blocks of a link rank fed from a later link of the chain — their input flows back against
    the relay, so the rank trains them one step late (the same batches in the same order) instead of waiting for
    the later links within the step.
    """

    relay: Optional[int] = None
    rows: Tuple[int, int] = (0, 0)
    relay_in: List[Tuple[int, int, int]] = field(default_factory=list)
    relay_out: List[Tuple[int, int, int]] = field(default_factory=list)
    feeds_out: List[Tuple[int, int, int, int]] = field(default_factory=list)
    students: List[Placement] = field(default_factory=list)
    feeds_in: Dict[int, Optional[List[Tuple[int, int, int]]]] = field(default_factory=dict)
    flag_from: Optional[int] = None
    flag_to: List[int] = field(default_factory=list)
    late: List[int] = field(default_factory=list)


class Plan:
    """Phases in order; a rank runs the phases that name it, one after another.

    Built from Pipe-BD stages (``Plan([Stage(0, 2, 2), Stage(2, 5, 1)])``: ranks assigned stage by stage, each
    stage's students on its own devices) or from :class:`Phase` objects (any relay chain, any student placement).
    ``predicted`` optionally carries the planner's figures (seconds per step, MB per device).
    """

    def __init__(self, parts: Sequence[Union[Stage, Phase]], predicted: Optional[Dict[str, list]] = None):
        parts = list(parts)
        if parts and all(isinstance(p, Stage) for p in parts):
            self.phases = [_pipeline_phase(parts)]
        elif all(isinstance(p, Phase) for p in parts):
            self.phases = parts
        else:
            raise PlanError(f"a plan is built from Stage or from Phase objects, not a mix: {parts!r}")
        self.predicted: Dict[str, list] = dict(predicted or {})

    def __repr__(self) -> str:
        return f"Plan({self.phases!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Plan) and self.phases == other.phases

    @classmethod
    def from_boundaries(cls, boundaries: Sequence[int], num_blocks: int) -> "Plan":
        """One device per stage; ``boundaries`` are the first blocks of the stages."""
        ends = list(boundaries[1:]) + [num_blocks]
        return cls([Stage(int(s), int(e), 1) for s, e in zip(boundaries, ends)])

    @property
    def workers(self) -> int:
        return 1 + max(r for phase in self.phases for r in phase.ranks)

    @property
    def num_blocks(self) -> int:
        return 1 + max(p.block for phase in self.phases for p in phase.students)

    @property
    def stages(self) -> List[Stage]:
        """Pipe-BD stages of a one-phase pipeline plan (raises :class:`PlanError` for any other plan)."""
        return [Stage(r.start, r.stop, len(r.ranks)) for r in self._pipeline_relays()]

    def _pipeline_relays(self) -> Tuple[Relay, ...]:
        if not self.is_pipeline:
            raise PlanError("this plan is not a pipeline of stages (it places students apart from their teacher "
                            "blocks or has several phases)")
        return self.phases[0].relays

    @property
    def is_pipeline(self) -> bool:
        return len(self.phases) == 1 and self.phases[0].is_pipeline()

    @property
    def boundaries(self) -> List[int]:
        return [stage.start for stage in self.stages]

    @property
    def resumable(self) -> bool:
        """Every phase spans every rank, so all ranks share one step count (checkpoints at a common step)."""
        every = tuple(range(self.workers))
        return all(phase.ranks == every for phase in self.phases)

    def locate(self, rank: int) -> Tuple[int, int]:
        """(stage index, index of ``rank`` inside its stage's group) of a pipeline plan."""
        first = 0
        for k, stage in enumerate(self.stages):
            if rank < first + stage.devices:
                return k, rank - first
            first += stage.devices
        raise PlanError(f"rank {rank} is beyond the plan's {self.workers} devices")

    def ranks(self, k: int) -> List[int]:
        """Worker ranks serving stage ``k`` of a pipeline plan."""
        return list(self._pipeline_relays()[k].ranks)

    def validate(self, num_blocks: int, workers: int, batch_size: int, paths_per_step: int = 1) -> "Plan":
        """Raise :class:`PlanError` unless the plan trains blocks 0..num_blocks-1 once each on ``workers`` ranks."""
        if not self.phases:
            raise PlanError("a plan needs at least one phase")
        trained: Dict[int, int] = {}
        for n, phase in enumerate(self.phases):
            where = f"phase {n}" if len(self.phases) > 1 else "the plan"
            if not phase.relays:
                raise PlanError(f"{where} has no relay link; the teacher chain needs at least one")
            position, seen = 0, set()
            for k, relay in enumerate(phase.relays):
                if relay.start != position or relay.stop <= relay.start:
                    raise PlanError(f"{where}: link {k} covers blocks {relay.start}..{relay.stop - 1}, expected to "
                                    f"start at block {position} and hold at least one block; links must tile blocks "
                                    f"0..{num_blocks - 1} from the first")
                _check_ranks(f"{where}: link {k}", relay.ranks, workers, batch_size, "batch")
                if seen & set(relay.ranks):
                    raise PlanError(f"{where}: rank(s) {sorted(seen & set(relay.ranks))} serve two relay links; a "
                                    "rank runs at most one link of a chain")
                seen.update(relay.ranks)
                position = relay.stop
            if position > num_blocks:
                raise PlanError(f"{where}: the links end at block {position - 1} but there are {num_blocks} blocks")
            if not phase.students:
                raise PlanError(f"{where} trains no student block")
            for placement in phase.students:
                if not 0 <= placement.block < position:
                    raise PlanError(f"{where}: student block {placement.block} has no teacher block before it in "
                                    f"this phase (its links cover blocks 0..{position - 1})")
                if placement.block in trained:
                    raise PlanError(f"student block {placement.block} is trained twice (phases "
                                    f"{trained[placement.block]} and {n}); place each block once")
                trained[placement.block] = n
                if placement.split not in SPLITS:
                    raise PlanError(f"student block {placement.block}: split {placement.split!r} is not one of "
                                    f"{list(SPLITS)}")
                limit = batch_size if placement.split == "batch" else paths_per_step
                what = "batch size" if placement.split == "batch" else "distill.paths_per_step"
                _check_ranks(f"{where}: student block {placement.block}", placement.ranks, workers, limit, what)
        missing = sorted(set(range(num_blocks)) - set(trained))
        if missing:
            raise PlanError(f"the plan trains no student for blocks {missing} of {num_blocks}; place every block")
        idle = sorted(set(range(workers)) - {r for phase in self.phases for r in phase.ranks})
        if idle:
            raise PlanError(f"the plan gives rank(s) {idle} nothing to do but {workers} workers were started; start "
                            f"{workers - len(idle)} or re-plan for {workers}")
        if self.workers != workers:
            raise PlanError(f"the plan uses {self.workers} devices but {workers} workers were started; start "
                            f"{self.workers} or re-plan for {workers}")
        return self

    def routes(self, phase: Phase, rank: int, batch: int) -> RankRoutes:
        """What ``rank`` receives, computes and sends in ``phase`` (see :class:`RankRoutes`)."""
        out = RankRoutes()
        mine = {}  # relay index -> rows of every rank of that link
        for k, relay in enumerate(phase.relays):
            mine[k] = dict(zip(relay.ranks, shard_ranges(batch, len(relay.ranks))))
            if rank in relay.ranks:
                out.relay, out.rows = k, mine[k][rank]
        if out.relay is not None:
            k, (lo, hi) = out.relay, out.rows
            if k > 0:
                out.relay_in = _overlaps(mine[k - 1], lo, hi, exclude=None)
            if k + 1 < len(phase.relays):
                out.relay_out = [(peer, a, b) for peer, (p_lo, p_hi) in mine[k + 1].items()
                                 for a, b in [(max(lo, p_lo), min(hi, p_hi))] if a < b]
        for placement in phase.students:
            k = phase.relays.index(phase.relay_of(placement.block))
            local = placement.split == "batch" and placement.ranks == phase.relays[k].ranks
            if out.relay == k and not local:  # this link's rows of the block go to the placement's ranks
                lo, hi = out.rows
                for peer in placement.ranks:
                    p_lo, p_hi = placement.rows(batch, peer)
                    a, b = max(lo, p_lo), min(hi, p_hi)
                    if a < b and peer != rank:
                        out.feeds_out.append((placement.block, peer, a, b))
            if rank in placement.ranks:
                out.students.append(placement)
                out.feeds_in[placement.block] = None if local else _overlaps(mine[k], *placement.rows(batch, rank),
                                                                             exclude=None)
                if out.relay is not None and k > out.relay and len(placement.ranks) == 1:
                    out.late.append(placement.block)
        leader = phase.leader
        first = phase.relays[0].ranks
        for peer in first[1:]:  # a loading rank that sends before it could learn the decision from an all-reduce
            if _needs_flag(phase, peer):
                if rank == leader:
                    out.flag_to.append(peer)
                elif rank == peer:
                    out.flag_from = leader
        return out

    def to_dict(self) -> dict:
        if self.is_pipeline:
            return {"stages": [{"start": s.start, "stop": s.stop, "devices": s.devices} for s in self.stages],
                    "predicted": self.predicted}
        return {"phases": [{"relays": [{"start": r.start, "stop": r.stop, "ranks": list(r.ranks)}
                                       for r in phase.relays],
                            "students": [{"block": p.block, "ranks": list(p.ranks), "split": p.split}
                                         for p in phase.students]}
                           for phase in self.phases],
                "predicted": self.predicted}

    @classmethod
    def from_dict(cls, raw: dict) -> "Plan":
        try:
            if "phases" in raw:
                phases = [Phase(tuple(Relay(int(r["start"]), int(r["stop"]), tuple(int(x) for x in r["ranks"]))
                                      for r in phase["relays"]),
                                tuple(Placement(int(p["block"]), tuple(int(x) for x in p["ranks"]),
                                                str(p.get("split", "batch")))
                                      for p in phase["students"]))
                          for phase in raw["phases"]]
                return cls(phases, dict(raw.get("predicted", {})))
            stages = [Stage(int(s["start"]), int(s["stop"]), int(s.get("devices", 1))) for s in raw["stages"]]
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"a plan needs 'stages': [{{start, stop, devices}}, ...] or 'phases': [{{relays: "
                            f"[{{start, stop, ranks}}], students: [{{block, ranks, split}}]}}, ...]; got {raw!r} "
                            f"({type(err).__name__}: {err})") from None
        if not stages:
            raise PlanError("a plan needs at least one stage")
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
                            "--workers W --out FILE` or use --plan auto")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise PlanError(f"plan file {path} is not JSON: {err}") from None

    def grid(self, num_blocks: Optional[int] = None) -> str:
        """Who runs what. A pipeline plan: one row per stage with predicted time and memory; any other plan: one
        row per rank and phase, ``T`` for a teacher block it runs, ``S`` for a student block it trains."""
        n = num_blocks or self.num_blocks
        times, memory = self.predicted.get("stage_s", []), self.predicted.get("stage_mb", [])
        if self.is_pipeline:
            header = "stage  devices  ranks    " + " ".join(f"b{i:<2}" for i in range(n)) + "  step ms   MB/device"
            rows = [header]
            for k, stage in enumerate(self.stages):
                ranks = self.phases[0].relays[k].ranks
                cells = " ".join(" # " if i in stage.blocks else " . " for i in range(n))
                ms = f"{1e3 * times[k]:8.1f}" if k < len(times) else "       -"
                mb = f"{memory[k]:10.1f}" if k < len(memory) else "         -"
                rows.append(f"{k:<5}  {stage.devices:<7}  {f'{ranks[0]}-{ranks[-1]}':<7}  {cells}  {ms}  {mb}")
            return "\n".join(rows)
        rank_s, rank_mb = self.predicted.get("rank_s", []), self.predicted.get("rank_mb", [])
        header = "phase  rank  " + " ".join(f"b{i:<2}" for i in range(n)) + "  step ms   MB"
        rows = [header]
        for m, phase in enumerate(self.phases):
            for r in phase.ranks:
                cells = []
                for i in range(n):
                    t = any(r in relay.ranks and i in relay.blocks for relay in phase.relays)
                    s = next((p for p in phase.students if p.block == i and r in p.ranks), None)
                    mark = ("T" if t else "") + ("" if s is None else ("S" if s.split == "batch" else "P"))
                    cells.append(f"{mark or '.':^3}")
                ms = f"{1e3 * rank_s[r]:8.1f}" if len(self.phases) == 1 and r < len(rank_s) else "       -"
                mb = f"{rank_mb[r]:6.1f}" if len(self.phases) == 1 and r < len(rank_mb) else "     -"
                rows.append(f"{m:<5}  {r:<4}  {' '.join(cells)}  {ms}  {mb}")
        rows.append("T: teacher block run here, S: student trained here (rows split), P: (paths split)")
        return "\n".join(rows)


def _pipeline_phase(stages: Sequence[Stage]) -> Phase:
    relays, students, first = [], [], 0
    for stage in stages:
        ranks = tuple(range(first, first + stage.devices))
        relays.append(Relay(stage.start, stage.stop, ranks))
        students.extend(Placement(i, ranks) for i in stage.blocks)
        first += stage.devices
    return Phase(tuple(relays), tuple(students))


def _check_ranks(what: str, ranks: Sequence[int], workers: int, limit: int, limit_name: str) -> None:
    if not ranks:
        raise PlanError(f"{what} has no rank")
    if len(set(ranks)) != len(ranks) or any(not 0 <= r < workers for r in ranks):
        raise PlanError(f"{what}: ranks {list(ranks)} must be distinct and in 0..{workers - 1}")
    if len(ranks) > limit:
        raise PlanError(f"{what} has {len(ranks)} devices but the {limit_name} is {limit}: it is split that many "
                        "ways, so use fewer devices")


def _overlaps(holders: Dict[int, Tuple[int, int]], lo: int, hi: int, exclude) -> List[Tuple[int, int, int]]:
    """(peer, a, b): which of ``holders`` (rank -> rows) hold which part of rows [lo, hi)."""
    return [(peer, a, b) for peer, (p_lo, p_hi) in holders.items()
            for a, b in [(max(lo, p_lo), min(hi, p_hi))] if a < b and peer != exclude]


def _needs_flag(phase: Phase, rank: int) -> bool:
    """Whether a loading rank other than the leader needs the stop decision sent to it: it sends activations on
    (which must carry the decision), or no student group it trains in includes the leader."""
    relay = phase.relays[0]
    sends = len(phase.relays) > 1 or any(
        p.ranks != relay.ranks or p.split != "batch" for p in phase.students if p.block < relay.stop)
    groups = [p.ranks for p in phase.students if rank in p.ranks]
    return sends or not any(phase.leader in g and len(g) > 1 for g in groups)


def shard_ranges(batch: int, devices: int) -> List[Tuple[int, int]]:
    """Rows [lo, hi) of the batch each of ``devices`` holds (contiguous; the rule of ``data.order.shard_sizes``)."""
    ranges, lo = [], 0
    for size in shard_sizes(batch, devices):
        ranges.append((lo, lo + size))
        lo += size
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
