"""Periodic, atomic training checkpoints per stage, and the consistent step every stage can resume from."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set

import torch

from ..library import atomic_save

__all__ = ["CheckpointError", "Checkpointer", "common_step", "load_checkpoint", "CHECKPOINTS"]

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^(?P<key>[a-z0-9_]+)_step(?P<step>\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not belong to this run."""


class Checkpointer:
    """Writes the state of one stage (``key``) every ``every`` steps; keeps the newest ``keep`` files.

    Files are ``<out>/checkpoints/<key>_step<N>.pt`` written by temp file + rename, so a reader never sees a
    half-written checkpoint. Several are kept so that stages that drifted apart (decoupled updates) still
    share a step to resume from.
    """

    def __init__(self, out_dir: os.PathLike, key: str, every: Optional[int], keep: int = 4):
        self.folder = Path(out_dir) / CHECKPOINTS
        self.key, self.every, self.keep = key, every, keep

    def due(self, steps_done: int) -> bool:
        """Whether to checkpoint after ``steps_done`` steps."""
        return bool(self.every) and steps_done % self.every == 0

    def save(self, steps_done: int, state: Dict[str, Any]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.key}_step{steps_done:09d}.pt"
        atomic_save({"steps_done": steps_done, **state}, path)
        for old in sorted(steps_of(self.folder, self.key))[:-self.keep]:
            (self.folder / f"{self.key}_step{old:09d}.pt").unlink(missing_ok=True)
        return path


def steps_of(folder: Path, key: str) -> Set[int]:
    """Steps for which ``key`` has a checkpoint in ``folder``."""
    if not folder.is_dir():
        return set()
    found = set()
    for name in os.listdir(folder):
        match = _NAME.match(name)
        if match and match["key"] == key:
            found.add(int(match["step"]))
    return found


def common_step(out_dir: os.PathLike, keys: Iterable[str]) -> Optional[int]:
    """The latest step every key has a checkpoint for (``None``: start from scratch)."""
    folder = Path(out_dir) / CHECKPOINTS
    sets: List[Set[int]] = [steps_of(folder, key) for key in keys]
    shared = set.intersection(*sets) if sets else set()
    return max(shared) if shared else None


def load_checkpoint(out_dir: os.PathLike, key: str, step: int) -> Dict[str, Any]:
    """The state saved by ``key`` after ``step`` steps."""
    path = Path(out_dir) / CHECKPOINTS / f"{key}_step{step:09d}.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; cannot resume {key} at step {step}") from None
    except Exception as err:  # truncated / corrupt files raise several types
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}); the checkpoint is corrupt — "
                              "delete it to resume from an earlier one") from err
