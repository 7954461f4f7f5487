"""Build a chosen architecture as a standalone network from the library's blocks and finetune it end to end."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from ..data.datasets import make_loader
from ..library import atomic_save
from ..lightning.options import TrainerOptions, check_trainer_options
from ..plan.cost import forward_macs
from .costs import count_params, measure_latency_ms
from .errors import SearchError
from .loaded import LoadedLibrary, calib_batches, check_sample, open_library, recalibrate_bn, resolve_device

__all__ = ["FINETUNE_FORMAT", "FinetuneSettings", "FinetuneError", "build_network", "finetune", "load_architecture",
           "architecture_id", "reinitialize", "prepare_network", "network_costs", "LOGS"]

_logger = logging.getLogger(__name__)

FINETUNE_FORMAT = "nni_pipebd.finetune/1"
_MODES = ("kd", "labels")
_INITS = ("library", "scratch")
_OPTIMIZERS = ("adam", "sgd")

LOGS = "logs"
"""Folder of a library that holds the Lightning logs and checkpoints of finetuning runs (``logs/finetune_<id>``)."""


class FinetuneError(RuntimeError):
    """Finetuning diverged (non-finite loss)."""


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


def build_network(library: LoadedLibrary, sample: Mapping[str, Any]) -> nn.Module:
    """The architecture ``sample`` as a standalone network holding the library's block weights: NNI's freeze of the
    student space, each block frozen from its supernet (``BlockSupernet.freeze``), deep-copied.

    Raises
    ------
    ArchitectureError
        ``sample`` has unknown or missing labels or invalid candidates (the message lists the valid ones).
    """
    sample = check_sample(library.choices, sample)
    return copy.deepcopy(library.job.space.freeze(sample))


def reinitialize(module: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every parameter of ``module`` (``reset_parameters`` of each layer) under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for child in module.modules():
            if hasattr(child, "reset_parameters"):
                child.reset_parameters()
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                child.reset_running_stats()
    return module


def prepare_network(library: LoadedLibrary, sample: Mapping[str, Any], settings: FinetuneSettings = FinetuneSettings(),
                    device: str = "cpu") -> nn.Module:
    """``sample`` built from the library (re-initialised with ``init: scratch``), its BatchNorm statistics
    re-estimated on ``settings.calib_batches`` training batches: the network finetuning starts from (on the CPU)."""
    net = build_network(library, sample)
    if settings.init == "scratch":
        reinitialize(net, settings.seed)
    dev = resolve_device(device)
    train_set = library.job.dataset
    batch = settings.batch_size or library.config.data.batch_size
    calib = [images.to(dev) for images, _ in
             make_loader(train_set, calib_batches(train_set, batch, settings.seed, settings.calib_batches))]
    return recalibrate_bn(net.to(dev), calib).cpu()


def network_costs(model: nn.Module, shape_in) -> Dict[str, Any]:
    """``params``, ``flops`` (multiply-accumulates of one sample) and ``latency_ms`` of ``model`` (eval mode)."""
    model.eval()
    return {"params": count_params(model), "flops": forward_macs(model, shape_in),
            "latency_ms": measure_latency_ms(model, shape_in)}


def finetune(library: Union[str, Path, LoadedLibrary], sample: Mapping[str, Any],
             settings: FinetuneSettings = FinetuneSettings(), *, out: Union[str, Path, None] = None,
             save_model: Union[str, Path, None] = None, device: str = "cpu",
             log_dir: Union[str, Path, None] = None) -> Dict[str, Any]:
    """Build ``sample`` from the library, finetune it end to end with the teacher under Lightning, evaluate it on
    the val split.

    Training runs as a :class:`~nni_pipebd.lightning.module.ClassifierModule` under a ``pytorch_lightning.Trainer``
    seeded with ``settings.seed`` (deterministic on the CPU: the same seed gives the same accuracy), with
    ``settings.precision``, ``settings.devices`` and ``settings.strategy`` passed through.

    Parameters
    ----------
    library : str, Path or LoadedLibrary
        The library folder (or the opened library; its weights are not modified).
    sample : mapping
        NNI sample dict: one candidate per label of the space (``{}`` for a fixed student).
    settings : FinetuneSettings
        Training settings.
    out : str or Path, optional
        Write the result there as JSON (atomically).
    save_model : str or Path, optional
        Write the finetuned network's ``state_dict`` there (atomically).
    device : str
        ``cpu``, ``cuda`` or ``auto``.
    log_dir : str or Path, optional
        Folder of the Lightning logs (CSV, and TensorBoard when installed) and the checkpoint of the last epoch, in
        ``finetune_<id>/version_<n>``; default ``library/logs``.

    Returns
    -------
    dict
        ``sample``, ``id``, ``settings``, ``student`` (``params``, ``flops``, ``latency_ms``,
        ``val_accuracy_init`` after BN recalibration, ``val_accuracy``), ``teacher`` (the same figures),
        ``params_ratio`` and ``flops_ratio`` (student / teacher), ``train_losses`` (mean per epoch), ``log_dir``,
        ``time_s``.

    Raises
    ------
    ArchitectureError
        ``sample`` does not match the space.
    FinetuneError
        The loss became non-finite.
    """
    from ..lightning import ClassificationData, ClassifierModule, DivergedError, fit_classifier, validate_classifier

    start = time.perf_counter()
    library = library if isinstance(library, LoadedLibrary) else open_library(library)
    options = settings.trainer_options(device)
    sample = check_sample(library.choices, sample)
    net = prepare_network(library, sample, settings, device)
    job = library.job
    teacher = nn.Sequential(*copy.deepcopy(job.spec.teacher)).eval().requires_grad_(False)
    shape_in = job.spec.shapes[0][0]
    data = ClassificationData(job.dataset, library.val_dataset(), settings.batch_size or library.config.data.batch_size,
                              settings.seed, settings.max_steps_per_epoch, library.config.data.num_workers)
    student_costs = network_costs(net, shape_in)
    teacher_costs = network_costs(teacher, shape_in)
    init_accuracy = validate_classifier(net, data, options, seed=settings.seed)
    module = ClassifierModule(net, teacher=teacher if settings.mode == "kd" else None, kd_weight=settings.kd_weight,
                              temperature=settings.temperature, optimizer=settings.optimizer, lr=settings.lr,
                              weight_decay=settings.weight_decay, schedule="cosine",
                              total_steps=settings.epochs * data.steps_per_epoch)
    arch_id = architecture_id(sample)
    try:
        fitted = fit_classifier(module, data, options, epochs=settings.epochs, seed=settings.seed,
                                log_dir=Path(log_dir) if log_dir is not None else library.directory / LOGS,
                                name=f"finetune_{arch_id}")
    except DivergedError as err:
        raise FinetuneError(f"finetuning {arch_id}: {err}") from err
    accuracy = fitted.val_accuracy if fitted.val_accuracy is not None else init_accuracy
    teacher_accuracy = validate_classifier(teacher, data, options, seed=settings.seed)
    result = {
        "format": FINETUNE_FORMAT,
        "library": str(library.directory),
        "id": arch_id,
        "sample": sample,
        "settings": asdict(settings),
        "student": {**student_costs, "val_accuracy_init": init_accuracy, "val_accuracy": accuracy},
        "teacher": {**teacher_costs, "val_accuracy": teacher_accuracy},
        "params_ratio": student_costs["params"] / max(teacher_costs["params"], 1),
        "flops_ratio": student_costs["flops"] / max(teacher_costs["flops"], 1),
        "train_losses": fitted.train_losses,
        "log_dir": fitted.log_dir,
        "time_s": time.perf_counter() - start,
    }
    if not fitted.is_global_zero:  # another rank of Lightning's ddp: rank 0 logs and writes
        return result
    _logger.info("architecture %s: val accuracy %.4f (%.4f from the library after BN recalibration; teacher %.4f), "
                 "%d params (%.2fx the teacher's)", result["id"], accuracy, init_accuracy, teacher_accuracy,
                 student_costs["params"], result["params_ratio"])
    if save_model is not None:
        atomic_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, save_model)
    if out is not None:
        atomic_save(result, out)
    return result
