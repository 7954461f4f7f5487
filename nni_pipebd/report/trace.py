"""Per-worker timeline of (start, end, kind) spans, written as a Chrome trace (Perfetto / chrome://tracing)."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple, Union

__all__ = ["KINDS", "Tracer", "busy_fraction", "write_chrome_trace"]

KINDS = ("data", "teacher", "student", "send", "recv", "wait", "comm")
"""Span kinds: loading, teacher forward, student step, sending, receiving, waiting at a barrier, all-reduce."""

Span = Tuple[float, float, str]


class Tracer:
    """Records spans (wall-clock seconds) of one worker, at most ``max_spans`` (the start of a long run);
    disabled tracers cost one branch per span."""

    def __init__(self, enabled: bool = True, max_spans: int = 200_000):
        self.enabled, self.max_spans = enabled, max_spans
        self.spans: List[Span] = []

    @contextmanager
    def span(self, kind: str) -> Iterator[None]:
        """Time the body as one span of ``kind``."""
        if not self.enabled:
            yield
            return
        start = time.time()
        try:
            yield
        finally:
            if len(self.spans) < self.max_spans:
                self.spans.append((start, time.time(), kind))


def busy_fraction(spans: Sequence[Span], start: float, end: float, busy: Sequence[str] = ("data", "teacher",
                                                                                          "student")) -> float:
    """Share of [start, end] spent in ``busy`` kinds."""
    total = sum(e - s for s, e, kind in spans if kind in busy)
    return total / max(end - start, 1e-12)


def write_chrome_trace(path: Union[str, Path], spans_by_rank: Dict[int, Sequence[Span]],
                       names: Dict[int, str]) -> Path:
    """Write one row (thread) per rank; ``names`` labels the rows (e.g. 'rank 1: stage 1, blocks 2-3').

    Times count from the first span of any rank; ``otherData.origin_unix_s`` says when that was (Unix seconds).
    """
    origin = min((s for spans in spans_by_rank.values() for s, _, _ in spans), default=0.0)
    events = []
    for rank, spans in sorted(spans_by_rank.items()):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank,
                       "args": {"name": names.get(rank, f"rank {rank}")}})
        for start, end, kind in spans:
            events.append({"name": kind, "cat": kind, "ph": "X", "pid": 0, "tid": rank,
                           "ts": (start - origin) * 1e6, "dur": (end - start) * 1e6})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms",
                                "otherData": {"origin_unix_s": origin}}))
    return path
