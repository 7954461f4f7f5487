"""Build a chosen architecture as a standalone network from the library's blocks and finetune it end to end."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.datasets import make_loader
from ..data.order import BatchOrder
from ..library import atomic_save
from ..plan.cost import forward_macs
from .costs import count_params, measure_latency_ms
from .errors import SearchError
from .loaded import LoadedLibrary, calib_batches, check_sample, open_library, recalibrate_bn, resolve_device, val_batches

__all__ = ["FINETUNE_FORMAT", "FinetuneSettings", "FinetuneError", "build_network", "finetune", "evaluate_accuracy",
           "load_architecture", "architecture_id", "reinitialize"]

_logger = logging.getLogger(__name__)

FINETUNE_FORMAT = "nni_pipebd.finetune/1"
_MODES = ("kd", "labels")
_INITS = ("library", "scratch")
_OPTIMIZERS = ("adam", "sgd")


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
        Data order (and the initialisation with ``init: scratch``).
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


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: Dataset, batch_size: int,
                      device: torch.device = torch.device("cpu")) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on the whole of ``dataset``."""
    model.eval()
    correct = total = 0
    for images, labels in make_loader(dataset, val_batches(dataset, batch_size, None)):
        correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


def finetune(library: Union[str, Path, LoadedLibrary], sample: Mapping[str, Any],
             settings: FinetuneSettings = FinetuneSettings(), *, out: Union[str, Path, None] = None,
             save_model: Union[str, Path, None] = None, device: str = "cpu") -> Dict[str, Any]:
    """Build ``sample`` from the library, finetune it end to end with the teacher, evaluate it on the val split.

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

    Returns
    -------
    dict
        ``sample``, ``id``, ``settings``, ``student`` (``params``, ``flops``, ``latency_ms``,
        ``val_accuracy_init`` after BN recalibration, ``val_accuracy``), ``teacher`` (the same figures),
        ``params_ratio`` and ``flops_ratio`` (student / teacher), ``train_losses`` (mean per epoch), ``time_s``.

    Raises
    ------
    ArchitectureError
        ``sample`` does not match the space.
    FinetuneError
        The loss became non-finite.
    """
    start = time.perf_counter()
    library = library if isinstance(library, LoadedLibrary) else open_library(library)
    dev = resolve_device(device)
    sample = check_sample(library.choices, sample)
    net = build_network(library, sample)
    if settings.init == "scratch":
        reinitialize(net, settings.seed)
    job = library.job
    teacher = nn.Sequential(*copy.deepcopy(job.spec.teacher)).eval().requires_grad_(False)
    shape_in = job.spec.shapes[0][0]
    batch = settings.batch_size or library.config.data.batch_size
    train_set, val_set = job.dataset, library.val_dataset()
    student_costs = _costs(net, shape_in)
    teacher_costs = _costs(teacher, shape_in)
    net.to(dev)
    teacher.to(dev)
    calib = [images.to(dev) for images, _ in
             make_loader(train_set, calib_batches(train_set, batch, settings.seed, settings.calib_batches))]
    recalibrate_bn(net, calib)
    init_accuracy = evaluate_accuracy(net, val_set, batch, dev)
    losses = _train(net, teacher, train_set, batch, settings, dev)
    accuracy = evaluate_accuracy(net, val_set, batch, dev) if settings.epochs else init_accuracy
    teacher_accuracy = evaluate_accuracy(teacher, val_set, batch, dev)
    result = {
        "format": FINETUNE_FORMAT,
        "library": str(library.directory),
        "id": architecture_id(sample),
        "sample": sample,
        "settings": asdict(settings),
        "student": {**student_costs, "val_accuracy_init": init_accuracy, "val_accuracy": accuracy},
        "teacher": {**teacher_costs, "val_accuracy": teacher_accuracy},
        "params_ratio": student_costs["params"] / max(teacher_costs["params"], 1),
        "flops_ratio": student_costs["flops"] / max(teacher_costs["flops"], 1),
        "train_losses": losses,
        "time_s": time.perf_counter() - start,
    }
    _logger.info("architecture %s: val accuracy %.4f (%.4f from the library after BN recalibration; teacher %.4f), "
                 "%d params (%.2fx the teacher's)", result["id"], accuracy, init_accuracy, teacher_accuracy,
                 student_costs["params"], result["params_ratio"])
    if save_model is not None:
        atomic_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, save_model)
    if out is not None:
        atomic_save(result, out)
    return result


def _costs(model: nn.Module, shape_in) -> Dict[str, Any]:
    model.eval()
    return {"params": count_params(model), "flops": forward_macs(model, shape_in),
            "latency_ms": measure_latency_ms(model, shape_in)}


def _train(net: nn.Module, teacher: nn.Module, dataset: Dataset, batch: int, settings: FinetuneSettings,
           device: torch.device) -> List[float]:
    order = BatchOrder(len(dataset), min(batch, len(dataset)), settings.seed, settings.max_steps_per_epoch)
    total_steps = max(1, settings.epochs * order.steps_per_epoch)
    params = [p for p in net.parameters() if p.requires_grad]
    if settings.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=0.9, nesterov=True,
                                    weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    t = settings.temperature
    losses = []
    for epoch in range(settings.epochs):
        net.train()
        epoch_loss, steps = 0.0, 0
        for images, labels in make_loader(dataset, order.batches(epoch)):
            images, labels = images.to(device), labels.to(device)
            logits = net(images)
            loss = F.cross_entropy(logits, labels)
            if settings.mode == "kd":
                with torch.no_grad():
                    target = F.softmax(teacher(images) / t, dim=1)
                kd = F.kl_div(F.log_softmax(logits / t, dim=1), target, reduction="batchmean") * t * t
                loss = settings.kd_weight * kd + (1 - settings.kd_weight) * loss
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FinetuneError(f"finetuning loss is {value} at epoch {epoch}, step {steps}; "
                                    f"lower the learning rate (lr = {settings.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_loss += value
            steps += 1
        losses.append(epoch_loss / max(steps, 1))
    return losses
