"""Local search over one-phase plans: good plans fast, to bound the exact search from the start."""

from __future__ import annotations

import functools
import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

from .branch import MEMORY, TIME, PieceCosts, Solution

__all__ = ["Layout", "improve"]


class Layout:
    """A one-phase plan as the search sees it: links ``[start, stop, ranks]`` in chain order, each student
    block's ranks (its link's ranks: co-located), and the per-rank totals of both metrics."""

    def __init__(self, costs: PieceCosts, workers: int, links: Sequence[Tuple[int, int, Tuple[int, ...]]],
                 students: Dict[int, Tuple[int, ...]]):
        self.costs, self.workers = costs, workers
        self.links = [(s, e, tuple(sorted(r))) for s, e, r in sorted(links)]
        self.students = {b: tuple(sorted(r)) for b, r in students.items()}
        self.load = self._loads()

    def copy(self) -> "Layout":
        return Layout(self.costs, self.workers, self.links, self.students)

    def link_of(self, block: int) -> Tuple[int, int, Tuple[int, ...]]:
        for link in self.links:
            if link[0] <= block < link[1]:
                return link
        raise ValueError(f"no link runs block {block}")

    def _loads(self) -> List[List[float]]:
        c = self.costs
        load = [[0.0] * self.workers, [0.0] * self.workers]
        for s, e, ranks in self.links:
            g = len(ranks)
            for m in (TIME, MEMORY):
                total = c.link_in[m][s][g]
                for b in range(s, e):
                    extra = c.colocated if self.students[b] == ranks else c.teacher_only
                    total += c.teacher[m][b][g] + extra[m][b][g]
                for r in ranks:
                    load[m][r] += total
        for b, ranks in self.students.items():
            if ranks != self.link_of(b)[2]:
                for m in (TIME, MEMORY):
                    for r in ranks:
                        load[m][r] += c.fed[m][b][len(ranks)]
        return load

    def valid(self, limit: float) -> bool:
        """Every rank has work, none exceeds the memory limit, every degree is allowed."""
        used = {r for _, _, ranks in self.links for r in ranks}
        used.update(r for ranks in self.students.values() for r in ranks)
        return (len(used) == self.workers and max(self.load[MEMORY]) <= limit
                and all(v < math.inf for v in self.load[TIME]))

    def key(self) -> Tuple[float, ...]:
        """Largest load first, then the next ones: smaller is better (breaks the plateaus of the maximum)."""
        return tuple(sorted(self.load[TIME], reverse=True))

    def value(self) -> Tuple[float, float]:
        return max(self.load[TIME]), sum(self.load[TIME])

    def solution(self) -> Solution:
        return Solution(self.value(), list(self.links), dict(self.students))


def improve(layout: Layout, limit: float = math.inf, rounds: int = 50) -> Layout:
    """Descend from ``layout`` by the first of these moves that helps until none does (or ``rounds``): place one
    student block anew (any ranks, any degree, or its link's ranks), move a link boundary by one block, give a
    link one rank more or less, split a link or merge two. Keeps ``layout`` valid under ``limit``."""
    best = _settle(layout, limit)
    for _ in range(rounds):
        for candidate in _neighbours(best):
            candidate = _settle(candidate, limit)  # a rank the move emptied gets students here
            if candidate.valid(limit) and _smaller(candidate.key(), best.key()):
                best = candidate
                break
        else:
            return best
    return best


def _settle(layout: Layout, limit: float) -> Layout:
    """Re-place every student block in turn on its best ranks until no block moves."""
    changed = True
    while changed:
        changed = False
        for b in sorted(layout.students, key=lambda b: -max(layout.costs.fed[TIME][b][h]
                                                            for h in layout.costs.degrees)):
            better = _best_student(layout, b, limit)
            if better is not None:
                layout, changed = better, True
    return layout


def _best_student(layout: Layout, b: int, limit: float) -> Optional[Layout]:
    """``layout`` with student ``b`` on the ranks that give the smallest key, if better than now."""
    c, w = layout.costs, layout.workers
    own = layout.link_of(b)[2]
    current = layout.students[b]
    base = [list(layout.load[TIME]), list(layout.load[MEMORY])]
    _shift(c, base, b, current, own, -1)
    now = [list(base[TIME]), list(base[MEMORY])]
    _shift(c, now, b, current, own, +1)
    best_key, best_ranks = tuple(sorted(now[TIME], reverse=True)), None
    times, memory = base
    for h in c.degrees:
        fed_t, fed_m = c.fed[TIME][b][h], c.fed[MEMORY][b][h]
        for ranks in _combinations(w, h):
            if ranks == current:
                continue
            if ranks == own:
                trial = [list(times), list(memory)]
                _shift(c, trial, b, ranks, own, +1)
                if max(trial[MEMORY]) > limit:
                    continue
                key = tuple(sorted(trial[TIME], reverse=True))
            else:  # cheap rejections first: the new largest total, the memory limit
                if max(times[r] for r in ranks) + fed_t > best_key[0] * (1 + 1e-12):
                    continue
                if max(memory[r] for r in ranks) + fed_m > limit:
                    continue
                trial = list(times)
                for r in ranks:
                    trial[r] += fed_t
                key = tuple(sorted(trial, reverse=True))
            if _smaller(key, best_key):
                best_key, best_ranks = key, ranks
    if best_ranks is None:
        return None
    students = dict(layout.students)
    students[b] = best_ranks
    moved = Layout(c, w, layout.links, students)
    return moved if moved.valid(limit) else None


@functools.lru_cache(maxsize=None)
def _combinations(workers: int, size: int) -> Tuple[Tuple[int, ...], ...]:
    return tuple(itertools.combinations(range(workers), size))


def _smaller(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` before ``b`` lexicographically, by more than rounding (so that no move can undo another)."""
    for x, y in zip(a, b):
        margin = 1e-12 * max(abs(x), abs(y))
        if x < y - margin:
            return True
        if x > y + margin:
            return False
    return False


def _shift(c: PieceCosts, load: List[List[float]], b: int, ranks: Tuple[int, ...], own: Tuple[int, ...],
           sign: int) -> None:
    """Add (``sign`` +1) or remove (-1) student ``b`` on ``ranks`` (its link on ``own``)."""
    g = len(own)
    for m in (TIME, MEMORY):
        if ranks == own:
            for r in own:
                load[m][r] += sign * (c.colocated[m][b][g] - c.teacher_only[m][b][g])
        else:
            for r in ranks:
                load[m][r] += sign * c.fed[m][b][len(ranks)]


def _neighbours(layout: Layout):
    """Layouts one chain move away; co-located students follow their link, the others keep their ranks."""
    c, w, links = layout.costs, layout.workers, layout.links
    in_link = {r for _, _, ranks in links for r in ranks}
    spare = [r for r in range(w) if r not in in_link]

    def rebuild(new_links):
        students = {}
        for b, ranks in layout.students.items():
            old = layout.link_of(b)[2]
            new = next(r for s, e, r in new_links if s <= b < e)
            students[b] = new if ranks == old else ranks
        return Layout(c, w, new_links, students)

    for k in range(len(links) - 1):  # boundaries
        (s0, e0, r0), (s1, e1, r1) = links[k], links[k + 1]
        if e0 - s0 > 1:
            yield rebuild(links[:k] + [(s0, e0 - 1, r0), (s1 - 1, e1, r1)] + links[k + 2:])
        if e1 - s1 > 1:
            yield rebuild(links[:k] + [(s0, e0 + 1, r0), (s1 + 1, e1, r1)] + links[k + 2:])
    for k, (s, e, ranks) in enumerate(links):
        g = len(ranks)
        for r in spare:  # one rank more
            if g + 1 in c.degrees:
                yield rebuild(links[:k] + [(s, e, tuple(sorted(ranks + (r,))))] + links[k + 1:])
        if g - 1 in c.degrees:  # one rank less
            for r in ranks:
                yield rebuild(links[:k] + [(s, e, tuple(x for x in ranks if x != r))] + links[k + 1:])
        for cut in range(s + 1, e):  # split onto spare ranks
            for r in spare:
                yield rebuild(links[:k] + [(s, cut, ranks), (cut, e, (r,))] + links[k + 1:])
        if k + 1 < len(links):  # merge with the next
            yield rebuild(links[:k] + [(s, links[k + 1][1], ranks)] + links[k + 2:])
