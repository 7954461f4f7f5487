"""Progress bars: workers write their step counts to small files; one process draws every rank's bar."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tqdm import tqdm

__all__ = ["ProgressWriter", "ProgressBars", "rank_label"]


def rank_label(rank: int, label: str) -> str:
    """``rank R <label>``, naming the rank once (executors' labels may already start with ``rank R``)."""
    label = label.strip()
    return label if label.split(":")[0].strip() == f"rank {rank}" else f"rank {rank} {label}".strip()


class ProgressWriter:
    """A worker's side: ``update(done, total)`` at most every ``interval`` seconds (and always at the end)."""

    def __init__(self, folder: Optional[str], rank: int, interval: float = 0.3):
        self.path = None if folder is None else Path(folder, f"rank{rank}.progress")
        self.interval, self._last = interval, 0.0

    def update(self, done: int, total: int, label: str = "") -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if done < total and now - self._last < self.interval:
            return
        self._last = now
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{done} {total} {label}")
        os.replace(tmp, self.path)


class ProgressBars:
    """The drawing side: a thread polls the workers' files and draws one tqdm bar per rank (with ETA).

    Only this process writes to the terminal, so worker output never interleaves; ``enabled=False`` (``--quiet``)
    draws nothing. ``live=False`` (the default when stderr is not a terminal: a log file, a CI job, a pipe) draws no
    bars but writes one line per rank at the end, so a log holds each rank's label once, not once per refresh.
    """

    def __init__(self, folder: str, world: int, enabled: bool = True, interval: float = 0.5,
                 live: Optional[bool] = None):
        self.folder, self.world, self.enabled, self.interval = Path(folder), world, enabled, interval
        self.live = _is_terminal() if live is None else live
        self._bars: Dict[int, tqdm] = {}
        self._seen: Dict[int, Tuple[int, int, str, float]] = {}  # rank -> done, total, label, seconds to the last step
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "ProgressBars":
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="nni_pipebd-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._poll()
        for bar in self._bars.values():
            bar.close()
        if self.enabled and not self.live:
            for rank, (done, total, label, seconds) in sorted(self._seen.items()):
                print(f"{rank_label(rank, label)}: {done}/{total} steps, the last {seconds:.1f} s after launch",
                      file=sys.stderr, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        for rank in range(self.world):
            path = self.folder / f"rank{rank}.progress"
            try:
                done, total, label = (path.read_text().split(" ", 2) + [""])[:3]
                done, total = int(done), int(total)
            except (OSError, ValueError):
                continue
            if rank not in self._seen or self._seen[rank][0] != done:
                self._seen[rank] = (done, total, label, time.monotonic() - self._start)
            if not self.live:
                continue
            bar = self._bars.get(rank)
            if bar is None:
                bar = self._bars[rank] = tqdm(total=total, position=rank, leave=True, dynamic_ncols=True,
                                              desc=rank_label(rank, label), unit="step")
            elif bar.desc != rank_label(rank, label):
                bar.set_description_str(rank_label(rank, label))
            bar.update(done - bar.n)

    @property
    def ranks_seen(self) -> List[int]:
        """The ranks that reported progress so far."""
        return sorted(self._seen)


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
