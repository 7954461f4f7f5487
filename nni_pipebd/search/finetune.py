"""Build a chosen architecture as a standalone network from the library's blocks and finetune it end to end."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch
from torch import nn

from ..data.datasets import make_loader
from ..library import atomic_save
from ..plan.cost import forward_macs
from .costs import count_params, measure_latency_ms
from .inputs import FinetuneSettings, architecture_id, load_architecture
from .loaded import LoadedLibrary, calib_batches, check_sample, open_library, recalibrate_bn, resolve_device

__all__ = ["FINETUNE_FORMAT", "FinetuneSettings", "FinetuneError", "build_network", "finetune", "load_architecture",
           "architecture_id", "reinitialize", "prepare_network", "network_costs", "LOGS"]

_logger = logging.getLogger(__name__)

FINETUNE_FORMAT = "nni_pipebd.finetune/1"

LOGS = "logs"
"""Folder of a library that holds the Lightning logs and checkpoints of finetuning runs (``logs/finetune_<id>``)."""


class FinetuneError(RuntimeError):
    """Finetuning diverged (non-finite loss)."""


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
