"""Start-up of a run: from launching ``nni-pipebd train`` to its first training step, spawned vs forked workers.

    python benchmarks/startup.py [--workers 1,2,3] [--repeats 3] [--json PATH] [--doc docs/benchmarks.md]
    python benchmarks/startup.py --render PATH.json --doc docs/benchmarks.md     # the table from a saved run

Each run is the CLI in a fresh process, as a user starts it: Pipe-BD on the digits example (its teacher random, so
nothing is trained first) for one step, W workers. Measured per run: the wall time from launching the command to
the first span of any rank's first step (the trace's origin), and the CPU seconds of the whole one-step run — the
lead, the workers' fork server and the workers, collected by making this process the subreaper of the tree. Beside
them, in the same repeats, the lead's own imports (``python -c "import nni_pipebd.executors.launch"``): the floor of
any start-up. Worker start methods: ``spawn`` (every worker a fresh interpreter importing torch and NNI) and
``forkserver`` (workers forked from a server that imported them once, started by the CLI as soon as the config is
read; the default). Runs are interleaved (repeat 1 of everything, then repeat 2, ...); reported: the median of the
repeats with their min-max.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docgen import write_between  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("spawn", "forkserver")
BEGIN, END = "<!-- startup:begin -->", "<!-- startup:end -->"
_PR_SET_CHILD_SUBREAPER = 36


def job_file(folder: Path) -> Path:
    """The digits example with a random teacher (nothing to train before the run)."""
    raw = yaml.safe_load((ROOT / "examples" / "digits" / "config.yaml").read_text())
    raw["model"]["teacher"].update({"checkpoint": None, "train_if_missing": False, "pretrained": False})
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _reap_orphans() -> None:
    """Wait for every descendant adopted by this process (the server and trackers of a finished lead)."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(job: Path, folder: Path, workers: int, method: str) -> Dict[str, float]:
    """One one-step run of the CLI: seconds to the first step, CPU seconds of the whole tree."""
    out = folder / f"run-{method}-{workers}"
    env = {**os.environ, "NNI_PIPEBD_START_METHOD": method}
    command = [sys.executable, "-m", "nni_pipebd.cli", "-q", "train", str(job), "--executor", "pipebd",
               "--workers", str(workers), "--epochs", "1", "--max-steps", "1", "--out", str(out), "--overwrite"]
    cpu = _children_cpu()
    launched = time.time()
    done = subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True)
    ended = time.time()
    _reap_orphans()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    origin = json.loads((out / "trace.json").read_text())["otherData"]["origin_unix_s"]
    return {"first_step_s": origin - launched, "total_s": ended - launched, "cpu_s": _children_cpu() - cpu}


def imports_once() -> Dict[str, float]:
    """The lead's own imports in a fresh interpreter: wall and CPU seconds."""
    cpu = _children_cpu()
    began = time.time()
    subprocess.run([sys.executable, "-W", "ignore", "-c", "import nni_pipebd.executors.launch"], check=True)
    return {"wall_s": time.time() - began, "cpu_s": _children_cpu() - cpu}


def measure(workers: List[int], repeats: int) -> Dict:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit("prctl(PR_SET_CHILD_SUBREAPER) failed: the CPU seconds of the workers cannot be collected")
    runs: Dict[str, List[Dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="nni_pipebd_startup_") as tmp:
        folder = Path(tmp)
        job = job_file(folder)
        for repeat in range(repeats):
            runs.setdefault("imports", []).append(imports_once())
            for w in workers:
                for method in METHODS:
                    result = run_once(job, folder, w, method)
                    runs.setdefault(f"{method}/{w}", []).append(result)
                    print(f"repeat {repeat + 1}/{repeats} W={w} {method}: first step after {result['first_step_s']:.2f}"
                          f" s, {result['cpu_s']:.2f} CPU-s", flush=True)
    return {"workers": workers, "repeats": repeats, "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "runs": runs}


def _stat(values: List[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def render(result: Dict) -> str:
    """The Markdown table of a measurement: per W, both start methods, medians with min-max."""
    imports = result["runs"]["imports"]
    lines = [f"Lead's own imports (`import nni_pipebd.executors.launch`, fresh interpreter): "
             f"{_stat([r['wall_s'] for r in imports])} s wall, {_stat([r['cpu_s'] for r in imports])} CPU-s "
             f"(median (min-max) of {result['repeats']} repeats, {result['cpus']} cores).", "",
             "| W | workers start by | launch to first step, s | over the lead's imports, s | CPU-s of the one-step run "
             "| start-up vs spawn |",
             "|---|---|---|---|---|---|"]
    for w in result["workers"]:
        spawn = [r["first_step_s"] for r in result["runs"][f"spawn/{w}"]]
        for method in METHODS:
            runs = result["runs"][f"{method}/{w}"]
            first = [r["first_step_s"] for r in runs]
            over = [r["first_step_s"] - i["wall_s"] for r, i in zip(runs, imports)]
            ratio = [s / f for s, f in zip(spawn, first)]
            lines.append(f"| {w} | {method} | {_stat(first)} | {_stat(over)} | {_stat([r['cpu_s'] for r in runs])} | "
                         f"{'1.00' if method == 'spawn' else _stat(ratio) + 'x faster'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,3", help="comma-separated worker counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the measurement there")
    parser.add_argument("--doc", help="write the table into this Markdown file between the startup markers")
    parser.add_argument("--render", help="render a saved measurement instead of measuring")
    args = parser.parse_args()
    if args.render:
        result = json.loads(Path(args.render).read_text())
    else:
        result = measure([int(w) for w in args.workers.split(",")], args.repeats)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    print(table)
    if args.doc:
        write_between(Path(args.doc), BEGIN, END, table)


if __name__ == "__main__":
    main()
