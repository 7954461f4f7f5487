"""The main job out of the box: teacher, Pipe-BD block library, its speed against DNA's dp, search, finetune, report."""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

from .config import Config, load_config
from .library import atomic_save

if TYPE_CHECKING:
    from .search.inputs import FinetuneSettings, RankingSettings

__all__ = ["DEFAULT_CONFIG", "run_demo", "format_summary"]

_logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "digits" / "config.yaml"

SPEED_EPOCHS = 1
"""Epochs of the side-by-side speed runs (Pipe-BD and dp do the same fixed work: ``until: epochs``)."""


def run_demo(config_path: Union[str, Path, None] = None, out: Union[str, Path] = "runs/demo", *, workers: int = 2,
             budget_ratio: float = 0.6, finetune_epochs: int = 8, calib_batches: int = 16,
             threads: Optional[int] = None, progress: bool = True, overwrite: bool = True) -> Dict[str, Any]:
    """Run the whole flow on the digits example and return (and write ``summary.json``) its figures.

    1. the teacher (trained on digits and cached at its checkpoint path when absent);
    2. the block library trained by Pipe-BD (teacher relaying + decoupled updates) on ``workers`` local workers,
       with a timeline and per-step logs, under the config's ``distill`` settings (e.g. ``until: plateau``);
    3. the speed of Pipe-BD against DNA's dp baseline on the same short fixed run (``SPEED_EPOCHS`` epoch,
       ``until: epochs``, same workers), one after the other;
    4. DNA ranking of every block's paths (BN recalibrated on ``calib_batches`` training batches);
    5. the exact constrained search under a parameter budget of ``budget_ratio`` x the teacher's parameters
       (raised to the smallest network of the space if that is larger);
    6. the best architecture built from the library's blocks (its accuracy before any training is the library's
       quality), then finetuned with the teacher for ``finetune_epochs`` epochs;
    7. a Markdown report with plots.

    Parameters
    ----------
    config_path : str or Path, optional
        The job file; default ``examples/digits/config.yaml``.
    out : str or Path
        Output folder: ``library/`` (blocks, trace, logs, scores, search, finetune), ``speed/`` (the two short
        runs), ``report/`` and ``summary.json``.
    workers : int
        Local worker processes of the Pipe-BD library and of both speed runs.
    budget_ratio : float
        Parameter budget of the search relative to the teacher.
    finetune_epochs : int
        End-to-end finetuning epochs of the searched network (0: evaluate it straight from the library).
    calib_batches : int
        Training batches re-estimating BatchNorm statistics, in ranking and before the first evaluation.
    threads : int, optional
        Torch threads of this process (teacher training, ranking, finetuning); default the config's
        ``execution.threads_per_worker``, else 1. More threads than free cores make every step many times slower
        (measured 0.15 s -> 11 s per teacher step with 2 threads on 2 busy cores); restored afterwards.
    progress : bool
        Draw progress bars while training.
    overwrite : bool
        Replace libraries already in ``out``.

    Returns
    -------
    dict
        What ``summary.json`` holds: ``teacher``, ``library``, ``architecture``, ``budget``, ``student``, ``speed``,
        ``times_s``, ``time_s`` and where the outputs are.
    """
    from .search.inputs import FinetuneSettings, RankingSettings

    if not 0 < budget_ratio:
        raise ValueError(f"budget_ratio = {budget_ratio!r} must be > 0 (the search budget is budget_ratio x the "
                         "teacher's parameters), e.g. 0.6")
    ranking = RankingSettings(calib_batches=calib_batches)
    settings = FinetuneSettings(epochs=finetune_epochs, calib_batches=calib_batches)
    config_path = Path(config_path) if config_path is not None else DEFAULT_CONFIG
    config = load_config(config_path)
    config.replace(execution={"executor": "pipebd", "workers": workers})  # workers checked before torch loads
    from .executors.forkserver import start_server

    start_server()  # the workers' fork server imports torch and NNI beside this process's own imports
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or config.execution.threads_per_worker or 1)
    try:
        return _run(config, Path(out), workers, budget_ratio, ranking, settings, progress, overwrite)
    finally:
        torch.set_num_threads(before)


def _run(config: Config, out: Path, workers: int, budget_ratio: float, ranking: "RankingSettings",
         settings: "FinetuneSettings", progress: bool, overwrite: bool) -> Dict[str, Any]:
    from .executors.launch import train
    from .job import build_job
    from .report.report import write_report
    from .search import finetune, rank_library, search_library
    from .spec.pretrain import prepare_teacher

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    times: Dict[str, float] = {}
    library, speed_dir = out / "library", out / "speed"

    _logger.info("[1/7] teacher")
    tic = time.perf_counter()
    checkpoint = config.resolve_path(config.model.teacher.checkpoint)
    cached = checkpoint is not None and checkpoint.is_file()
    prepare_teacher(config, out / "logs")  # the run's folder, never beside a checkpoint in the source tree
    times["teacher"] = time.perf_counter() - tic

    _logger.info("[2/7] block library by Pipe-BD on %d workers -> %s", workers, library)
    tic = time.perf_counter()
    pipe = train(config.replace(execution={"executor": "pipebd", "workers": workers}), library,
                 overwrite=overwrite, trace=library / "trace.json", progress=progress)
    times["library"] = time.perf_counter() - tic

    _logger.info("[3/7] speed: Pipe-BD and DNA's dp on the same %d-epoch run, %d workers -> %s", SPEED_EPOCHS,
                 workers, speed_dir)
    tic = time.perf_counter()
    speed = _speed_runs(config, speed_dir, workers, overwrite, progress)
    times["speed"] = time.perf_counter() - tic

    _logger.info("[4/7] DNA ranking of every block's paths")
    tic = time.perf_counter()
    scores = rank_library(library, ranking)
    times["ranking"] = time.perf_counter() - tic

    tic = time.perf_counter()
    smallest = sum(min(p["params"] for p in b["paths"]) for b in scores["blocks"])
    teacher_params = sum(p.numel() for block in build_job(config).spec.teacher for p in block.parameters())
    budget = f"params={int(max(budget_ratio * teacher_params, 1.05 * smallest))}"
    _logger.info("[5/7] constrained search under %s (%.2fx the teacher's parameters)", budget, budget_ratio)
    search = search_library(library, "dna", budget, top_k=3, ranking=ranking, out=library / "search.json")
    best = search["architectures"][0]
    times["search"] = time.perf_counter() - tic

    _logger.info("[6/7] the best architecture from the library's blocks, then finetuned (%d epochs)", settings.epochs)
    tic = time.perf_counter()
    result = finetune(library, best["sample"], settings, out=library / "finetune.json")
    times["finetune"] = time.perf_counter() - tic

    summary = _summary(config, cached, pipe, speed, budget, budget_ratio, best, result, settings.epochs,
                       ranking.calib_batches)
    summary.update({"out": str(out), "library_dir": str(library), "logs": str(library / "logs")})
    _logger.info("[7/7] report")
    tic = time.perf_counter()
    summary["report"] = str(write_report(library, out / "report", extra=_summary_lines(summary)))
    times["report"] = time.perf_counter() - tic
    summary["times_s"] = times
    summary["time_s"] = time.perf_counter() - start
    summary["cpu_s"] = _cpu_seconds() - cpu_start
    atomic_save(summary, out / "summary.json")
    return summary


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the workers): the demo's cost on a
    machine shared with other work, where wall time is inflated."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _speed_runs(config: Config, folder: Path, workers: int, overwrite: bool, progress: bool) -> Dict[str, Any]:
    """Pipe-BD and dp on the same short fixed run: ``SPEED_EPOCHS`` epochs, every block trained to the end."""
    from .executors.launch import train

    short = config.replace(distill={"epochs": SPEED_EPOCHS, "until": "epochs"})
    runs = {}
    for name, execution in (("pipebd", {"executor": "pipebd", "workers": workers}),
                            ("dp", {"executor": "dp", "workers": workers, "sync_bn": False})):
        runs[name] = train(short.replace(execution=execution), folder / name, overwrite=overwrite, progress=progress)
    pipe, dp = runs["pipebd"], runs["dp"]
    epochs = f"{SPEED_EPOCHS} epoch" + ("s" if SPEED_EPOCHS != 1 else "")
    return {"work": f"{epochs} per block, until: epochs, {pipe['counters']['samples_per_block']} samples per block",
            "workers": workers, "pipebd_train_s": pipe["train_time_s"], "dp_train_s": dp["train_time_s"],
            "speedup_vs_dp": dp["train_time_s"] / pipe["train_time_s"],
            "teacher_block_forwards_per_sample": {"pipebd": pipe["counters"]["teacher_block_forwards_per_sample"],
                                                  "dp": dp["counters"]["teacher_block_forwards_per_sample"]}}


def _summary(config: Config, cached: bool, pipe: Dict[str, Any], speed: Dict[str, Any], budget: str,
             budget_ratio: float, best: Dict[str, Any], result: Dict[str, Any], finetune_epochs: int,
             calib_batches: int) -> Dict[str, Any]:
    teacher, student = result["teacher"], result["student"]
    t = config.model.teacher
    stops = [{"block": b["index"], "epochs": b["stopped"]["epoch"], "reason": b["stopped"]["reason"]}
             for b in pipe["blocks"]]
    return {
        "teacher": {"model": t.class_path or t.arch or "mobilenet_v2", "accuracy": teacher["val_accuracy"],
                    "params": teacher["params"], "flops": teacher["flops"],
                    "checkpoint": "cached checkpoint" if cached else f"trained in this run, {t.train_epochs} epochs"},
        "library": {"executor": "pipebd", "workers": pipe["workers"], "train_s": pipe["train_time_s"],
                    "until": config.distill.until, "epochs_cap": config.distill.epochs, "stops": stops},
        "architecture": best["sample"],
        "budget": budget,
        "budget_ratio": budget_ratio,
        "student": {"accuracy_from_library": student["val_accuracy_init"],
                    "fraction_of_teacher_from_library": student["val_accuracy_init"] / max(teacher["val_accuracy"],
                                                                                            1e-12),
                    "calib_batches": calib_batches,
                    "accuracy": student["val_accuracy"], "finetune_epochs": finetune_epochs,
                    "accuracy_gap_points": 100.0 * (teacher["val_accuracy"] - student["val_accuracy"]),
                    "params": student["params"], "params_ratio": result["params_ratio"],
                    "flops": student["flops"], "flops_ratio": result["flops_ratio"]},
        "speed": speed,
    }


def _summary_lines(summary: Dict[str, Any]) -> List[str]:
    t, lib, s, speed = summary["teacher"], summary["library"], summary["student"], summary["speed"]
    arch = ", ".join(f"{k}={v}" for k, v in summary["architecture"].items())
    stops = ", ".join(f"{x['block']}:{x['epochs']}{'p' if x['reason'] == 'plateau' else ''}" for x in lib["stops"])
    return ["## Summary", "",
            f"- teacher {t['model']}: val accuracy {t['accuracy']:.4f}, {t['params']:,} parameters, "
            f"{t['flops'] / 1e6:.2f} M MACs ({t['checkpoint']})",
            f"- block library by Pipe-BD on {lib['workers']} workers in {lib['train_s']:.1f} s, until: {lib['until']} "
            f"(cap {lib['epochs_cap']} epochs); epochs per block {stops} (p: stopped at a plateau)",
            f"- searched architecture ({summary['budget']} = {summary['budget_ratio']:g}x the teacher's): {arch}",
            f"- straight from the block library (BN recalibrated on {s['calib_batches']} batches): val accuracy "
            f"{s['accuracy_from_library']:.4f} = **{s['fraction_of_teacher_from_library']:.2f}x the teacher's**",
            f"- after finetuning {s['finetune_epochs']} epochs: val accuracy {s['accuracy']:.4f} "
            f"(**{-s['accuracy_gap_points']:+.1f} points** vs the teacher) with {s['params']:,} parameters = "
            f"**{s['params_ratio']:.2f}x the teacher's** ({s['flops_ratio']:.2f}x its MACs)",
            f"- Pipe-BD vs DNA's dp on {speed['workers']} workers, same work ({speed['work']}), run one after the "
            f"other: {speed['pipebd_train_s']:.1f} s vs {speed['dp_train_s']:.1f} s = **{speed['speedup_vs_dp']:.2f}x**; "
            f"teacher block forwards per sample {speed['teacher_block_forwards_per_sample']['pipebd']:g} vs "
            f"{speed['teacher_block_forwards_per_sample']['dp']:g}", ""]


def format_summary(summary: Dict[str, Any]) -> str:
    """The summary as the demo prints it, ending with where to look."""
    from .report.summary import where_to_look

    library = Path(summary["out"]) / "library"
    return "\n".join([*(line for line in _summary_lines(summary) if line),
                      *where_to_look(library, library / "trace.json", report=summary["report"]),
                      f"{'logs:':<14} {summary['logs']}  (per-step block losses, CSV)",
                      f"{'all outputs:':<14} {summary['out']}  (summary.json; {summary['time_s']:.0f} s, "
                      f"{summary['cpu_s']:.0f} CPU s)"])
