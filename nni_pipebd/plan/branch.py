"""Exact branch and bound over teacher relay links and student placements on identical devices (numbers only)."""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["PieceCosts", "BranchAndBound", "Solution"]

TIME, MEMORY = 0, 1
"""The two metrics every piece of a plan adds to the ranks it lands on (seconds per step, MB)."""


@dataclass
class PieceCosts:
    """What every piece of a one-phase plan adds to each rank holding it, per metric (``[TIME]``, ``[MEMORY]``).

    Indexed ``[metric][block][degree]`` (a list per block, ``inf`` where a degree is not allowed):

    ``teacher``: a rank of a link on ``g`` devices running teacher block ``b``; ``colocated``: on top of that,
    training student ``b`` on exactly its link's ranks; ``teacher_only``: on top of ``teacher``, when student
    ``b`` trains elsewhere; ``fed``: a rank of ``h`` training student ``b`` away from its link (with the
    receive); ``link_in`` ``[metric][start][degree]``: a rank of a link starting at block ``start`` receiving
    its input. Every value is >= 0 (memory that a co-located student saves is folded into ``teacher``).

    A student on several devices may split its batch or its sampled paths; each piece holds the cheaper of the
    two (a choice that depends on nothing else in the plan), and ``paths_colocated[block][g]`` /
    ``paths_fed[block][h]`` say where the path split won (empty: the batch split everywhere).
    """

    degrees: List[int]
    teacher: List[List[List[float]]]
    colocated: List[List[List[float]]]
    teacher_only: List[List[List[float]]]
    fed: List[List[List[float]]]
    link_in: List[List[List[float]]]
    paths_colocated: List[List[bool]] = field(default_factory=list)
    paths_fed: List[List[bool]] = field(default_factory=list)

    def split(self, block: int, devices: int, colocated: bool) -> str:
        """``'paths'`` or ``'batch'``: how student ``block`` on ``devices`` ranks (its link's: ``colocated``) splits."""
        table = self.paths_colocated if colocated else self.paths_fed
        return "paths" if table and table[block][devices] else "batch"

    @property
    def num_blocks(self) -> int:
        return len(self.teacher[TIME])


@dataclass
class Solution:
    """Links ``(start, stop, ranks)`` in chain order and each student block's ranks (the link's: co-located)."""

    value: Tuple[float, float]
    links: List[Tuple[int, int, Tuple[int, ...]]]
    students: Dict[int, Tuple[int, ...]]


class BranchAndBound:
    """Minimise the largest per-rank total of one metric (ties: the smallest sum) over every one-phase plan.

    A plan is a chain of links tiling blocks ``0..N-1`` (each on ``g`` ranks of its own) and, per student block,
    a set of ``h`` ranks (any ranks); every rank gets a piece; optionally the other metric stays within a limit
    on every rank. Depth-first over the blocks, largest first: a block not yet covered by a link first gets one
    (every interval around it that fits between the existing links, every degree, every set of link-less
    ranks), then its student gets its link's ranks or any other set of ``h`` ranks. It is exact:

    - ranks are identical, so two ranks with the same totals, the same link state and the same emptiness are
      interchangeable; only the first ``m`` ranks of every such class are tried (every plan is still reached
      under some labelling of the ranks);
    - every piece adds a non-negative amount, so a node is cut only by lower bounds of every completion: the
      largest total so far; water-filling the least work left (each block's cheapest way to finish) over the
      ranks; each of the next blocks on its least loaded ranks; and :meth:`_least_work` (pieces must fit under
      the best maximum, so a block too big for one rank pays for its split, and a rank holds one piece bigger
      than half of it); the sum so far plus the least work left bounds the tie-break;
    - the options of a block are tried from the least resulting maximum (up to the node's bound, then the
      least wasted work), those that exceed the best maximum are skipped.

    Its cost grows quickly with the devices and blocks (the optima of such packings are many and close):
    ``budget`` stops it after that many nodes with the best plan found so far (:attr:`complete` is then false).
    """

    def __init__(self, costs: PieceCosts, workers: int):
        self.costs, self.workers = costs, workers
        self.n = costs.num_blocks
        self.degrees = [g for g in costs.degrees if g <= workers]
        self.max_degree = max(self.degrees, default=0)
        c = costs
        # least total work (over all ranks) to finish a block whose link has degree g, or that has no link yet
        self.least_done = [[[math.inf] * (workers + 1) for _ in range(self.n)] for _ in (TIME, MEMORY)]
        self.least_open = [[math.inf] * self.n for _ in (TIME, MEMORY)]
        for m in (TIME, MEMORY):
            for b in range(self.n):
                fed = min((h * c.fed[m][b][h] for h in self.degrees), default=math.inf)
                for g in self.degrees:
                    self.least_done[m][b][g] = min(g * c.colocated[m][b][g], fed + g * c.teacher_only[m][b][g])
                self.least_open[m][b] = min((g * c.teacher[m][b][g] + self.least_done[m][b][g]
                                             for g in self.degrees), default=math.inf)
        # least work of a block's teacher (prefix sums over blocks) and of its student, to rank options by waste
        self.least_teacher = [[0.0] * (self.n + 1) for _ in (TIME, MEMORY)]
        self.least_student = [[0.0] * self.n for _ in (TIME, MEMORY)]
        for m in (TIME, MEMORY):
            for b in range(self.n):
                self.least_teacher[m][b + 1] = self.least_teacher[m][b] + min(
                    (g * c.teacher[m][b][g] for g in self.degrees), default=math.inf)
                self.least_student[m][b] = min((h * min(c.fed[m][b][h], c.colocated[m][b][h])
                                                for h in self.degrees), default=math.inf)
        self.order = sorted(range(self.n), key=lambda b: (-self.least_open[TIME][b], b))
        # prefix sums of teacher pieces per metric and degree: a link's load is teacher[start:stop] + link_in
        self.prefix = [[[0.0] * (self.n + 1) for _ in range(workers + 1)] for _ in (TIME, MEMORY)]
        for m in (TIME, MEMORY):
            for g in self.degrees:
                for b in range(self.n):
                    self.prefix[m][g][b + 1] = self.prefix[m][g][b] + c.teacher[m][b][g]
        self.nodes = 0

    def run(self, objective: int = TIME, limit: float = math.inf,
            incumbent: Optional[Tuple[float, float]] = None, budget: Optional[int] = None) -> Optional[Solution]:
        """The best plan better than ``incumbent`` (max, sum) with the other metric <= ``limit``, else ``None``.

        ``budget`` caps the nodes visited; :attr:`complete` then says whether the search ended by itself (the
        result is optimal) or at the cap (the best found so far).
        """
        self._reset(objective, limit, incumbent, budget)
        if self.degrees:
            try:
                self._visit(0)
            except _OutOfBudget:
                self.complete = False
        return self.found

    def _reset(self, objective: int, limit: float, incumbent: Optional[Tuple[float, float]],
               budget: Optional[int]) -> None:
        self.objective, self.other, self.limit = objective, 1 - objective, limit
        self.best = incumbent if incumbent is not None else (math.inf, math.inf)
        self.budget = math.inf if budget is None else budget
        self.complete = True
        self.found: Optional[Solution] = None
        w = self.workers
        self.load = [[0.0] * w, [0.0] * w]
        self.link_of = [-1] * w
        self.students_on = [0] * w
        self.links: List[list] = []  # [start, stop, degree, ranks, students still to place]
        self.block_link = [-1] * self.n
        self.where: Dict[int, Tuple[int, ...]] = {}
        self.nodes = 0

    def lower_bound(self, objective: int = TIME, limit: float = math.inf) -> float:
        """A value no plan's largest total (of ``objective``) can be below: the smallest that the bounds of the
        empty plan do not rule out (bisection on :meth:`_least_work`, with the water level)."""
        self._reset(objective, limit, None, None)
        low = self._bounds(0)[0] if self.degrees else math.inf
        high = max(low, 1e-12) * 2
        for _ in range(64):
            if low == math.inf or self._least_work(0, high) is not None:
                break
            high *= 2
        else:
            return math.inf
        for _ in range(50):
            middle = (low + high) / 2
            if self._least_work(0, middle) is None:
                low = middle
            else:
                high = middle
        return low

    # -- bounds ---------------------------------------------------------------------------------------------

    def _beaten(self, lb_max: float, lb_sum: float) -> bool:
        """No completion whose (max, sum) is at least the bounds can beat the best (see :meth:`_better`)."""
        best_max, best_sum = self.best
        if best_max == math.inf:
            return False
        tol_max, tol_sum = _TOL * abs(best_max), _TOL * abs(best_sum)
        return lb_max > best_max + tol_max or (lb_max >= best_max - tol_max and lb_sum >= best_sum - tol_sum)

    def _ceiling(self) -> float:
        """The largest total an option may reach and still lead to a better plan."""
        best_max = self.best[0]
        return best_max + _TOL * abs(best_max) if best_max < math.inf else math.inf

    def _better(self, value: Tuple[float, float]) -> bool:
        best_max, best_sum = self.best
        if best_max == math.inf:
            return True
        tol_max, tol_sum = _TOL * abs(best_max), _TOL * abs(best_sum)
        return value[0] < best_max - tol_max or (value[0] <= best_max + tol_max and value[1] < best_sum - tol_sum)

    def _bounds(self, pos: int) -> Tuple[float, float]:
        """Lower bounds of (max, sum) of the objective over every completion of the current node."""
        o = self.objective
        loads = self.load[o]
        work = 0.0
        for b in self.order[pos:]:
            k = self.block_link[b]
            work += self.least_done[o][b][self.links[k][2]] if k >= 0 else self.least_open[o][b]
        ordered = sorted(loads)
        lb = max(ordered[-1], _water_level(ordered, work))
        if lb < math.inf:  # the next blocks, each on its least loaded ranks
            free_link = sorted(loads[r] for r in range(self.workers) if self.link_of[r] < 0)
            c = self.costs
            for b in self.order[pos:pos + 3]:
                fed = min(ordered[h - 1] + c.fed[o][b][h] for h in self.degrees)
                k = self.block_link[b]
                if k >= 0:
                    g, ranks = self.links[k][2], self.links[k][3]
                    bound = min(fed, max(loads[r] for r in ranks) + c.colocated[o][b][g])
                else:
                    teacher = {g: free_link[g - 1] + c.teacher[o][b][g] if g <= len(free_link) else math.inf
                               for g in self.degrees}
                    bound = max(min(teacher[g] for g in self.degrees),
                                min(fed, min(teacher[g] + c.colocated[o][b][g] for g in self.degrees)))
                lb = max(lb, bound)
        return lb, sum(loads) + work

    def _hopeless(self, pos: int) -> bool:
        """Whether no completion can beat the best, by :meth:`_least_work` under the best maximum: none with a
        smaller maximum fits, and those that tie it cannot have a smaller sum."""
        best_max, best_sum = self.best
        if best_max == math.inf:
            return False
        tol_max = _TOL * abs(best_max)
        if self._least_work(pos, best_max - tol_max) is not None:
            return False
        work = self._least_work(pos, best_max + tol_max)
        return work is None or sum(self.load[self.objective]) + work >= best_sum - _TOL * abs(best_sum)

    def _least_work(self, pos: int, top: float) -> Optional[float]:
        """A lower bound of the work left if every rank stays <= ``top``, or ``None`` when that cannot be.

        Each block left finishes one of its ways whose pieces fit under ``top`` on the least loaded ranks (a
        block too big for one rank must be split, at a cost in total work); a rank holds at most one piece
        bigger than ``top / 2`` and only if its load is below ``top / 2``; and all the work must fit in the room
        under ``top``. The least work under the count of big pieces is a small dynamic programme over blocks.
        """
        o, c, inf = self.objective, self.costs, math.inf
        loads = self.load[o]
        ordered = sorted(loads)
        if ordered[-1] > top:
            return None
        half = top / 2
        slots = sum(1 for load in loads if load < half)
        linkless = sorted(loads[r] for r in range(self.workers) if self.link_of[r] < 0)
        # per degree: the room the h least loaded ranks (link-less ranks: for a new link) leave under top
        room = {h: top - ordered[h - 1] for h in self.degrees}
        room_new = {g: top - linkless[g - 1] if g <= len(linkless) else -inf for g in self.degrees}
        least = [0.0] + [inf] * slots  # least work so far per number of big pieces
        for b in self.order[pos:]:
            k = self.block_link[b]
            ways = []  # (work, big pieces)
            fed = [(h * c.fed[o][b][h], h if c.fed[o][b][h] > half else 0)
                   for h in self.degrees if c.fed[o][b][h] <= room[h]]
            if k >= 0:
                g, own = self.links[k][2], self.links[k][3]
                own_room = top - max(loads[r] for r in own)
                piece = c.colocated[o][b][g]
                if piece <= own_room:
                    ways.append((g * piece, g if piece > half else 0))
                if c.teacher_only[o][b][g] <= own_room:
                    ways.extend((work + g * c.teacher_only[o][b][g], big) for work, big in fed)
            else:
                for g in self.degrees:
                    teacher = c.teacher[o][b][g]
                    if teacher > room_new[g]:
                        continue
                    piece = teacher + c.colocated[o][b][g]
                    if piece <= room_new[g]:
                        ways.append((g * piece, g if piece > half else 0))
                    piece = teacher + c.teacher_only[o][b][g]
                    if piece <= room_new[g]:
                        ways.extend((work + g * piece, big + (g if piece > half else 0)) for work, big in fed)
            if not ways:
                return None
            following = [inf] * (slots + 1)
            for count, work in enumerate(least):
                if work == inf:
                    continue
                for extra, big in ways:
                    if count + big <= slots and work + extra < following[count + big]:
                        following[count + big] = work + extra
            least = following
        work = min(least)
        space = sum(top - load for load in loads)
        return None if work > space else work

    # -- search ---------------------------------------------------------------------------------------------

    def _visit(self, pos: int) -> None:
        self.nodes += 1
        if self.nodes > self.budget:
            raise _OutOfBudget
        if pos == self.n:
            self._leaf()
            return
        lb_max, lb_sum = self._bounds(pos)
        if lb_max == math.inf or self._beaten(lb_max, lb_sum):
            return
        if self._hopeless(pos):
            return
        self.level = lb_max
        empty = sum(1 for r in range(self.workers) if self.link_of[r] < 0 and not self.students_on[r])
        uncovered = sum(1 for b in self.order[pos:] if self.block_link[b] < 0)
        if empty > (self.n - pos + uncovered) * self.max_degree:
            return  # ranks left empty
        gaps = sum(1 for j in range(self.n) if self.block_link[j] < 0 and (j == 0 or self.block_link[j - 1] >= 0))
        if gaps > sum(1 for r in range(self.workers) if self.link_of[r] < 0):
            return  # every run of blocks without a link needs a link of its own ranks
        b = self.order[pos]
        if self.block_link[b] >= 0:
            self._place_student(pos)
            return
        for _, start, stop, g, ranks, inc in self._link_options(b):
            if self._beaten(_, -math.inf):
                continue
            self._open_link(start, stop, g, ranks, inc)
            self._place_student(pos)
            self._close_link(start, stop, ranks, inc)

    def _leaf(self) -> None:
        if any(self.link_of[r] < 0 and not self.students_on[r] for r in range(self.workers)):
            return
        loads = self.load[self.objective]
        value = (max(loads), sum(loads))
        if self._better(value):
            self.best = value
            self.found = Solution(value, [(s, e, tuple(ranks)) for s, e, _, ranks, _ in self.links],
                                  dict(self.where))

    def _classes(self, link_less: bool) -> List[List[int]]:
        """Interchangeable ranks: same totals, same link state (its students still to place or not), same
        emptiness."""
        groups: Dict[tuple, List[int]] = {}
        for r in range(self.workers):
            k = self.link_of[r]
            if link_less and k >= 0:
                continue
            tag = k if k >= 0 and self.links[k][4] > 0 else (-2 if k >= 0 else -1)
            key = (tag, self.load[0][r], self.load[1][r], self.students_on[r] > 0)
            groups.setdefault(key, []).append(r)
        return list(groups.values())

    def _link_options(self, b: int) -> List[tuple]:
        """(resulting max, start, stop, degree, ranks, per-metric increment) of every link for block ``b``."""
        lo = b
        while lo > 0 and self.block_link[lo - 1] < 0:
            lo -= 1
        hi = b + 1
        while hi < self.n and self.block_link[hi] < 0:
            hi += 1
        o, x = self.objective, self.other
        loads, others = self.load[o], self.load[x]
        current = max(loads)
        classes = self._classes(link_less=True)
        available = sum(len(group) for group in classes)
        by_size = _subsets(classes)
        options = []
        for g in self.degrees:
            if g > available:
                break
            subsets = by_size.get(g, [])
            for start in range(lo, b + 1):
                for stop in range(b + 1, hi + 1):
                    inc = [self.prefix[m][g][stop] - self.prefix[m][g][start] + self.costs.link_in[m][start][g]
                           for m in (TIME, MEMORY)]
                    for ranks, heads in subsets:
                        if any(others[r] + inc[x] > self.limit for r in heads):
                            continue
                        top = max(current, max(loads[r] for r in heads) + inc[o])
                        options.append((top, start, stop, g, ranks, inc,
                                        g * inc[o] - self.least_teacher[o][stop] + self.least_teacher[o][start]))
        level = self.level
        options.sort(key=lambda option: (max(option[0], level), option[-1]))
        return [option[:6] for option in options]

    def _open_link(self, start, stop, g, ranks, inc) -> None:
        k = len(self.links)
        self.links.append([start, stop, g, ranks, stop - start])
        for j in range(start, stop):
            self.block_link[j] = k
        for r in ranks:
            self.link_of[r] = k
            self.load[0][r] += inc[0]
            self.load[1][r] += inc[1]

    def _close_link(self, start, stop, ranks, inc) -> None:
        self.links.pop()
        for j in range(start, stop):
            self.block_link[j] = -1
        for r in ranks:
            self.link_of[r] = -1
            self.load[0][r] -= inc[0]
            self.load[1][r] -= inc[1]

    def _place_student(self, pos: int) -> None:
        b = self.order[pos]
        k = self.block_link[b]
        link = self.links[k]
        g, own = link[2], link[3]
        c, o, x = self.costs, self.objective, self.other
        loads, others = self.load[o], self.load[x]
        current = max(loads)
        options = []
        least = self.least_student[o][b]
        here = [c.colocated[TIME][b][g], c.colocated[MEMORY][b][g]]
        if all(others[r] + here[x] <= self.limit for r in own):
            options.append((max(current, max(loads[r] for r in own) + here[o]), own, here, None, g * here[o] - least))
        stay = [c.teacher_only[TIME][b][g], c.teacher_only[MEMORY][b][g]]
        if all(others[r] + stay[x] <= self.limit for r in own):
            own_top = max(current, max(loads[r] for r in own) + stay[o])
            by_size = _subsets(self._classes(link_less=False))
            # per class head: its objective and other total, with the link's own increment where it applies
            mine, theirs = list(loads), list(others)
            for r in own:
                mine[r] += stay[o]
                theirs[r] += stay[x]
            limit = self.limit
            ceiling = self._ceiling()
            for h in self.degrees:
                fed_o, fed_x = c.fed[o][b][h], c.fed[x][b][h]
                if fed_o == math.inf:
                    continue
                fed, work = [c.fed[TIME][b][h], c.fed[MEMORY][b][h]], h * fed_o + g * stay[o] - least
                for ranks, heads in by_size.get(h, ()):
                    if ranks == own or max(theirs[r] for r in heads) + fed_x > limit:
                        continue
                    top = max(own_top, max(mine[r] for r in heads) + fed_o)
                    if top <= ceiling:
                        options.append((top, ranks, fed, stay, work))
        level = self.level
        options.sort(key=lambda option: (max(option[0], level), option[-1]))
        link[4] -= 1
        for top, ranks, inc, stay, _ in options:
            if self._beaten(top, -math.inf):
                continue
            self._add(ranks, inc, 1)
            if stay is not None:
                self._add(own, stay, 0)
            self.where[b] = ranks
            self._visit(pos + 1)
            del self.where[b]
            if stay is not None:
                self._add(own, [-stay[0], -stay[1]], 0)
            self._add(ranks, [-inc[0], -inc[1]], -1)
        link[4] += 1

    def _add(self, ranks, inc, students: int) -> None:
        for r in ranks:
            self.load[0][r] += inc[0]
            self.load[1][r] += inc[1]
            self.students_on[r] += students


_TOL = 1e-9
"""Relative margin by which a plan must beat the best to replace it (sums in another order differ in the last
bits)."""


class _OutOfBudget(Exception):
    """The node budget is spent."""


def _water_level(ordered: Sequence[float], work: float) -> float:
    """The least T with sum(max(0, T - load)) >= ``work`` over loads ``ordered`` ascending."""
    if work == math.inf:
        return math.inf
    total = 0.0
    for k, load in enumerate(ordered, 1):
        total += load
        level = (total + work) / k
        if k == len(ordered) or level <= ordered[k]:
            return level
    return math.inf


def _subsets(classes: List[List[int]]) -> Dict[int, List[Tuple[Tuple[int, ...], Tuple[int, ...]]]]:
    return _subsets_of(tuple(tuple(group) for group in classes))


@functools.lru_cache(maxsize=4096)
def _subsets_of(classes: Tuple[Tuple[int, ...], ...]) -> Dict[int, List[Tuple[Tuple[int, ...], Tuple[int, ...]]]]:
    """Per size: (sorted ranks, first rank of every class used) of every way to take that many ranks, up to
    interchangeable ones (the first ``m`` ranks of a class stand for any ``m`` of it)."""
    out: Dict[int, list] = {}
    for counts in itertools.product(*(range(len(group) + 1) for group in classes)):
        size = sum(counts)
        if size:
            ranks = tuple(sorted(r for group, m in zip(classes, counts) for r in group[:m]))
            heads = tuple(group[0] for group, m in zip(classes, counts) if m)
            out.setdefault(size, []).append((ranks, heads))
    return out
