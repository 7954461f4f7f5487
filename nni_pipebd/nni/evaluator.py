"""``BlockwiseDistillation``: the NNI evaluator that trains the block library and finetunes architectures from it."""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import nni
from nni.nas.evaluator import Evaluator

from ..config import Config
from ..executors.checkpoint import CHECKPOINTS
from ..library import MANIFEST, load_manifest
from ..search.finetune import FinetuneSettings, architecture_id, finetune
from .final import FinalEvaluatorError, default_metric, resolve_final_evaluator
from .jobconfig import IF_EXISTS, resolve_config, structure_config

__all__ = ["BlockwiseDistillation", "LibraryMismatchError", "IF_EXISTS", "resolve_config", "structure_config",
           "distillation_metrics", "epoch_metric", "architecture_metrics", "final_metrics", "report_metrics",
           "check_visible_gpus", "EVALUATION_FORMAT"]

EVALUATION_FORMAT = "nni_pipebd.evaluation/1"
"""``format`` of ``evaluation_<id>.json``: an architecture evaluated by the final evaluator."""

_logger = logging.getLogger(__name__)


class LibraryMismatchError(ValueError):
    """``library_dir`` holds a block library trained with another config."""


def _changed(before: Any, after: Any, where: str = "") -> List[str]:
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        keys: List[str] = []
        for key in sorted(set(before) | set(after)):
            keys += _changed(before.get(key), after.get(key), f"{where}{key}.")
        return keys
    return [] if before == after else [f"{where.rstrip('.')} ({before!r} -> {after!r})"]


def distillation_metrics(manifest: Mapping[str, Any]) -> Tuple[List[Dict[str, float]], Dict[str, float]]:
    """NNI metrics of a trained library: per epoch and final, ``default`` = minus the mean block loss.

    Returns
    -------
    intermediates : list of dict
        One per epoch: ``default`` and ``block_{i}`` (that block's mean loss in the epoch).
    final : dict
        ``default`` and ``block_{i}`` of the last epoch, ``train_time_s`` and ``wall_time_s``.
    """
    blocks = manifest["blocks"]
    epochs = max((len(b["losses"]) for b in blocks), default=0)
    intermediates = [epoch_metric({b["index"]: b["losses"][epoch] for b in blocks if len(b["losses"]) > epoch})
                     for epoch in range(epochs)]
    last = {f"block_{b['index']}": float(b["losses"][-1]) for b in blocks if b["losses"]}
    final = {"default": -statistics.fmean(last.values()) if last else 0.0, **last,
             "train_time_s": float(manifest.get("train_time_s", 0.0)),
             "wall_time_s": float(manifest.get("wall_time_s", 0.0))}
    return intermediates, final


def epoch_metric(losses: Mapping[int, float]) -> Dict[str, float]:
    """NNI metric of one distillation epoch: ``default`` = minus the mean block loss, and ``block_{i}``."""
    named = {f"block_{i}": float(loss) for i, loss in sorted(losses.items())}
    return {"default": -statistics.fmean(named.values()), **named}


def architecture_metrics(result: Mapping[str, Any]) -> Tuple[List[Dict[str, float]], Dict[str, float]]:
    """NNI metrics of a finetuned architecture: per epoch ``default`` = minus the train loss; final ``default`` =
    validation accuracy, with the initial accuracy, costs and the teacher's accuracy beside it."""
    intermediates = [{"default": -float(loss), "train_loss": float(loss)} for loss in result["train_losses"]]
    student, teacher = result["student"], result["teacher"]
    final = {"default": float(student["val_accuracy"]), "val_accuracy_init": float(student["val_accuracy_init"]),
             "teacher_val_accuracy": float(teacher["val_accuracy"]), "params": float(student["params"]),
             "flops": float(student["flops"]), "params_ratio": float(result["params_ratio"])}
    if student.get("latency_ms") is not None:
        final["latency_ms"] = float(student["latency_ms"])
    return intermediates, final


def final_metrics(result: Mapping[str, Any]) -> Tuple[List[Any], Dict[str, Any]]:
    """NNI metrics of an architecture evaluated by a final evaluator: its intermediate reports as they were; final
    ``default`` = its final metric (its other numbers kept), with the architecture's costs beside it."""
    reported = result["metric"]
    final: Dict[str, Any] = dict(reported) if isinstance(reported, Mapping) else {}
    final["default"] = default_metric(reported)
    student = result["student"]
    final.update(params=float(student["params"]), flops=float(student["flops"]))
    if student.get("latency_ms") is not None:
        final["latency_ms"] = float(student["latency_ms"])
    return list(result["intermediates"]), final


def report_metrics(intermediates: List[Dict[str, float]], final: Dict[str, float]) -> bool:
    """Report through NNI's trial API when running as an NNI trial (or sequential model); returns whether it did."""
    if nni.get_current_parameter() is None:
        return False
    for metric in intermediates:
        nni.report_intermediate_result(metric)
    nni.report_final_result(final)
    return True


def check_visible_gpus(config: Config) -> None:
    """Fail early, naming ``trialGpuNumber``, when the workers need more GPUs than this process sees."""
    import torch

    device = config.execution.device
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device == "cpu" or "WORLD_SIZE" in os.environ:
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda" and count == 0:
        raise RuntimeError(f"execution.device = 'cuda' but this process sees no GPU (CUDA_VISIBLE_DEVICES="
                           f"{visible!r}); under nnictl set trialGpuNumber (and localConfig.useActiveGpu on a machine "
                           "with a display), or use device: auto/cpu")
    workers = config.execution.workers
    if count and workers > count:
        raise RuntimeError(f"execution.workers = {workers} needs {workers} GPUs but this process sees {count} "
                           f"(CUDA_VISIBLE_DEVICES={visible!r}); under nnictl set trialGpuNumber: {workers}, or lower "
                           "execution.workers")
    if count:
        _logger.info("distilling with %d workers on GPUs %s", workers, visible or list(range(count)))


@nni.trace
class BlockwiseDistillation(Evaluator):
    """NNI evaluator of blockwise-distillation NAS: it holds the job (teacher, data, loss, epochs, executor and
    workers or plan) and the block library folder.

    Models it evaluates (see :mod:`nni_pipebd.nni.models`): a :class:`~nni_pipebd.nni.models.DistillationTask`
    trains the block library with the configured executor (``train`` spawns its own workers) and reports the
    per-epoch block losses as intermediate results and minus the mean final block loss as the final one; an
    :class:`~nni_pipebd.nni.models.ArchitectureModel` (or any frozen NNI model with a ``sample``, or a sample dict)
    is built from the library, finetuned end to end and reports its validation accuracy (NNI maximises) — or, with
    a ``final_evaluator``, the search's candidates are evaluated by it and report its metric.

    The arguments are stored as plain data (a ``Config`` becomes its dict), so the evaluator serialises as JSON and
    runs the same in an NNI trial process.

    Parameters
    ----------
    config : str, dict or Config
        The job: a YAML path, plain data (as in the YAML) or a ``Config``.
    library_dir : str
        Folder of the block library (shared storage when trials run on other machines).
    base_dir : str, optional
        For a dict config: the folder its relative paths resolve against (default: the working directory).
    overrides : dict, optional
        Changes merged into the config's sections, e.g. ``{"execution": {"executor": "pipebd", "workers": 4}}``.
    finetune : dict, optional
        :class:`~nni_pipebd.search.finetune.FinetuneSettings` fields for evaluating architectures.
    if_exists : str
        ``library_dir`` already holds a finished library: ``reuse`` it when its config equals this one (a different
        config is an error), ``overwrite`` it, or raise (``error``).
    device : str
        Finetuning device: ``auto``, ``cpu`` or ``cuda``.
    teacher : torch.nn.Module, optional
        Your teacher instance, in place of the config's: it is saved whole into ``library_dir``
        (``teacher-<hash>.pt``) and the config names that file, so trials and workers load it from there (its class
        must be importable; its weights travel in the file).
    student : nni.nas.nn.pytorch.ModelSpace, optional
        Your student space, in place of the config's: a ``ModelSpace`` whose ``blocks`` are the block spaces (see
        :meth:`bind_student`). The strategies bind the space given to ``NasExperiment`` themselves.
    final_evaluator : nni.nas.evaluator.Evaluator or str, optional
        Evaluates the candidate architectures in place of the built-in finetuning: any NNI 3.0 evaluator (e.g.
        ``nni.nas.evaluator.pytorch.Classification`` or ``Lightning``), or the import path of a function returning
        one (``package.module:function``, found beside the config too). It gets the network built from the library
        (BatchNorm re-estimated as for finetuning) and its ``nni.report_final_result`` is the architecture's
        metric. DONNA's predictor architectures are still finetuned (the predictor learns finetuned accuracy).
    """

    def __init__(self, config: Union[str, Mapping[str, Any], Config], library_dir: str, *,
                 base_dir: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
                 finetune: Optional[Mapping[str, Any]] = None, if_exists: str = "reuse", device: str = "auto",
                 teacher: Any = None, student: Any = None, final_evaluator: Any = None):
        self.config = resolve_config(config, base_dir, overrides)
        if if_exists not in IF_EXISTS:
            raise ValueError(f"if_exists = {if_exists!r} is not valid; choose one of {list(IF_EXISTS)}")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device = {device!r} is not valid; choose one of ['auto', 'cpu', 'cuda']")
        if not isinstance(library_dir, (str, os.PathLike)):
            raise TypeError(f"library_dir must be a folder path; got {library_dir!r}")
        self.finetune_settings = FinetuneSettings(**dict(finetune or {}))
        self.library_dir = Path(library_dir).expanduser().resolve()
        if teacher is not None:
            import torch

            from ..spec.teachers import save_teacher_module

            if not isinstance(teacher, torch.nn.Module):
                raise TypeError(f"teacher must be a torch.nn.Module; got {type(teacher).__name__}")
            self.config = self.config.with_teacher(save_teacher_module(teacher, self.library_dir))
        self.if_exists = if_exists
        self.device = device
        self.final_evaluator = final_evaluator
        self._final: Any = None
        if final_evaluator is not None and not isinstance(final_evaluator, str):
            self._final = resolve_final_evaluator(final_evaluator)
        self._choices: Optional[Dict[str, List[str]]] = None
        self._opened: Optional[Tuple[int, Any]] = None
        plain: Dict[str, Any] = {"library_dir": str(self.library_dir)}
        if isinstance(config, Config):
            plain.update(config=config.to_dict(), base_dir=str(Path(config.base_dir).resolve()))
        elif isinstance(config, (str, os.PathLike)):
            plain["config"] = str(Path(config).expanduser().resolve())
        else:
            plain["base_dir"] = str(Path(base_dir or os.getcwd()).expanduser().resolve())
        if teacher is not None:  # the resolved config names the saved teacher now
            plain.update(config=self.config.to_dict(), base_dir=str(Path(self.config.base_dir).resolve()),
                         overrides=None, teacher=None)
        if hasattr(self, "trace_kwargs"):  # nni.trace recorded the arguments: keep them as plain data
            self.trace_kwargs.update(plain)
        if student is not None:
            self.bind_student(student)

    def bind_student(self, space: Any) -> None:
        """Distil ``space`` (a ``ModelSpace`` whose ``blocks`` are the block spaces, one per teacher block or one
        fewer for a fresh copy of the teacher's head) instead of the config's student.

        The space is saved into ``library_dir`` (``student-<hash>.pt``, its classes must be importable) and the config
        names it (``model.student.module``), so trials and workers load the very same space.
        """
        from ..library import save_object_file

        self.config = self.config.with_student(save_object_file(space, self.library_dir, "student"))
        self._choices = None
        if hasattr(self, "trace_kwargs"):
            self.trace_kwargs.update(config=self.config.to_dict(), base_dir=str(Path(self.config.base_dir).resolve()),
                                     overrides=None, teacher=None, student=None)

    def bind_final_evaluator(self, evaluator: Any) -> None:
        """Evaluate the candidate architectures with ``evaluator`` (see ``final_evaluator``); ``None``: finetune."""
        self._final = None if evaluator is None or isinstance(evaluator, str) else resolve_final_evaluator(evaluator)
        self.final_evaluator = evaluator
        if hasattr(self, "trace_kwargs"):
            self.trace_kwargs.update(final_evaluator=evaluator)

    def resolved_final_evaluator(self) -> Any:
        """The final evaluator (imported on first use when given as an import path), or ``None``."""
        if self._final is None and self.final_evaluator is not None:
            self._final = resolve_final_evaluator(self.final_evaluator, self.config.base_dir)
        return self._final

    def extra_repr(self) -> str:
        execution = self.config.execution
        teacher = self.config.model.teacher
        return (f"teacher={teacher.class_path or teacher.module or teacher.arch or 'mobilenet_v2'!r}, executor={execution.executor!r}, "
                f"workers={execution.workers}, library_dir={str(self.library_dir)!r}")

    # --- the space -------------------------------------------------------------------------------------------------

    def student_space(self):
        """A fresh :class:`~nni_pipebd.spaces.dna.StudentSpace` of this job for ``NasExperiment``: plain NNI block
        spaces (random weights), not the supernets the library trains, so NNI runs it on any engine."""
        from ..job import build_student_space

        return build_student_space(structure_config(self.config))

    def space_choices(self) -> Dict[str, List[str]]:
        """Label -> candidate values of the library's space (derived from the config; no weights or data needed)."""
        if self._choices is None:
            from .space import space_choices

            self._choices = space_choices(self.student_space())
        return dict(self._choices)

    # --- the two kinds of work -------------------------------------------------------------------------------------

    def distill(self) -> Dict[str, Any]:
        """Train the block library (or reuse it, see ``if_exists``), report its metrics to NNI; returns the manifest.

        Raises
        ------
        LibraryMismatchError
            ``if_exists='reuse'`` and the library in ``library_dir`` was trained with another config.
        FileExistsError
            ``if_exists='error'`` and ``library_dir`` holds a library.
        """
        from ..executors.launch import train

        check_visible_gpus(self.config)
        directory = self.library_dir
        if (directory / MANIFEST).is_file():
            if self.if_exists == "error":
                raise FileExistsError(f"{directory} already holds a block library; pass if_exists='reuse' or "
                                      "'overwrite', or choose another library_dir")
            if self.if_exists == "reuse":
                manifest = load_manifest(directory)
                changed = _changed(manifest["config"], self.config.to_dict())
                if changed:
                    raise LibraryMismatchError(
                        f"{directory} holds a block library trained with another config: {', '.join(changed)}; pass "
                        "if_exists='overwrite' to replace it, or choose another library_dir")
                _logger.info("reusing the block library in %s (same config)", directory)
                self._report_distillation(manifest)
                return manifest
        overwrite = self.if_exists == "overwrite"
        resume = not overwrite and (directory / CHECKPOINTS / "config.json").is_file()
        _logger.info("blockwise distillation: %s executor, %d workers -> %s%s", self.config.execution.executor,
                     self.config.execution.workers, directory, " (resuming)" if resume else "")
        live: List[int] = []

        def on_epoch(epoch: int, losses: Dict[int, float]) -> None:  # while training runs
            if nni.get_current_parameter() is not None:
                nni.report_intermediate_result(epoch_metric(losses))
            live.append(epoch)

        manifest = train(self.config, directory, overwrite=overwrite, resume=resume, on_epoch=on_epoch)
        self._report_distillation(manifest, reported=len(live))
        return manifest

    def _report_distillation(self, manifest: Mapping[str, Any], reported: int = 0) -> None:
        """Report the epochs not reported live yet (all of a reused library) and the final result."""
        intermediates, final = distillation_metrics(manifest)
        report_metrics(intermediates[reported:], final)
        _logger.info("block library %s: final block losses %s", self.library_dir,
                     {k: round(v, 6) for k, v in final.items() if k.startswith("block_")})

    def evaluate_architecture(self, sample: Mapping[str, Any], role: str = "candidate") -> Dict[str, Any]:
        """Build ``sample`` from the library, finetune it (``finetune`` settings), report to NNI; returns the result
        of :func:`~nni_pipebd.search.finetune.finetune` (also written to ``library_dir/finetune_{id}.json``).

        A ``candidate`` with a ``final_evaluator`` is evaluated by it instead (:meth:`evaluate_final`); a
        ``predictor`` architecture (DONNA) is always finetuned.

        Raises
        ------
        nni_pipebd.library.LibraryError
            The library is not trained yet.
        nni_pipebd.search.errors.ArchitectureError
            ``sample`` does not match the library's space.
        """
        sample = dict(sample)
        if role == "candidate" and self.final_evaluator is not None:
            return self.evaluate_final(sample)
        out = self.library_dir / f"finetune_{architecture_id(sample)}.json"
        result = finetune(self._library(), sample, self.finetune_settings, out=out, device=self.device)
        report_metrics(*architecture_metrics(result))
        return result

    def evaluate_final(self, sample: Mapping[str, Any]) -> Dict[str, Any]:
        """Build ``sample`` from the library (BatchNorm re-estimated on ``finetune.calib_batches`` training batches),
        evaluate it with the final evaluator (a fresh copy of it for every architecture), report to NNI.

        Returns
        -------
        dict
            ``format``, ``id``, ``sample``, ``evaluator`` (its repr), ``metric`` (its final report),
            ``intermediates`` (its intermediate reports), ``student`` (``params``, ``flops``, ``latency_ms``) and
            ``time_s``; also written to ``library_dir/evaluation_{id}.json``.

        Raises
        ------
        FinalEvaluatorError
            No final evaluator is set, or it reported no usable final metric.
        """
        from ..library import atomic_save
        from ..search.finetune import network_costs, prepare_network
        from ..search.loaded import check_sample
        from .final import run_final_evaluator

        start = time.perf_counter()
        evaluator = self.resolved_final_evaluator()
        if evaluator is None:
            raise FinalEvaluatorError("this BlockwiseDistillation has no final_evaluator; pass final_evaluator= (or "
                                      "use evaluate_architecture to finetune)")
        library = self._library()
        sample = check_sample(library.choices, sample)
        network = prepare_network(library, sample, self.finetune_settings, self.device)
        costs = network_costs(network, library.job.spec.shapes[0][0])
        reported = run_final_evaluator(evaluator, network.train(), sample)  # train mode, as a fresh network
        result = {"format": EVALUATION_FORMAT, "library": str(self.library_dir), "id": architecture_id(sample),
                  "sample": sample, "evaluator": repr(evaluator), "metric": reported["final"],
                  "intermediates": reported["intermediates"], "student": costs, "time_s": time.perf_counter() - start}
        _, final = final_metrics(result)
        _logger.info("architecture %s: final evaluator %s reported %s (%d params)", result["id"],
                     type(evaluator).__name__, reported["final"], costs["params"])
        atomic_save(result, self.library_dir / f"evaluation_{result['id']}.json")
        if nni.get_current_parameter() is not None:  # its intermediate reports went to NNI as they came
            nni.report_final_result(final)
        return result

    def _library(self) -> Any:
        """The opened library, kept while ``library.json`` is unchanged (models evaluated in one process share it)."""
        from ..search.loaded import open_library

        manifest = self.library_dir / MANIFEST
        stamp = manifest.stat().st_mtime_ns if manifest.is_file() else -1
        if self._opened is None or self._opened[0] != stamp or stamp < 0:
            self._opened = (stamp, open_library(self.library_dir))
        return self._opened[1]

    def evaluate(self, model: Any) -> Any:
        """Run the work ``model`` stands for.

        Parameters
        ----------
        model : DistillationTask, ArchitectureModel, frozen NNI model or dict
            A :class:`~nni_pipebd.nni.models.DistillationTask` distils (returns the manifest); anything with an
            architecture (an NNI model whose ``sample`` is set, or a sample dict) is finetuned (returns the result).
        """
        from .models import DistillationTask

        if isinstance(model, DistillationTask):
            return self.distill()
        sample = model if isinstance(model, Mapping) else getattr(model, "sample", None)
        if isinstance(sample, Mapping):
            return self.evaluate_architecture(sample, getattr(model, "role", "candidate"))
        raise TypeError(f"BlockwiseDistillation cannot evaluate {type(model).__name__}: give a DistillationTask, "
                        "a frozen NNI model with a sample, or a sample dict {label: candidate}")

    def _execute(self, model: Any) -> Any:
        """NNI's hook: evaluate without instantiating the network (the library holds the weights)."""
        return self.evaluate(model)

    def settings(self) -> Dict[str, Any]:
        """The evaluator's arguments as plain data (what trials receive; a final evaluator object travels as NNI
        serialises traced objects, ``nni.dump``)."""
        return {"library_dir": str(self.library_dir), "if_exists": self.if_exists, "device": self.device,
                "finetune": asdict(self.finetune_settings), "config": self.config.to_dict(),
                "base_dir": str(self.config.base_dir), "final_evaluator": self.final_evaluator}
