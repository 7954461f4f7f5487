"""GPU readiness, measured: reference == pipebd per precision on the device, then profiles and plans per setting.

    python benchmarks/gpu_check.py [--device auto|cuda|cpu] [--quick] [--json PATH]

Run by ``benchmarks/gpu_check.sh`` (which first runs the tests marked ``gpu``). Two steps:

1. *Equivalence*: a small job trained by the ``reference`` executor (in this process) and by ``pipebd`` with one
   worker (its own process) at fp32 and at bf16, ``execution.deterministic`` on; the block libraries must be
   bitwise equal within each precision (and the per-epoch losses equal).
2. *Profiles*: the three workloads of ``benchmarks/executors.py`` (``WORKLOADS``) profiled on the device by
   ``nni_pipebd.plan.profiler.profile_job`` at fp32, bf16 and channels_last (and bf16 + channels_last on CUDA):
   per-block teacher forward and student step times, relay bytes, and the planners' predictions for W = 2, 4, 8
   (``simulate`` of ``benchmarks/executors.py``: the stage solver, and the free-placement planner where
   ``nni_pipebd.plan.placement`` exists) under the link model stated in the JSON — measured with real workers
   when the machine has two or more devices of the kind, else assumed (one GPU cannot measure a link).

Without CUDA the same steps run on CPU at small sizes (``--quick``: the tests' tiny job in place of the workloads,
one round each, for CI) and the output and the JSON say so. Exit status 1 when an equivalence check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

from nni_pipebd.known_warnings import hide_in_script

hide_in_script()  # before anything imports NNI (its import warns), here and in the workers

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from executors import WORKLOADS, place, simulate  # noqa: E402  (benchmarks/ is not a package)

from nni_pipebd.config import Config  # noqa: E402
from nni_pipebd.executors.launch import train  # noqa: E402
from nni_pipebd.job import build_job  # noqa: E402
from nni_pipebd.plan.profiler import LinkModel, Profile, profile_job  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# (label, precision, channels_last); CUDA adds bf16 + channels_last, the combination tensor cores like best
SETTINGS = [("fp32", "fp32", False), ("bf16", "bf16", False), ("channels_last", "fp32", True)]
CUDA_SETTINGS = SETTINGS + [("bf16+channels_last", "bf16", True)]
# Assumed links (used where links cannot be measured): p2p latency and bandwidth; all-reduce as a ring over them
ASSUMED_LINKS = {
    "cuda": ("NVLink-class GPU-to-GPU link (assumed, not measured: one GPU has no link to measure)", 10e-6, 200e9),
    "cpu": ("gloo over loopback (assumed, not measured)", 50e-6, 2e9),
}
ALL = list(WORKLOADS)
SIZES = {  # per mode: the equivalence job and its steps per epoch; the profiled workloads, their batch (>= 16: at
    # W = 8 a device then holds 2 rows, which BatchNorm on a 1x1 map needs), repeats and warm-up rounds
    "cuda": {"equivalence": "mobilenet", "steps": 6, "workloads": ALL, "batch": 32, "repeats": 5, "warmup": 2},
    "cpu": {"equivalence": "tiny", "steps": 3, "workloads": ALL, "batch": 16, "repeats": 1, "warmup": 1},
    "quick": {"equivalence": "tiny", "steps": 2, "workloads": ["tiny"], "batch": 16, "repeats": 1, "warmup": 0},
}
TINY = {  # the tests' tiny job (tests/conftest.py: tiny_config)
    "model": {"teacher": {"arch": "digits_cnn", "num_classes": 10, "kwargs": {"width": 4}, "pretrained": False},
              "student": {"kind": "dna", "kernels": [3, 5], "expansions": [2]}},
    "data": {"name": "synthetic", "image_size": 16, "channels": 3, "batch_size": 8, "num_samples": 32},
}


def equivalence_config(sizes: dict, device: str, precision: str) -> Config:
    """The small job step 1 trains twice per precision."""
    if sizes["equivalence"] == "tiny":
        raw = json.loads(json.dumps(TINY))
    else:
        raw = json.loads(json.dumps(WORKLOADS[sizes["equivalence"]]))
        raw["data"].update(batch_size=sizes["batch"], num_samples=sizes["batch"] * sizes["steps"])
    raw["distill"] = {"optimizer": "sgd", "lr": 0.05, "epochs": 2, "max_steps_per_epoch": sizes["steps"], "seed": 3}
    raw["execution"] = {"device": device, "precision": precision, "deterministic": True, "timeout_s": 300}
    return Config.from_dict(raw)


def check_equivalence(sizes: dict, device: str, scratch: Path) -> List[dict]:
    """Reference vs one-worker pipebd per precision: bitwise block weights and equal losses."""
    results = []
    for precision in ("fp32", "bf16"):
        config = equivalence_config(sizes, device, precision)
        start = time.perf_counter()
        ref = train(config, scratch / f"eq-{precision}-ref")
        pipe = train(config.replace(execution={"executor": "pipebd", "workers": 1}), scratch / f"eq-{precision}-pipe")
        n = ref["num_blocks"]
        worst, equal = 0.0, True
        for i in range(n):
            a = torch.load(scratch / f"eq-{precision}-ref" / f"block_{i}.pt")
            b = torch.load(scratch / f"eq-{precision}-pipe" / f"block_{i}.pt")
            for key in a:
                equal = equal and torch.equal(a[key], b[key])
                if a[key].is_floating_point():
                    worst = max(worst, (a[key] - b[key]).abs().max().item())
        losses = [b["losses"] for b in ref["blocks"]] == [b["losses"] for b in pipe["blocks"]]
        results.append({"precision": precision, "job": sizes["equivalence"], "blocks": n, "bitwise_equal": equal,
                        "losses_equal": losses, "max_abs_weight_diff": worst,
                        "seconds": round(time.perf_counter() - start, 1)})
        print(f"  {precision}: reference vs pipebd (1 worker) on {device}: "
              f"{'bitwise equal' if equal and losses else 'DIFFERENT (max |dw| %.3g)' % worst} "
              f"({results[-1]['seconds']} s)", flush=True)
    return results


def workload_config(name: str, sizes: dict, device: str, precision: str, channels_last: bool) -> Config:
    """A workload of ``benchmarks/executors.py`` (or ``tiny``, the tests' job) at ``sizes``, on ``device``."""
    raw = json.loads(json.dumps(TINY if name == "tiny" else WORKLOADS[name]))
    raw["data"]["batch_size"] = sizes["batch"]
    raw["data"]["num_samples"] = sizes["batch"]  # the image size stays: it decides where the teacher is split
    raw["distill"] = {"optimizer": "sgd", "lr": 0.01, "epochs": 1, "seed": 0}
    raw["execution"] = {"device": device, "precision": precision, "channels_last": channels_last}
    return Config.from_dict(raw)


def link_model(device: str, measure: bool, config: Config, workers: int) -> Tuple[dict, LinkModel, dict]:
    """The link model the predictions assume: measured with real workers, or the stated assumption."""
    if measure:
        from nni_pipebd.executors.autoplan import measure_links

        p2p, allreduce = measure_links(config, workers)
        return {"source": "measured", "description": f"measured with real {device} workers (execution.backend auto)",
                "p2p": vars(p2p), "allreduce": {g: vars(m) for g, m in allreduce.items()}}, p2p, allreduce
    description, latency, bandwidth = ASSUMED_LINKS[device]
    p2p = LinkModel(latency, 1.0 / bandwidth)
    allreduce = {2: LinkModel(2 * latency, 1.0 / bandwidth)}  # ring: 2(g-1) hops, 2(g-1)/g of the bytes per link
    return {"source": "assumed", "description": description, "p2p": vars(p2p),
            "allreduce": {g: vars(m) for g, m in allreduce.items()},
            "note": "all-reduce over g devices: ring model extrapolated from g = 2"}, p2p, allreduce


def profile_workloads(sizes: dict, device: str, settings, measure_links: bool) -> Tuple[dict, List[dict]]:
    """Every workload at every setting: per-block costs and the planners' W = 2/4/8 predictions."""
    max_devices = 8  # W = 2, 4, 8 need every data-parallel degree up to 8 (batch >= 8)
    links = None
    results = []
    for name in sizes["workloads"]:
        for label, precision, channels_last in settings:
            config = workload_config(name, sizes, device, precision, channels_last)
            if links is None:
                links = link_model(device, measure_links, config, max_devices)
            start = time.perf_counter()
            job = build_job(config)
            profile: Profile = profile_job(job, max_devices, torch.device(device), sizes["repeats"], sizes["warmup"])
            profile.p2p, profile.allreduce = links[1], dict(links[2])
            seconds = time.perf_counter() - start
            blocks = profile.blocks
            entry = {
                "workload": name, "setting": label, "precision": precision, "channels_last": channels_last,
                "batch_size": profile.batch_size, "image_size": config.data.image_size,
                "block_teacher_ms": [round(1e3 * b.teacher_s[1], 3) for b in blocks],
                "block_student_ms": [round(1e3 * b.student_s[1], 3) for b in blocks],
                "block_memory_mb": [round(b.memory_mb[1], 2) for b in blocks],
                "activation_in_bytes_per_sample": [b.activation_in_bytes for b in blocks],
                "simulated": simulate(profile), "profile_s": round(seconds, 1),
            }
            results.append(entry)
            ahd = {w: e.get("TR+DPU+AHD", {}).get("step_s") for w, e in entry["simulated"].items()}
            print(f"  {name:13s} {label:18s} teacher {sum(entry['block_teacher_ms']):8.2f} ms  student "
                  f"{sum(entry['block_student_ms']):8.2f} ms  relay bytes/sample {blocks[1].activation_in_bytes:7d}  "
                  "AHD step ms W=2/4/8: " + "/".join("-" if v is None else f"{1e3 * v:.2f}" for v in ahd.values()),
                  flush=True)
    return links[0], results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="CPU only: the tests' tiny job instead of the workloads "
                                                             "(CI proves the script)")
    parser.add_argument("--json", help="write the results here (default: benchmarks/results-gpu-<date>.json on "
                                       "CUDA, benchmarks/results-gpu-check-cpu-<date>.json on CPU)")
    parser.add_argument("--measure-links", choices=["auto", "yes", "no"], default="auto",
                        help="auto: measure when two or more GPUs are visible, else assume (see the JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device auto or cpu")
    if args.quick and device == "cuda":
        raise SystemExit("--quick shrinks the CPU run for CI; on a GPU run the full check")
    mode = "quick" if args.quick else device
    sizes = SIZES[mode]
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()
    banner = (f"device: {device} ({name})" + ("" if device == "cuda" else
                                              " -- no CUDA: NOT a GPU measurement, small CPU sizes"))
    print(f"gpu_check.py: {banner}; mode {mode}", flush=True)
    measure = {"yes": True, "no": False}.get(args.measure_links,
                                             device == "cuda" and torch.cuda.device_count() >= 2)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nni_pipebd_gpu_check_") as scratch:
        print("equivalence (execution.deterministic: true):", flush=True)
        equivalence = check_equivalence(sizes, device, Path(scratch))
    print("profiles (per-block ms at batch %d; predictions from the link model below):" % sizes["batch"], flush=True)
    links, profiles = profile_workloads(sizes, device, CUDA_SETTINGS if device == "cuda" else SETTINGS, measure)
    print(f"link model: {links['source']}: {links['description']}", flush=True)
    ok = all(e["bitwise_equal"] and e["losses_equal"] for e in equivalence)
    date = datetime.date.today().isoformat()
    run = {
        "command": " ".join(["benchmarks/gpu_check.py"] + (argv if argv is not None else sys.argv[1:])),
        "date": date, "device": device, "device_name": name, "mode": mode,
        "gpu_measurement": device == "cuda", "cuda_devices": torch.cuda.device_count() if device == "cuda" else 0,
        "torch": torch.__version__, "placement_planner": place is not None, "sizes": sizes,
        "equivalence": equivalence, "equivalence_ok": ok, "link_model": links, "profiles": profiles,
        "seconds": round(time.perf_counter() - started, 1),
    }
    default = f"results-gpu-{date}.json" if device == "cuda" else f"results-gpu-check-cpu-{date}.json"
    path = Path(args.json) if args.json else ROOT / "benchmarks" / default
    path.write_text(json.dumps(run, indent=2) + "\n")
    print(f"{'OK' if ok else 'FAILED'}: equivalence {'holds' if ok else 'broken'} on {device}; results in {path} "
          f"({run['seconds']} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS use (execution.deterministic)
    sys.exit(main())
