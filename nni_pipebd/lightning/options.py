"""Where and how a Lightning run trains: accelerator, devices, precision and strategy (plain data, checked)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["TrainerOptions", "PRECISIONS", "STRATEGIES", "ACCELERATORS", "check_trainer_options"]

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")
"""Lightning ``precision`` values we pass through (``bf16-mixed``: bfloat16 autocast, e.g. on A100/H100)."""

STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_find_unused_parameters_true",
              "ddp_spawn_find_unused_parameters_true", "fsdp", "deepspeed", "single_device")
"""Lightning ``strategy`` names we pass through; ``auto`` with ``devices > 1`` is ``ddp_spawn`` (see
:func:`~nni_pipebd.lightning.trainer.build_trainer`)."""

ACCELERATORS = ("cpu", "gpu")


def check_trainer_options(precision: object, devices: object, strategy: object) -> Optional[str]:
    """The first problem of these values, or ``None`` when they are valid.

    The message starts with the bare key (``precision = 'x' is not valid; choose one of [...]``), so the caller puts
    its config key or setting name in front of it.
    """
    if precision not in PRECISIONS:
        return f"precision = {precision!r} is not valid; choose one of {list(PRECISIONS)}"
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        return f"devices = {devices!r} must be an int >= 1 (devices of one machine trained in data parallel)"
    if strategy not in STRATEGIES:
        return f"strategy = {strategy!r} is not valid; choose one of {list(STRATEGIES)}"
    return None


@dataclass(frozen=True)
class TrainerOptions:
    """How a Lightning ``Trainer`` places the run.

    Parameters
    ----------
    accelerator : str
        ``cpu`` or ``gpu``.
    devices : int
        Devices trained in data parallel (each gets its shard of every global batch).
    precision : str
        One of :data:`PRECISIONS`.
    strategy : str
        One of :data:`STRATEGIES`.
    """

    accelerator: str = "cpu"
    devices: int = 1
    precision: str = "32-true"
    strategy: str = "auto"

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"accelerator = {self.accelerator!r} is not valid; choose one of {list(ACCELERATORS)}")
        problem = check_trainer_options(self.precision, self.devices, self.strategy)
        if problem:
            raise ValueError(problem)

    @classmethod
    def for_device(cls, device: str, **options: object) -> "TrainerOptions":
        """Options for a project ``device`` (``auto``: a GPU when CUDA is available, ``cpu``, ``cuda``)."""
        import torch

        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {device!r} is not valid; choose one of ['auto', 'cpu', 'cuda']")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but CUDA is not available; use cpu or auto")
        gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        return cls(accelerator="gpu" if gpu else "cpu", **options)  # type: ignore[arg-type]
