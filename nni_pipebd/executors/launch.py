"""Launching workers — in this process, by local spawn (file store rendezvous) or under torchrun (env://)."""

from __future__ import annotations

import datetime
import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import Config
from ..job import build_job
from ..library import atomic_save, block_path, load_manifest, remove_stale, write_manifest, MANIFEST
from ..spec.pretrain import prepare_teacher
from ..report.trace import Tracer, busy_fraction, write_chrome_trace
from .base import WorkerContext, WorkerReport, get_executor

__all__ = ["train", "WorkerError", "under_torchrun"]

_logger = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A worker process failed; the message names its rank and cause."""


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another env:// launcher)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def train(config: Config, out_dir: Union[str, Path], *, overwrite: bool = False,
          trace: Union[str, Path, None] = None) -> Optional[Dict[str, Any]]:
    """Train the block library described by ``config`` into ``out_dir``.

    Runs ``config.execution.workers`` workers of ``config.execution.executor``: in this process when one
    worker needs no process group, under torchrun when started by it (every rank calls this), else by local
    spawn. Returns the library manifest (``None`` on torchrun ranks other than 0).

    Parameters
    ----------
    config : Config
        The job.
    out_dir : str or Path
        Library folder; ``library.json`` is written last, so its presence marks a finished library.
    overwrite : bool
        Replace a library already in ``out_dir`` (else that is an error).
    trace : str or Path, optional
        Record every worker's timeline and write it there as a Chrome trace (one row per rank).
    """
    executor_cls = get_executor(config.execution.executor)
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else config.execution.workers
    executor_cls(config).check(world)
    out_dir = Path(out_dir)
    rank = int(os.environ.get("RANK", 0)) if under_torchrun() else 0
    trace = None if trace is None else str(trace)
    if rank == 0:
        _prepare_out_dir(out_dir, overwrite)
        prepare_teacher(config)
    if config.execution.plan == "auto" and not under_torchrun():
        from .autoplan import auto_plan

        plan, _ = auto_plan(config, world)
        path = plan.save(out_dir / "plan.json")
        _logger.info("automatic hybrid distribution for %d workers (saved to %s):\n%s", world, path, plan.grid())
        config = config.replace(execution={"plan": str(path.resolve())})
    if under_torchrun():
        _worker(int(os.environ["RANK"]), world, config, str(out_dir), "env://", trace)
    elif world == 1 and not executor_cls.needs_process_group:
        _worker(0, 1, config, str(out_dir), None, trace)
    else:
        executor_cls(config).check(world, build_job(config).num_blocks)  # fail here, not in every worker
        _spawn(world, config, out_dir, trace)
    return load_manifest(out_dir) if rank == 0 else None


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if (out_dir / MANIFEST).exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds a block library ({MANIFEST}); "
                                  "choose another --out folder or pass --overwrite")
        manifest = load_manifest(out_dir)
        remove_stale(out_dir, range(manifest.get("num_blocks", 0)))
        _logger.info("replacing the block library in %s", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _spawn(world: int, config: Config, out_dir: Path, trace: Optional[str]) -> None:
    rendezvous = tempfile.mkdtemp(prefix="nni_pipebd_rdzv_")
    try:
        init = f"file://{os.path.join(rendezvous, 'store')}"
        mp.start_processes(_worker, args=(world, config, str(out_dir), init, trace), nprocs=world, join=True,
                           start_method="spawn")
    except mp.ProcessRaisedException as err:
        raise WorkerError(f"worker rank {err.error_index} of {world} failed:\n{err}") from None
    except mp.ProcessExitedException as err:
        raise WorkerError(f"worker rank {err.error_index} of {world} died with exit code {err.exit_code}"
                          f"{' (signal ' + err.signal_name + ')' if err.signal_name else ''}") from None
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)


def _device(config: Config, local_rank: int) -> torch.device:
    kind = config.execution.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("execution.device = 'cuda' but CUDA is not available; use device: cpu or auto")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                               "start at most one worker per GPU")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _worker(rank: int, world: int, config: Config, out_dir: str, init_method: Optional[str],
            trace: Optional[str] = None) -> None:
    """Body of every worker: join the group, build the job, run the executor, gather reports to rank 0."""
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = _device(config, local_rank)
    timeout = datetime.timedelta(seconds=config.execution.timeout_s)
    threads = config.execution.threads_per_worker or (max(1, (os.cpu_count() or 1) // world) if init_method else None)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    group = None
    if init_method is not None:
        backend = config.execution.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)
        group = dist.group.WORLD
    try:
        start = time.perf_counter()
        job = build_job(config)
        executor = get_executor(config.execution.executor)(config)
        executor.check(world, job.num_blocks)
        ctx = WorkerContext(rank, world, local_rank, device, timeout, group, Tracer(enabled=trace is not None))
        if group is not None:
            dist.barrier(group=group)  # start the clocks together

        def save_block(index: int, state: Dict[str, torch.Tensor]) -> None:
            atomic_save({k: v.detach().cpu() for k, v in state.items()}, block_path(out_dir, index))

        begin = time.time()
        report = executor.run_worker(ctx, job, save_block)
        report.start, report.end, report.spans = begin, time.time(), ctx.tracer.spans
        report.peak_rss_mb = peak_rss_mb()
        reports: List[WorkerReport] = [report]
        if group is not None:
            gathered: Optional[List[Any]] = [None] * world if rank == 0 else None
            dist.gather_object(report, gathered, dst=0, group=group)
            reports = gathered if rank == 0 else []
        if rank == 0:
            if trace is not None:
                write_chrome_trace(trace, {r.rank: r.spans for r in reports}, {r.rank: r.label for r in reports})
            _write_library(out_dir, config, world, job.num_blocks, reports, time.perf_counter() - start, job)
    finally:
        if group is not None:
            dist.destroy_process_group()
        torch.set_num_threads(previous_threads)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_library(out_dir: str, config: Config, world: int, num_blocks: int, reports: List[WorkerReport],
                   wall_s: float, job) -> None:
    counters: Dict[str, int] = {}
    blocks: Dict[int, Any] = {}
    for report in reports:
        for name, value in report.counters.items():
            counters[name] = counters.get(name, 0) + value
        for index, block in report.blocks.items():
            blocks[index] = block
    missing = sorted(set(range(num_blocks)) - set(blocks))
    if missing:
        raise WorkerError(f"no worker reported blocks {missing}; the executor's assignment is incomplete")
    samples = job.steps_per_block * config.data.batch_size
    manifest = {
        "executor": config.execution.executor,
        "workers": world,
        "num_blocks": num_blocks,
        "config": config.to_dict(),
        "base_dir": str(Path(config.base_dir).resolve()),
        "blocks": [
            {"index": i, "file": block_path(".", i).name, "choices": getattr(job.spec.student[i], "choices", {}),
             "losses": blocks[i].losses, "steps": blocks[i].steps}
            for i in range(num_blocks)
        ],
        "counters": {**counters, "samples_per_block": samples,
                     "teacher_block_forwards_per_sample": counters.get("teacher_block_forwards", 0) / samples,
                     "samples_loaded_per_sample": counters.get("samples_loaded", 0) / samples},
        "wall_time_s": wall_s,
        "train_time_s": max(r.end for r in reports) - min(r.start for r in reports),
        "ranks": [{"rank": r.rank, "label": r.label, "train_time_s": r.end - r.start,
                   "peak_rss_mb": r.peak_rss_mb,
                   "busy_fraction": busy_fraction(r.spans, r.start, r.end) if r.spans else None}
                  for r in sorted(reports, key=lambda r: r.rank)],
    }
    write_manifest(out_dir, manifest)
