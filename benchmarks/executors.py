"""Executors side by side on the same work: reference, dp, ls, Pipe-BD TR, TR+DPU, AHD and free placement, as ratios.

    python benchmarks/executors.py [--workers 2] [--steps 40] [--repeats 3] [--json PATH] [--doc docs/benchmarks.md]
    python benchmarks/executors.py --render PATH.json --doc docs/benchmarks.md     # tables from a saved run

Every run trains every block on the same samples (same seed, ``--steps`` steps of ``--batch`` samples), each
worker pinned to one thread, one after another in this process tree; the executors are interleaved (repeat 1 of
each, then repeat 2 of each, ...) so that a noisy moment of the machine does not favour one of them. Reported per
executor, as the median of the repeats with their min-max: samples per second (per block), speedup over dp and
efficiency against the ideal (the same repeat's single-worker reference time / W) and against the machine's
ceiling (in the same repeat, W independent processes started together, each training the reference on 1/W of
the steps with no communication: the most this machine gives W processes); also teacher block forwards
(counted by hooks on the teacher modules) and samples loaded per trained sample, peak RSS per worker and each
rank's busy fraction. Each workload is profiled first (``nni_pipebd.plan.profiler``: every block at 1..8 devices,
links measured with real workers); the measured block costs are given to every executor (``execution.block_costs``),
so pipebd stages and ls bins are balanced on measured time; TR+DPU+AHD runs the stage solver's plan and
TR+DPU+place the free-placement planner's. From the same profile the planners predict W = 2, 4, 8, and the W = 2
predictions are checked against the measured runs. ``dp`` is DNA's recipe (per-device BatchNorm); ``dp+syncBN`` is
the same schedule with BatchNorm synchronised over the workers (the reference's math). The ``+DDP`` rows sum the
gradients of batch-split student blocks with DistributedDataParallel (``execution.grad_sync: ddp``: bucketed
all-reduces overlapped with backward) instead of one flat all-reduce after it; an AHD plan without a multi-device
stage splits no batch, so there the two AHD rows run the same code.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docgen import write_between  # noqa: E402  (benchmarks/ is not a package)

from nni_pipebd.known_warnings import hide_in_script  # noqa: E402

hide_in_script()  # before anything imports NNI (its import warns), here and in the workers

from nni_pipebd.config import Config  # noqa: E402
from nni_pipebd.executors.autoplan import get_profile  # noqa: E402
from nni_pipebd.executors.launch import train  # noqa: E402
from nni_pipebd.executors.processes import run_processes  # noqa: E402
from nni_pipebd.plan.solver import dp_memory, dp_step_time, ideal_step_time, solve  # noqa: E402

WORKLOADS = {
    # DNA's regime: a big teacher distils a mobile-size student (ResNet-18 at 64x64, slim DNA-space student; six
    # blocks: the classifier head is a block of its own)
    "teacher-heavy": {
        "model": {"teacher": {"arch": "resnet18", "num_classes": 100, "pretrained": False},
                  "student": {"kind": "dna", "kernels": [3, 5], "expansions": [1, 2], "width_mult": 0.5,
                              "layers": [1, 1, 1, 1, 1, 1]}},
        "data": {"name": "synthetic", "image_size": 64, "batch_size": 32, "num_samples": 2048},
    },
    # one block >= 3x the others (a deep first student block): pure pipelines idle
    "imbalanced": {
        "model": {"teacher": {"arch": "resnet18", "num_classes": 100, "pretrained": False},
                  "student": {"kind": "dna", "kernels": [3, 5], "expansions": [1, 2], "width_mult": 0.5,
                              "layers": [5, 1, 1, 1, 1, 1]}},
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

EXECUTORS = [  # (label, executor, extra execution settings; "plan" names one of the plans made from the profile)
    ("reference", "reference", {}),
    ("dp", "dp", {"sync_bn": False}),            # DNA's code: per-device BatchNorm (the speed baseline)
    ("dp+syncBN", "dp", {"sync_bn": True}),      # same math as the reference (our default)
    ("dp+syncBN+DDP", "dp", {"sync_bn": True, "grad_sync": "ddp"}),  # gradients summed by DDP during backward
    ("ls", "ls", {}),
    ("TR", "pipebd", {"decoupled": False, "plan": "pipeline"}),
    ("TR+DPU", "pipebd", {"decoupled": True, "plan": "pipeline"}),
    ("TR+DPU+AHD", "pipebd", {"decoupled": True, "plan": "ahd"}),
    ("TR+DPU+AHD+DDP", "pipebd", {"decoupled": True, "plan": "ahd", "grad_sync": "ddp"}),
    ("TR+DPU+place", "pipebd", {"decoupled": True, "plan": "place"}),
]
SIMULATED = (2, 4, 8)

try:
    from nni_pipebd.plan.placement import place
except ImportError:  # the free-placement planner is not in every checkout: its rows are left out
    place = None
BEGIN, END = "<!-- executors.py tables: begin -->", "<!-- executors.py tables: end -->"


def workload_config(name: str, steps: int, batch: int) -> Config:
    raw = json.loads(json.dumps(WORKLOADS[name]))
    raw["data"]["batch_size"] = batch
    raw["distill"] = {"optimizer": "sgd", "lr": 0.01, "epochs": 1, "max_steps_per_epoch": steps, "seed": 0}
    raw["execution"] = {"threads_per_worker": 1, "timeout_s": 600}
    return Config.from_dict(raw)


def spread(values: List[float]) -> Dict[str, float]:
    """Median with min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def plans_for(profile, workers: int) -> dict:
    """The plans the pipebd variants run, made from the measured profile."""
    plans = {"pipeline": solve(profile, workers, max_devices_per_stage=1), "ahd": solve(profile, workers)}
    if place is not None:
        plans["place"] = place(profile, workers)
    return plans


def _ceiling_worker(rank: int, world: int, config: Config, folder: str) -> None:
    """One of the ceiling's processes: meet the others (files, no process group), then train the reference on
    this process's share of the steps, alone."""
    Path(folder, f"ready{rank}").write_text("")
    deadline = time.monotonic() + 300
    while not all(Path(folder, f"ready{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"ceiling process {rank}: the other {world - 1} did not start within 300 s")
        time.sleep(0.001)
    manifest = train(config, Path(folder, f"out{rank}"))
    Path(folder, f"time{rank}").write_text(repr(manifest["train_time_s"]))


def ceiling_time(config: Config, workers: int, folder: Path) -> float:
    """The machine's ceiling for ``workers`` processes: ``workers`` independent processes, started together, each
    training the reference on 1/``workers`` of the steps with no communication; the slowest one's time.

    What ``workers`` processes can reach here at all (shared memory bandwidth, caches, cores), against which an
    executor's efficiency is read beside the ideal ``reference / workers``.
    """
    steps = config.distill.max_steps_per_epoch
    if steps % workers:
        raise SystemExit(f"--steps {steps} must be a multiple of --workers {workers} for the machine's ceiling")
    share = config.replace(distill={"max_steps_per_epoch": steps // workers},
                           execution={"executor": "reference", "workers": 1})
    folder.mkdir(parents=True)
    run_processes(_ceiling_worker, workers, (share, str(folder)), str(folder))
    return max(float(Path(folder, f"time{r}").read_text()) for r in range(workers))


def run_workload(name: str, workers: int, steps: int, batch: int, repeats: int, scratch: Path) -> dict:
    config = workload_config(name, steps, batch)
    profile = get_profile(config, max(SIMULATED + (workers,)), scratch / f"{name}.profile.json")
    teacher_s = [b.teacher_s[1] for b in profile.blocks]
    student_s = [b.student_s[1] for b in profile.blocks]
    costs = [[t, s] for t, s in zip(teacher_s, student_s)]  # measured: balances pipebd stages and ls bins
    plans = plans_for(profile, workers)
    paths = {key: str(plan.save(scratch / f"{name}.{key}.plan.json")) for key, plan in plans.items()}
    result = {
        "workload": name, "workers": workers, "steps": steps, "batch_size": batch, "repeats": repeats,
        "teacher_to_student_cost": sum(teacher_s) / sum(student_s),
        "block_teacher_ms": [round(1e3 * t, 2) for t in teacher_s],
        "block_student_ms": [round(1e3 * s, 2) for s in student_s],
        "block_ms_by_devices": {str(g): [[round(1e3 * b.teacher_s[g], 2), round(1e3 * b.student_s[g], 2)]
                                    for b in profile.blocks] for g in sorted(profile.blocks[0].student_s)},
        "plans": {key: plan.to_dict() for key, plan in plans.items()},
        "simulated": simulate(profile),
        "executors": {label: {"train_time_s": []} for label, _, extra in EXECUTORS
                      if extra.get("plan", "ahd") in plans},
        "ceiling": {"train_time_s": []},
    }
    for repeat in range(repeats):
        result["ceiling"]["train_time_s"].append(ceiling_time(config, workers, scratch / f"{name}-ceiling-{repeat}"))
        logging.info("%s machine ceiling repeat %d: %.2f s", name, repeat + 1, result["ceiling"]["train_time_s"][-1])
        for label, executor, extra in EXECUTORS:
            if extra.get("plan", "ahd") not in plans:
                continue
            w = 1 if executor == "reference" else workers
            execution = {"executor": executor, "workers": w, "block_costs": costs, **extra}
            if "plan" in execution:
                execution["plan"] = paths[execution["plan"]]
            out = scratch / f"{name}-{label}-{repeat}"
            manifest = train(config.replace(execution=execution), out, trace=scratch / f"{name}-{label}.trace.json")
            counters, entry = manifest["counters"], result["executors"][label]
            entry["workers"] = w
            entry["train_time_s"].append(manifest["train_time_s"])
            entry["samples_per_block"] = counters["samples_per_block"]
            entry["teacher_block_forwards_per_sample"] = counters["teacher_block_forwards_per_sample"]
            entry["samples_loaded_per_sample"] = counters["samples_loaded_per_sample"]
            entry.setdefault("peak_rss_mb", []).append(max(r["peak_rss_mb"] for r in manifest["ranks"]))
            entry.setdefault("busy_fraction", []).append([round(r["busy_fraction"], 3) for r in manifest["ranks"]])
            logging.info("%s %s repeat %d: %.2f s", name, label, repeat + 1, manifest["train_time_s"])
    reference = result["executors"]["reference"]["train_time_s"]
    dp = result["executors"]["dp"]["train_time_s"]
    ceiling = result["ceiling"]["train_time_s"]
    result["ceiling"]["time"] = spread(ceiling)
    result["ceiling"]["efficiency_vs_ideal"] = spread([(r / workers) / c for r, c in zip(reference, ceiling)])
    for entry in result["executors"].values():
        times = entry["train_time_s"]
        entry["samples_per_s"] = spread([entry["samples_per_block"] / t for t in times])
        entry["speedup_vs_dp"] = spread([d / t for d, t in zip(dp, times)])
        entry["efficiency_vs_ideal"] = spread([(r / workers) / t for r, t in zip(reference, times)])
        entry["efficiency_vs_ceiling"] = spread([c / t for c, t in zip(ceiling, times)])
        entry["time"] = spread(times)
    result["prediction"] = {}
    for key, label in (("ahd", "TR+DPU+AHD"), ("place", "TR+DPU+place")):
        if key not in plans:
            continue
        measured = result["executors"][label]["time"]["median"] / steps
        predicted = plans[key].predicted["step_s"]
        errors = [(predicted - t / steps) / (t / steps) for t in result["executors"][label]["train_time_s"]]
        ideal, roof = ideal_step_time(profile, workers), result["ceiling"]["time"]["median"] / steps
        result["prediction"][label] = {"predicted_step_s": predicted, "measured_step_s": measured,
                                       "error": (predicted - measured) / measured, "errors": spread(errors),
                                       "ideal_step_s": ideal, "ceiling_step_s": roof,
                                       "predicted_efficiency_vs_ideal": ideal / predicted,
                                       "predicted_efficiency_vs_ceiling": roof / predicted}
    return result


def simulate(profile) -> dict:
    """Predicted step time, speedup over dp and efficiency for W in SIMULATED, from the measured profile."""
    out = {}
    for w in SIMULATED:
        dp = dp_step_time(profile, w)
        ideal = ideal_step_time(profile, w)
        entry = {"dp_step_s": dp, "ideal_step_s": ideal, "dp_memory_mb": dp_memory(profile, w)}
        limit = 1.05 * entry["dp_memory_mb"]
        planners = [("TR+DPU", lambda: solve(profile, w, max_devices_per_stage=1)),
                    ("TR+DPU+AHD", lambda: solve(profile, w))]
        if place is not None:
            planners += [("TR+DPU+place", lambda: place(profile, w)),
                         ("TR+DPU+place mem<=dp+5%", lambda: place(profile, w, memory_limit_mb=limit))]
        for label, make in planners:
            try:
                plan = make()
            except ValueError as err:  # e.g. fewer blocks than workers for a pure pipeline, or no plan fits
                entry[label] = {"infeasible": str(err).split(";")[0]}
                continue
            step = plan.predicted["step_s"]
            memory = plan.predicted.get("stage_mb") or plan.predicted.get("rank_mb")
            entry[label] = {"step_s": step, "speedup_vs_dp": dp / step, "efficiency_vs_ideal": ideal / step,
                            "peak_mb": max(memory), "plan": describe(plan)}
        out[w] = entry
    return out


def describe(plan) -> str:
    """A plan in one line: stages, or where every teacher link and student block runs."""
    if plan.is_pipeline:
        return " | ".join(f"b{s.start}-{s.stop - 1} x{s.devices}" for s in plan.stages)
    phase = plan.phases[0]
    links = ", ".join(f"T{r.start}-{r.stop - 1}@{','.join(map(str, r.ranks))}" for r in phase.relays)
    students = ", ".join(f"S{p.block}@{','.join(map(str, p.ranks))}" for p in sorted(phase.students,
                                                                                       key=lambda p: p.block))
    return f"{links}; {students}"


def _ceiling_cell(entry: dict) -> str:
    return _cell(entry["efficiency_vs_ceiling"]) if "efficiency_vs_ceiling" in entry else "-"  # older runs: none


def _cell(s: Dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def table(result: dict) -> str:
    """One workload's figures as Markdown."""
    lines = [f"### {result['workload']} (W = {result['workers']}, teacher/student cost "
             f"{result['teacher_to_student_cost']:.2f}, median [min-max] of {result['repeats']} interleaved repeats)",
             "",
             "| executor | samples/s | speedup vs dp | efficiency vs ideal | efficiency vs ceiling | teacher fwd/sample "
             "| loads/sample | peak RSS MB | busy fraction per rank (median run) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, e in result["executors"].items():
        middle = sorted(range(len(e["train_time_s"])), key=lambda i: e["train_time_s"][i])[len(e["train_time_s"]) // 2]
        lines.append(f"| {label} | {_cell(e['samples_per_s'], 1)} | {_cell(e['speedup_vs_dp'])} | "
                     f"{_cell(e['efficiency_vs_ideal'])} | {_ceiling_cell(e)} | "
                     f"{e['teacher_block_forwards_per_sample']:.0f} | "
                     f"{e['samples_loaded_per_sample']:.0f} | {max(e['peak_rss_mb']):.0f} | "
                     f"{', '.join(f'{b:.2f}' for b in e['busy_fraction'][middle])} |")
    if "ceiling" in result:
        c = result["ceiling"]
        lines += ["", f"Machine ceiling (W = {result['workers']} independent processes started together, each "
                  f"training the reference on 1/{result['workers']} of the steps, no communication): "
                  f"{_cell(c['time'])} s, efficiency vs ideal {_cell(c['efficiency_vs_ideal'])} — the most this "
                  "machine gives that many processes."]
    lines += ["", "per-block ms (teacher fwd / student fwd+bwd+step, batch "
              f"{result['batch_size']}, 1 thread): " + ", ".join(
                  f"{t}/{s}" for t, s in zip(result["block_teacher_ms"], result["block_student_ms"])), ""]
    if "block_ms_by_devices" in result:  # how each block scales: what a device count can gain at most
        by = result["block_ms_by_devices"]
        shown = [g for g in map(str, (1, 2, 4, 8)) if g in by]
        lines += ["per-block ms on g devices (teacher + student, per device at ceil(B/g) rows; g = "
                  + "/".join(shown) + "): " + ", ".join(
                      f"b{i} " + "/".join(f"{sum(by[g][i]):.1f}" for g in shown) for i in range(len(by["1"]))), ""]
    from nni_pipebd.plan.plan import Plan

    for key, label in (("pipeline", "TR / TR+DPU"), ("ahd", "TR+DPU+AHD"), ("place", "TR+DPU+place")):
        if key not in result["plans"]:
            continue
        lines.append(f"- {label} plan: {describe(Plan.from_dict(result['plans'][key]))}")
    for label, p in result["prediction"].items():
        lines.append(f"- {label}: predicted step {1e3 * p['predicted_step_s']:.1f} ms, measured (median) "
                     f"{1e3 * p['measured_step_s']:.1f} ms (error {100 * p['error']:+.0f}%"
                     + (f"; per repeat {100 * p['errors']['min']:+.0f}% to {100 * p['errors']['max']:+.0f}%"
                        if "errors" in p else "") + ")"
                     + (f"; predicted efficiency {p['predicted_efficiency_vs_ideal']:.2f} vs ideal "
                        f"({1e3 * p['ideal_step_s']:.1f} ms), {p['predicted_efficiency_vs_ceiling']:.2f} vs the "
                        f"measured ceiling ({1e3 * p['ceiling_step_s']:.1f} ms)" if "ceiling_step_s" in p else ""))
    lines += ["", "| simulated W | plan | step ms | speedup vs dp | efficiency vs ideal | peak MB (dp MB) | plan |",
              "|---|---|---|---|---|---|---|"]
    for w, entry in result["simulated"].items():
        for label, e in entry.items():
            if not isinstance(e, dict):
                continue
            if "infeasible" in e:
                lines.append(f"| {w} | {label} | - | - | - | - | {e['infeasible']} |")
                continue
            lines.append(f"| {w} | {label} | {1e3 * e['step_s']:.1f} | {e['speedup_vs_dp']:.2f} | "
                         f"{e['efficiency_vs_ideal']:.2f} | {e['peak_mb']:.0f} ({entry['dp_memory_mb']:.0f}) | "
                         f"{e['plan']} |")
    return "\n".join(lines)


def render(run: dict) -> str:
    """Every workload's tables, with the command that measured them."""
    parts = [f"Generated by `python benchmarks/executors.py --render ... --doc ...` from the JSON of "
             f"`python {run['command']}`.", ""]
    for result in run["results"]:
        parts += [table(result), ""]
    return "\n".join(parts).rstrip() + "\n"


def write_doc(doc: Path, run: dict) -> None:
    """Replace the generated part of ``doc`` (between the BEGIN and END markers) with :func:`render`."""
    write_between(doc, BEGIN, END, render(run))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="steps per block")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median and min-max reported)")
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="repeatable; default: all")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--doc", help="write the tables into this Markdown file (between its markers)")
    parser.add_argument("--render", metavar="JSON", help="do not measure: make the tables from this saved run")
    args = parser.parse_args(argv)
    if args.render:
        run = json.loads(Path(args.render).read_text())
        if args.doc:
            write_doc(Path(args.doc), run)
        else:
            print(render(run))
        return 0
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("nni_pipebd").setLevel(logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory(prefix="nni_pipebd_bench_") as scratch:
        for name in args.workload or list(WORKLOADS):
            results.append(run_workload(name, args.workers, args.steps, args.batch, args.repeats, Path(scratch)))
            print(table(results[-1]), flush=True)
            print(flush=True)
    run = {"command": " ".join(["benchmarks/executors.py"] + sys.argv[1:]), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(run, indent=2) + "\n")
    if args.doc:
        write_doc(Path(args.doc), run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
