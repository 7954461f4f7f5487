"""The main job out of the box: teacher, Pipe-BD block library, its speed against DNA's dp, search, finetune, report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .config import load_config
from .executors.launch import train
from .job import build_job
from .library import atomic_save

__all__ = ["run_demo"]

_logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "digits" / "config.yaml"


def run_demo(config_path: Union[str, Path, None] = None, out: Union[str, Path] = "runs/demo", *, workers: int = 2,
             budget_ratio: float = 0.6, finetune_epochs: int = 8, progress: bool = True,
             overwrite: bool = True) -> Dict[str, Any]:
    """Run the whole flow on the digits example and return (and write ``summary.json``) its figures.

    1. the teacher (trained on digits and cached when its checkpoint is absent);
    2. the block library trained by Pipe-BD (teacher relaying + decoupled updates) on ``workers`` local
       workers, with a timeline;
    3. the same work by DNA's dp baseline on as many workers, for the measured speedup;
    4. DNA ranking and the exact constrained search under a parameter budget of ``budget_ratio`` x the
       teacher's parameters (raised to the smallest network of the space if that is larger);
    5. the best architecture built from the library, finetuned with the teacher, evaluated;
    6. a Markdown report with plots.
    """
    from .search import FinetuneSettings, finetune, rank_library, search_library
    from .report.report import write_report

    start = time.perf_counter()
    config_path = Path(config_path) if config_path is not None else DEFAULT_CONFIG
    out = Path(out)
    config = load_config(config_path)
    library, baseline = out / "library", out / "dp-baseline"
    _logger.info("[1-2/6] block library by Pipe-BD on %d workers -> %s", workers, library)
    pipe = train(config.replace(execution={"executor": "pipebd", "workers": workers}), library,
                 overwrite=overwrite, trace=library / "trace.json", progress=progress)
    _logger.info("[3/6] the same work by DNA's dp baseline on %d workers -> %s", workers, baseline)
    dp = train(config.replace(execution={"executor": "dp", "workers": workers, "sync_bn": False}), baseline,
               overwrite=overwrite, progress=progress)
    speedup = dp["train_time_s"] / pipe["train_time_s"]
    _logger.info("[4/6] DNA ranking and constrained search")
    scores = rank_library(library)
    smallest = sum(min(p["params"] for p in b["paths"]) for b in scores["blocks"])
    teacher_params = sum(p.numel() for block in build_job(config).spec.teacher for p in block.parameters())
    budget = f"params={int(max(budget_ratio * teacher_params, 1.05 * smallest))}"
    search = search_library(library, "dna", budget, top_k=3, out=library / "search.json")
    best = search["architectures"][0]
    _logger.info("[5/6] finetuning the best architecture (%d epochs)", finetune_epochs)
    result = finetune(library, best["sample"], FinetuneSettings(epochs=finetune_epochs),
                      out=library / "finetune.json")
    summary = {
        "teacher": {"accuracy": result["teacher"]["val_accuracy"], "params": result["teacher"]["params"]},
        "architecture": best["sample"],
        "student": {"accuracy": result["student"]["val_accuracy"], "params": result["student"]["params"],
                    "accuracy_from_library": result["student"]["val_accuracy_init"],
                    "params_ratio": result["params_ratio"]},
        "budget": budget,
        "speed": {"pipebd_train_s": pipe["train_time_s"], "dp_train_s": dp["train_time_s"],
                  "speedup_vs_dp": speedup, "workers": workers,
                  "teacher_block_forwards_per_sample": {"pipebd": pipe["counters"]["teacher_block_forwards_per_sample"],
                                                        "dp": dp["counters"]["teacher_block_forwards_per_sample"]}},
        "out": str(out),
    }
    _logger.info("[6/6] report")
    report = write_report(library, out / "report", extra=_summary_lines(summary))
    summary["report"] = str(report)
    summary["time_s"] = time.perf_counter() - start
    atomic_save(summary, out / "summary.json")
    return summary


def _summary_lines(summary: Dict[str, Any]) -> list:
    s, t, speed = summary["student"], summary["teacher"], summary["speed"]
    arch = ", ".join(f"{k}={v}" for k, v in summary["architecture"].items())
    return ["## Summary", "",
            f"- teacher: val accuracy {t['accuracy']:.4f}, {t['params']:,} parameters",
            f"- searched architecture ({summary['budget']}): {arch}",
            f"- student: val accuracy {s['accuracy']:.4f} after finetuning ({s['accuracy_from_library']:.4f} "
            f"straight from the block library), {s['params']:,} parameters ({s['params_ratio']:.2f}x the teacher)",
            f"- Pipe-BD vs DNA's dp on {speed['workers']} workers, same work: {speed['pipebd_train_s']:.1f} s vs "
            f"{speed['dp_train_s']:.1f} s = **{speed['speedup_vs_dp']:.2f}x**; teacher block forwards per sample "
            f"{speed['teacher_block_forwards_per_sample']['pipebd']:g} vs "
            f"{speed['teacher_block_forwards_per_sample']['dp']:g}", ""]


def format_summary(summary: Dict[str, Any]) -> str:
    """The summary as the demo prints it."""
    from .report.summary import where_to_look

    library = Path(summary["out"]) / "library"
    return "\n".join([*(line for line in _summary_lines(summary) if line),
                      *where_to_look(library, library / "trace.json", report=summary["report"]),
                      f"{'all outputs:':<14} {summary['out']} ({summary['time_s']:.0f} s)"])
