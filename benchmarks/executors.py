"""Executors side by side on the same work: reference, dp, ls, Pipe-BD TR and TR+DPU, as ratios.

    python benchmarks/executors.py [--workers 2] [--steps 30] [--json PATH] [--workload teacher-heavy ...]

Every run trains every block on the same samples (same seed, ``--steps`` steps of ``--batch`` samples), each
worker pinned to one thread, one after another in this process tree. Reported per executor: samples per second
(per block), speedup over dp, efficiency against the ideal (single-worker reference time / W), teacher block
forwards and samples loaded per trained sample, peak RSS per worker and each rank's busy fraction.
Each workload is profiled first (``nni_pipebd.plan.profiler``: every block at 1..8 devices per stage, links
measured with real workers); the measured block costs are given to every executor
(``execution.block_costs``), so pipebd stages and ls bins are balanced on measured time, and TR+DPU+AHD runs
the solver's plan. From the same profile a simulator predicts W = 2, 4, 8 (AHD, pure pipeline, dp), and
the W = 2 prediction is checked against the measured run. ``dp`` is DNA's recipe (per-device BatchNorm);
``dp+syncBN`` is the same schedule with BatchNorm synchronised over the workers (the reference's math).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from nni_pipebd.config import Config
from nni_pipebd.executors.launch import train
from nni_pipebd.executors.autoplan import get_profile
from nni_pipebd.plan.solver import dp_memory, dp_step_time, ideal_step_time, solve

WORKLOADS = {
    # DNA's regime: a big teacher distils a mobile-size student (ResNet-18 at 64x64, slim DNA-space student)
    "teacher-heavy": {
        "model": {"teacher": {"arch": "resnet18", "num_classes": 100, "pretrained": False},
                  "student": {"kind": "dna", "kernels": [3, 5], "expansions": [1, 2], "width_mult": 0.5,
                              "layers": [1, 1, 1, 1, 1]}},
        "data": {"name": "synthetic", "image_size": 64, "batch_size": 32, "num_samples": 2048},
    },
    # one block >= 3x the others (a deep first student block): pure pipelines idle, AHD must help
    "imbalanced": {
        "model": {"teacher": {"arch": "resnet18", "num_classes": 100, "pretrained": False},
                  "student": {"kind": "dna", "kernels": [3, 5], "expansions": [1, 2], "width_mult": 0.5,
                              "layers": [5, 1, 1, 1, 1]}},
        "data": {"name": "synthetic", "image_size": 64, "batch_size": 32, "num_samples": 2048},
    },
    # Pipe-BD's NAS setting: MobileNetV2 teacher (half width, 32x32, 6 blocks), DNA space student
    "mobilenet": {
        "model": {"teacher": {"arch": "mobilenet_v2", "num_classes": 100, "kwargs": {"width_mult": 0.5},
                              "pretrained": False},
                  "student": {"kind": "dna", "kernels": [3, 5, 7], "expansions": [3, 6]}},
        "data": {"name": "synthetic", "image_size": 32, "batch_size": 32, "num_samples": 2048},
    },
}

EXECUTORS = [  # (label, executor, extra execution settings)
    ("reference", "reference", {}),
    ("dp", "dp", {"sync_bn": False}),            # DNA's code: per-device BatchNorm (the speed baseline)
    ("dp+syncBN", "dp", {"sync_bn": True}),      # same math as the reference (our default)
    ("ls", "ls", {}),
    ("TR", "pipebd", {"decoupled": False}),
    ("TR+DPU", "pipebd", {"decoupled": True}),
    ("TR+DPU+AHD", "pipebd", {"decoupled": True, "plan": "PLAN"}),
]
SIMULATED = (2, 4, 8)


def workload_config(name: str, steps: int, batch: int) -> Config:
    raw = json.loads(json.dumps(WORKLOADS[name]))
    raw["data"]["batch_size"] = batch
    raw["distill"] = {"optimizer": "sgd", "lr": 0.01, "epochs": 1, "max_steps_per_epoch": steps, "seed": 0}
    raw["execution"] = {"threads_per_worker": 1, "timeout_s": 600}
    return Config.from_dict(raw)


def run_workload(name: str, workers: int, steps: int, batch: int, scratch: Path) -> dict:
    config = workload_config(name, steps, batch)
    profile = get_profile(config, max(SIMULATED + (workers,)), scratch / f"{name}.profile.json")
    teacher_s = [b.teacher_s[1] for b in profile.blocks]
    student_s = [b.student_s[1] for b in profile.blocks]
    costs = [[t, s] for t, s in zip(teacher_s, student_s)]  # measured: balances pipebd stages and ls bins
    pipeline = solve(profile, workers, max_devices_per_stage=1)
    ahd = solve(profile, workers)
    ahd_path = ahd.save(scratch / f"{name}.plan.json")
    result = {
        "workload": name, "workers": workers, "steps": steps, "batch_size": batch,
        "teacher_to_student_cost": sum(teacher_s) / sum(student_s),
        "block_teacher_ms": [round(1e3 * t, 2) for t in teacher_s],
        "block_student_ms": [round(1e3 * s, 2) for s in student_s],
        "pipebd_boundaries": pipeline.boundaries,
        "ahd_plan": ahd.to_dict(),
        "simulated": simulate(profile),
        "executors": {},
    }
    for label, executor, extra in EXECUTORS:
        w = 1 if executor == "reference" else workers
        execution = {"executor": executor, "workers": w, "block_costs": costs, **extra}
        if execution.get("plan") == "PLAN":
            execution["plan"] = str(ahd_path)
        elif executor == "pipebd":
            execution["boundaries"] = pipeline.boundaries
        run_config = config.replace(execution=execution)
        out = scratch / f"{name}-{label}"
        manifest = train(run_config, out, trace=scratch / f"{name}-{label}.trace.json")
        counters = manifest["counters"]
        result["executors"][label] = {
            "workers": w,
            "train_time_s": manifest["train_time_s"],
            "samples_per_s": counters["samples_per_block"] / manifest["train_time_s"],
            "teacher_block_forwards_per_sample": counters["teacher_block_forwards_per_sample"],
            "samples_loaded_per_sample": counters["samples_loaded_per_sample"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in manifest["ranks"]),
            "stage_busy_fraction": [round(r["busy_fraction"], 3) for r in manifest["ranks"]],
        }
        logging.info("%s %s: %.2f s", name, label, manifest["train_time_s"])
    ref_time = result["executors"]["reference"]["train_time_s"]
    dp_time = result["executors"]["dp"]["train_time_s"]
    for entry in result["executors"].values():
        entry["speedup_vs_dp"] = dp_time / entry["train_time_s"]
        entry["efficiency_vs_ideal"] = (ref_time / workers) / entry["train_time_s"]
    measured = result["executors"]["TR+DPU+AHD"]["train_time_s"] / steps
    predicted = ahd.predicted["step_s"]
    result["ahd_prediction"] = {"workers": workers, "predicted_step_s": predicted, "measured_step_s": measured,
                                "error": (predicted - measured) / measured}
    return result


def simulate(profile) -> dict:
    """Predicted step time, speedup over dp and efficiency for W in SIMULATED, from the measured profile."""
    out = {}
    for w in SIMULATED:
        dp = dp_step_time(profile, w)
        ideal = ideal_step_time(profile, w)
        entry = {"dp_step_s": dp, "ideal_step_s": ideal, "dp_memory_mb": dp_memory(profile, w)}
        for label, kwargs in (("TR+DPU", {"max_devices_per_stage": 1}), ("TR+DPU+AHD", {}),
                              ("TR+DPU+AHD mem<=dp+10%", {"memory_limit_mb": 1.1 * entry["dp_memory_mb"]})):
            try:
                plan = solve(profile, w, **kwargs)
            except ValueError as err:  # e.g. fewer blocks than workers for a pure pipeline
                entry[label] = {"infeasible": str(err).split(";")[0]}
                continue
            step = plan.predicted["step_s"]
            entry[label] = {"step_s": step, "speedup_vs_dp": dp / step, "efficiency_vs_ideal": ideal / step,
                            "peak_mb": max(plan.predicted["stage_mb"]),
                            "stages": [[s.start, s.stop, s.devices] for s in plan.stages]}
        out[w] = entry
    return out


def table(result: dict) -> str:
    lines = [f"### {result['workload']} (W = {result['workers']}, teacher/student cost "
             f"{result['teacher_to_student_cost']:.2f}, pipebd stages start at {result['pipebd_boundaries']})",
             "",
             "| executor | samples/s | speedup vs dp | efficiency vs ideal | teacher fwd/sample | loads/sample "
             "| peak RSS MB | busy fraction per rank |",
             "|---|---|---|---|---|---|---|---|"]
    for label, e in result["executors"].items():
        lines.append(f"| {label} | {e['samples_per_s']:.1f} | {e['speedup_vs_dp']:.2f} | "
                     f"{e['efficiency_vs_ideal']:.2f} | {e['teacher_block_forwards_per_sample']:.0f} | "
                     f"{e['samples_loaded_per_sample']:.0f} | {e['peak_rss_mb']:.0f} | "
                     f"{', '.join(f'{b:.2f}' for b in e['stage_busy_fraction'])} |")
    lines += ["", "per-block ms (teacher fwd / student fwd+bwd+step, batch "
              f"{result['batch_size']}, 1 thread): " + ", ".join(
                  f"{t}/{s}" for t, s in zip(result["block_teacher_ms"], result["block_student_ms"])),
              "", f"AHD plan at W = {result['workers']}: "
              + ", ".join(f"blocks {s['start']}-{s['stop'] - 1} on {s['devices']}" for s in result["ahd_plan"]["stages"])
              + f"; predicted step {1e3 * result['ahd_prediction']['predicted_step_s']:.1f} ms, measured "
              f"{1e3 * result['ahd_prediction']['measured_step_s']:.1f} ms "
              f"(error {100 * result['ahd_prediction']['error']:+.0f}%)",
              "", "| simulated W | plan | step ms | speedup vs dp | efficiency vs ideal | peak MB (dp MB) | stages |",
              "|---|---|---|---|---|---|---|"]
    for w, entry in result["simulated"].items():
        for label in ("TR+DPU", "TR+DPU+AHD", "TR+DPU+AHD mem<=dp+10%"):
            e = entry[label]
            if "infeasible" in e:
                lines.append(f"| {w} | {label} | - | - | - | - | {e['infeasible']} |")
                continue
            lines.append(f"| {w} | {label} | {1e3 * e['step_s']:.1f} | {e['speedup_vs_dp']:.2f} | "
                         f"{e['efficiency_vs_ideal']:.2f} | {e['peak_mb']:.0f} ({entry['dp_memory_mb']:.0f}) | "
                         f"{e['stages']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="steps per block")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                        help="repeatable; default: all")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("nni_pipebd").setLevel(logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory(prefix="nni_pipebd_bench_") as scratch:
        for name in args.workload or list(WORKLOADS):
            results.append(run_workload(name, args.workers, args.steps, args.batch, Path(scratch)))
            print(table(results[-1]), flush=True)
            print(flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
