"""What a search or a finetuning takes, as checked plain data (no torch): budget, settings, architecture files."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from ..lightning.options import TrainerOptions, check_trainer_options
from .errors import BudgetError, SearchError

__all__ = ["METRICS", "Budget", "fits", "slack_limit", "parse_budget", "RankingSettings", "FinetuneSettings",
           "architecture_id", "load_architecture"]

METRICS = ("params", "flops", "latency_ms")
"""Budgetable metrics: parameter count, multiply-accumulates of one sample's forward, CPU latency at batch 1."""

_SUFFIX = {"": 1.0, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgG]?)\s*$")


@dataclass(frozen=True)
class Budget:
    """An upper bound on one metric of the whole network.

    Parameters
    ----------
    metric : str
        ``params``, ``flops`` (multiply-accumulates, the usual "FLOPs" of NAS papers) or ``latency_ms``.
    limit : float
        The largest allowed value (inclusive).
    """

    metric: str
    limit: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise BudgetError(f"unknown budget metric {self.metric!r}; valid: {list(METRICS)}")
        if not self.limit >= 0:
            raise BudgetError(f"budget {self.metric}={self.limit!r} must be a number >= 0")

    def fits(self, cost: float) -> bool:
        """Whether ``cost`` is within the budget (see :func:`fits`)."""
        return fits(cost, self.limit)

    def __str__(self) -> str:
        return f"{self.metric}={self.limit:g}"


def fits(cost: float, limit: float) -> bool:
    """Whether ``cost <= limit``, with a relative slack of 1e-9 that absorbs the float summation order."""
    return cost <= slack_limit(limit)


def slack_limit(limit: float) -> float:
    """The largest cost :func:`fits` accepts under ``limit``."""
    return limit * (1 + 1e-9) + 1e-12


def parse_budget(text: str) -> Budget:
    """Parse ``METRIC=VALUE``, e.g. ``params=2.5M``, ``flops=3e7``, ``latency_ms=4``.

    ``VALUE`` is a non-negative number with an optional suffix ``k``, ``M`` or ``G`` (x1e3, x1e6, x1e9).

    Raises
    ------
    BudgetError
        Naming the text and the valid metrics.
    """
    hint = f"write METRIC=VALUE with METRIC one of {list(METRICS)}, e.g. params=2.5M, flops=3e7, latency_ms=4"
    if not isinstance(text, str) or text.count("=") != 1:
        raise BudgetError(f"budget {text!r} is not METRIC=VALUE; {hint}")
    metric, value = (part.strip() for part in text.split("="))
    if metric not in METRICS:
        raise BudgetError(f"budget {text!r} has unknown metric {metric!r}; {hint}")
    match = _NUMBER.match(value)
    if match is None:
        raise BudgetError(f"budget {text!r}: {value!r} is not a non-negative number; {hint}")
    return Budget(metric, float(match.group(1)) * _SUFFIX[match.group(2)])


@dataclass(frozen=True)
class RankingSettings:
    """How paths are scored; ``scores.json`` is reused only when these (and the block files) match.

    Parameters
    ----------
    max_paths : int
        A block with at most this many paths is scored exhaustively; a larger one on a uniform sample of this
        many distinct paths drawn from ``numpy.random.default_rng([seed, block])``.
    val_batches : int, optional
        Validation batches (of ``data.batch_size``) the scores average over; ``None`` = the whole split.
    calib_batches : int
        Training batches run in train mode (``momentum=None``, no grad) to re-estimate BatchNorm statistics of
        each path before it is scored.
    seed : int
        Seeds the path sample and the calibration batches.
    latency_runs : int
        Timed runs per path for the CPU latency at batch 1 (median); 0 skips latency.
    """

    max_paths: int = 64
    val_batches: Optional[int] = 8
    calib_batches: int = 4
    seed: int = 0
    latency_runs: int = 5

    def __post_init__(self) -> None:
        for name in ("max_paths", "calib_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SearchError(f"ranking setting {name} = {value!r} must be an int >= 1")
        if self.val_batches is not None and (not isinstance(self.val_batches, int) or self.val_batches < 1):
            raise SearchError(f"ranking setting val_batches = {self.val_batches!r} must be an int >= 1 or None")
        if not isinstance(self.latency_runs, int) or self.latency_runs < 0:
            raise SearchError(f"ranking setting latency_runs = {self.latency_runs!r} must be an int >= 0")


_MODES = ("kd", "labels")
_INITS = ("library", "scratch")
_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class FinetuneSettings:
    """End-to-end training of a built architecture.

    Parameters
    ----------
    epochs : int
        Passes over the training split.
    mode : str
        ``kd``: ``kd_weight * T^2 * KL(teacher || student at temperature T) + (1 - kd_weight) * CE(labels)``;
        ``labels``: cross-entropy on labels only.
    temperature, kd_weight : float
        Knowledge-distillation temperature and weight.
    optimizer : str
        ``adam`` or ``sgd`` (momentum 0.9, Nesterov).
    lr, weight_decay : float
        Optimizer settings; the learning rate follows a cosine schedule to 0 over all steps.
    batch_size : int, optional
        Default: the library's ``data.batch_size``.
    max_steps_per_epoch : int, optional
        Cut every epoch after this many steps (quick runs, tests).
    init : str
        ``library`` (the library's block weights) or ``scratch`` (re-initialised, for comparison).
    calib_batches : int
        Training batches re-estimating BatchNorm statistics of the built network before it is first evaluated.
    seed : int
        Data order, ``seed_everything`` of the Lightning run (and the initialisation with ``init: scratch``).
    precision : str
        Lightning precision, e.g. ``32-true`` or ``bf16-mixed`` (see :data:`~nni_pipebd.lightning.options.PRECISIONS`).
    devices : int
        Devices finetuning in data parallel (each takes its shard of every global batch).
    strategy : str
        Lightning strategy (``auto``: one device, or ``ddp_spawn`` with several; see
        :data:`~nni_pipebd.lightning.options.STRATEGIES`).
    """

    epochs: int = 1
    mode: str = "kd"
    temperature: float = 4.0
    kd_weight: float = 0.9
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: Optional[int] = None
    max_steps_per_epoch: Optional[int] = None
    init: str = "library"
    calib_batches: int = 4
    seed: int = 0
    precision: str = "32-true"
    devices: int = 1
    strategy: str = "auto"

    def __post_init__(self) -> None:
        for name, valid in (("mode", _MODES), ("init", _INITS), ("optimizer", _OPTIMIZERS)):
            if getattr(self, name) not in valid:
                raise SearchError(f"finetune setting {name} = {getattr(self, name)!r} is not valid; "
                                  f"choose one of {list(valid)}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise SearchError(f"finetune setting epochs = {self.epochs!r} must be an int >= 0 (0: evaluate only)")
        if not self.lr > 0 or not self.temperature > 0 or not 0 <= self.kd_weight <= 1:
            raise SearchError(f"finetune settings need lr > 0, temperature > 0 and 0 <= kd_weight <= 1; got "
                              f"lr={self.lr!r}, temperature={self.temperature!r}, kd_weight={self.kd_weight!r}")
        for name in ("batch_size", "max_steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SearchError(f"finetune setting {name} = {value!r} must be an int >= 1 (or None)")
        problem = check_trainer_options(self.precision, self.devices, self.strategy)
        if problem:
            raise SearchError(f"finetune setting {problem}")

    def trainer_options(self, device: str = "cpu") -> TrainerOptions:
        """Lightning options of finetuning on ``device`` (``auto``, ``cpu`` or ``cuda``)."""
        return TrainerOptions.for_device(device, devices=self.devices, precision=self.precision,
                                         strategy=self.strategy)


def architecture_id(sample: Mapping[str, Any]) -> str:
    """A short stable id of an architecture (first 10 hex digits of the SHA-1 of its sorted JSON)."""
    return hashlib.sha1(json.dumps(dict(sample), sort_keys=True).encode()).hexdigest()[:10]


def load_architecture(source: Union[str, Path, Mapping[str, Any]]) -> Dict[str, Any]:
    """The NNI sample dict in ``source``: a JSON file (or already-parsed data) holding a sample dict, one
    search result (``{"sample": ...}``) or a search output (``{"architectures": [...]}``, the first is taken).

    Raises
    ------
    SearchError
        The file is missing, not JSON, or holds none of these forms.
    """
    where = "the architecture"
    data: Any = source
    if isinstance(source, (str, Path)):
        where = str(source)
        try:
            data = json.loads(Path(source).read_text())
        except FileNotFoundError:
            raise SearchError(f"architecture file {where!r} does not exist") from None
        except json.JSONDecodeError as err:
            raise SearchError(f"architecture file {where!r} is not valid JSON ({err})") from None
    if isinstance(data, Mapping) and "architectures" in data:
        if not data["architectures"]:
            raise SearchError(f"{where} holds an empty list of architectures; search with a larger budget")
        data = data["architectures"][0]
    if isinstance(data, Mapping) and "sample" in data:
        data = data["sample"]
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise SearchError(f"{where} must hold an NNI sample dict ({{label: candidate}}), a search result with "
                          f"'sample', or a search output with 'architectures'; got {str(data)[:200]}")
    return dict(data)
