"""Live training metrics: per-step block losses to Lightning loggers, each epoch's block losses to the lead process."""

from __future__ import annotations

import csv
import threading
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

__all__ = ["MetricsWriter", "EpochResults", "LOGS", "read_step_losses"]

LOGS = "logs"
"""Folder of a library holding every rank's step log (``logs/rank<r>/metrics.csv``, TensorBoard events too)."""


class MetricsWriter:
    """A worker's side.

    Every step, the losses of the blocks this rank reports go to a Lightning ``CSVLogger`` (and a
    ``TensorBoardLogger`` when ``tensorboard`` is installed) under ``out_dir/logs/rank<r>``, written out at every
    epoch end; every epoch end, one line per block (``block epoch loss``, or ``block stop epoch`` when it stops)
    is appended to ``rank<r>.epochs`` in the run's ``folder``, where the lead process reads it while training runs.
    Without ``out_dir`` (or ``folder``) that part is skipped.
    """

    def __init__(self, out_dir: Optional[str], folder: Optional[str], rank: int, resume: bool = False):
        self.loggers = []
        if out_dir is not None:
            from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

            log_dir = Path(out_dir, LOGS, f"rank{rank}")
            kept = log_dir / "metrics.csv"
            if resume and kept.is_file():  # the logger starts its file afresh: keep the steps before the stop
                kept.rename(log_dir / f"metrics-{len(list(log_dir.glob('metrics*.csv')))}.csv")
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Experiment logs directory")
                self.loggers.append(CSVLogger(out_dir, name=LOGS, version=f"rank{rank}"))
                try:
                    self.loggers.append(TensorBoardLogger(out_dir, name=LOGS, version=f"rank{rank}"))
                except ModuleNotFoundError:  # TensorBoard is optional
                    pass
                for logger in self.loggers:
                    logger.experiment  # noqa: B018  (created here, where its warning about old files is silenced)
        self.path = None if folder is None else Path(folder, f"rank{rank}.epochs")

    def start(self, num_blocks: int) -> None:
        """Tell the lead how many blocks the run trains (rank 0, before its first step)."""
        if self.path is not None:
            with open(self.path, "a") as file:
                file.write(f"blocks {num_blocks}\n")

    def step(self, block: int, step: int, loss: float, lr: float) -> None:
        """Block ``block``'s loss and learning rate at its ``step``-th step."""
        for logger in self.loggers:
            logger.log_metrics({f"block_{block}/loss": float(loss), f"block_{block}/lr": float(lr)}, step=step)

    def epoch(self, results: Dict[int, Tuple[int, float]], stopped: Optional[Dict[int, int]] = None) -> None:
        """Per block, (epoch, mean loss) of the epoch it just ended (epochs count from 1), and the blocks that
        stopped with it (after how many epochs)."""
        self.flush()
        stopped = stopped or {}
        if self.path is not None and (results or stopped):
            lines = [f"{b} {epoch} {loss!r}\n" for b, (epoch, loss) in sorted(results.items())]
            lines += [f"{b} stop {epoch}\n" for b, epoch in sorted(stopped.items())]
            with open(self.path, "a") as file:
                file.write("".join(lines))

    def flush(self) -> None:
        """Write the logged steps out (at epoch ends and with every checkpoint, so a resumed run loses none)."""
        for logger in self.loggers:
            logger.save()

    def close(self) -> None:
        for logger in self.loggers:
            logger.save()
            logger.finalize("success")


class EpochResults:
    """The lead's side: a thread reads the workers' epoch lines and calls ``callback(epoch, {block: loss})`` as soon
    as every block has finished that epoch or stopped before it (epochs count from 1). With blocks trained one after
    another (``dp``, ``ls``), an epoch is complete only when the last block has trained it."""

    def __init__(self, folder: Union[str, Path], world: int,
                 callback: Optional[Callable[[int, Dict[int, float]], None]], interval: float = 0.5):
        self.folder, self.world = Path(folder), world
        self.num_blocks: Optional[int] = None
        self.callback, self.interval = callback, interval
        self.reported = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "EpochResults":
        if self.callback is not None:
            self._thread = threading.Thread(target=self._run, name="nni_pipebd-epochs", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            if exc[0] is None:
                self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Report every epoch completed since the last call."""
        losses: Dict[int, Dict[int, float]] = {}
        stopped: Dict[int, int] = {}
        for rank in range(self.world):
            path = self.folder / f"rank{rank}.epochs"
            try:
                text = path.read_text()
            except OSError:
                continue
            for line in text.splitlines(keepends=True):
                if not line.endswith("\n"):
                    break  # being written
                block, what, value = (line.split() + ["", ""])[:3]
                if block == "blocks":
                    self.num_blocks = int(what)
                elif what == "stop":
                    stopped[int(block)] = int(value)
                else:
                    losses.setdefault(int(block), {})[int(what)] = float(value)
        while self.num_blocks is not None:
            epoch = self.reported + 1
            row = {}
            for block in range(self.num_blocks):
                if epoch in losses.get(block, {}):
                    row[block] = losses[block][epoch]
                elif not (block in stopped and stopped[block] < epoch):
                    return  # this block has yet to train this epoch
            if not row:
                return
            self.callback(epoch, row)
            self.reported = epoch


def read_step_losses(directory: Union[str, Path]) -> Dict[int, List[Tuple[int, float]]]:
    """(step, loss) of every block from a library's step logs (``logs/rank<r>/metrics*.csv``; a step logged twice,
    before a stop and again after the resume, counts once)."""
    curves: Dict[int, Dict[int, float]] = {}
    for path in sorted(Path(directory, LOGS).glob("rank*/metrics*.csv")):
        with open(path, newline="") as file:
            for row in csv.DictReader(file):
                for key, value in row.items():
                    if key.startswith("block_") and key.endswith("/loss") and value not in ("", None):
                        curves.setdefault(int(key[6:-5]), {})[int(row["step"])] = float(value)
    return {block: sorted(points.items()) for block, points in sorted(curves.items())}
