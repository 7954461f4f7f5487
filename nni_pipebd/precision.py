"""Numeric precision (fp32, bf16/fp16 autocast, fp64) and memory format: one place that says what each setting does."""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Optional, Union

import torch

__all__ = ["PRECISIONS", "autocast_dtype", "autocast", "cast_dtype", "needs_scaler", "check_precision",
           "memory_format", "formatted", "wire_dtype"]

PRECISIONS = ("fp32", "bf16", "fp16", "fp64")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": None}


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` (``None`` for ``fp32`` and ``fp64``: no autocast).

    Raises
    ------
    ValueError
        ``precision`` is not one of :data:`PRECISIONS`.
    """
    try:
        return _DTYPES[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)} "
                         "(execution.precision)") from None


def cast_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype ``precision`` casts the teacher, the student blocks and the data batches to: ``torch.float64`` for
    ``fp64`` (no autocast: every op, relay, all-reduce and saved weight in float64), ``None`` for the others (left
    as they are, float32: autocast changes only what some ops compute in).

    Raises
    ------
    ValueError
        ``precision`` is not one of :data:`PRECISIONS`.
    """
    autocast_dtype(precision)
    return torch.float64 if precision == "fp64" else None


def autocast(precision: str, device: Union[str, torch.device]) -> ContextManager:
    """``torch.autocast`` on ``device``'s type with ``precision``'s dtype; nothing for ``fp32`` and ``fp64``."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def needs_scaler(precision: str) -> bool:
    """Whether ``precision`` needs loss scaling (fp16's narrow exponent underflows small gradients)."""
    return autocast_dtype(precision) is torch.float16


def check_precision(precision: str, device: Union[str, torch.device], where: str = "execution.device") -> None:
    """Raise ``ValueError`` when ``precision`` cannot run on ``device`` (fp16 needs CUDA; fp64 runs on both).

    ``where`` names how the device was chosen (the config key, or ``auto`` and what it resolved to), for the
    message.
    """
    autocast_dtype(precision)
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise ValueError(f"execution.precision = 'fp16' needs CUDA, but {where} gives {torch.device(device).type}; "
                         "use precision: bf16 (or fp32) on CPU, or run on a GPU")


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last`` when ``channels_last`` is set, else ``torch.contiguous_format``."""
    return torch.channels_last if channels_last else torch.contiguous_format


def formatted(tensor: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``tensor`` dense in the setting's memory format: channels_last for 4-D tensors when set, else plain.

    Every activation handed to a teacher or student block goes through this, whether it was computed on this
    rank or received, so that the blocks see the same layout in every executor (bitwise-equal results).
    A copy only where the layout changes; values never change.
    """
    if channels_last and tensor.dim() == 4:
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor.contiguous()


def wire_dtype(dtype_in: torch.dtype, dtype_out: torch.dtype) -> torch.dtype:
    """The dtype one packed (input, output) message of a block travels in: the wider of the two.

    Both cast to it and back exactly (bf16 -> fp32 -> bf16 and fp16 -> fp32 -> fp16 are lossless), so each
    half keeps its own dtype bit for bit.
    """
    return torch.promote_types(dtype_in, dtype_out)
