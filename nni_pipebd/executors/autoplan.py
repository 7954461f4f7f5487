"""Automatic hybrid distribution: profile the job (compute here, links with real workers), then solve."""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..job import build_job
from ..plan.placement import place
from ..plan.plan import Plan
from ..plan.profiler import LinkModel, Profile, load_or_none, mean_profile, profile_job, profile_key
from ..plan.solver import solve
from .processes import join_group, resolve_device, run_processes, worker_threads
from .syncbn import convert_sync_batchnorm

__all__ = ["cache_path", "get_profile", "auto_plan", "measure_links"]

_logger = logging.getLogger(__name__)

SIZES = (4 * 1024, 256 * 1024, 4 * 1024 * 1024)


def cache_path(key: str) -> Path:
    """Where a profile with ``key`` is kept (``$NNI_PIPEBD_CACHE`` or ``~/.cache/nni_pipebd``)."""
    root = Path(os.environ.get("NNI_PIPEBD_CACHE", "~/.cache/nni_pipebd")).expanduser()
    return root / "profiles" / f"{key}.json"


def get_profile(config: Config, workers: int, path: Union[str, Path, None] = None) -> Profile:
    """The job's profile for up to ``workers`` devices per stage: reused from ``path`` (or the cache) when its key
    matches, else measured: each block at every per-device batch, and the links, by ``min(workers, cores)`` worker
    processes (at least 2).

    On CPU the workers profile the blocks side by side, as many as will train at once on this machine's cores, and
    the profile takes the mean of their times: the workers of a run share the cores' caches and memory bandwidth,
    and the profile is taken under the same load. On CUDA each device is its own, and the blocks are profiled here,
    on this process's device.
    """
    threads = worker_threads(config, workers)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # measure as a worker will run
    try:
        job = build_job(config)
        device = resolve_device(config)
        key = profile_key(job, workers, device)
        path = Path(path) if path is not None else cache_path(key)
        profile = load_or_none(path, key)
        if profile is not None:
            _logger.info("reusing the profile in %s", path)
            profile.paths_per_step = config.distill.paths_per_step  # in its key; absent from older profiles
            return profile
        side_by_side = device.type == "cpu" and workers > 1
        _logger.info("profiling %d blocks at 1..%d devices per stage%s", job.num_blocks, workers,
                     f" in {_worker_count(config, workers)} workers side by side" if side_by_side else "")
        profile = None if side_by_side else profile_job(job, workers, device,
                                                        split_student=_split_student(config, device, None))
    finally:
        torch.set_num_threads(previous)
    if workers > 1:
        profiles, (p2p, allreduce) = _measure(config, workers, threads if side_by_side else None)
        profile = mean_profile(profiles) if side_by_side else profile
        profile.p2p, profile.allreduce = p2p, allreduce
    profile.save(path)
    _logger.info("profile saved to %s", path)
    return profile


def auto_plan(config: Config, workers: int, profile_path: Union[str, Path, None] = None) -> Tuple[Plan, Profile]:
    """Profile (or reuse) and plan for ``workers`` devices under ``execution.memory_limit_mb``: free student
    placement (``execution.placement: free``, :func:`~nni_pipebd.plan.placement.place`) or Pipe-BD's stages
    (``stages``, :func:`~nni_pipebd.plan.solver.solve`)."""
    profile = get_profile(config, workers, profile_path)
    execution = config.execution
    plan_with = place if execution.placement == "free" else solve
    plan = plan_with(profile, workers, execution.memory_limit_mb, execution.sync_bn, execution.queue_depth)
    return plan, profile


def measure_links(config: Config, workers: int) -> Tuple[LinkModel, Dict[int, LinkModel]]:
    """Fit point-to-point and all-reduce (per group size) time models with real worker processes.

    An all-reduce's latency is what a small one adds between two convolutions (as a synchronised BatchNorm's do
    in a running step), at least its time back to back (on busy CPU cores with gloo it reads up to twice that)."""
    return _measure(config, workers, None)[1]


def _worker_count(config: Config, workers: int) -> int:
    device = resolve_device(config)
    count = min(workers, torch.cuda.device_count() if device.type == "cuda" else (os.cpu_count() or 1))
    return max(count, 2)


def _measure(config: Config, workers: int, threads: Optional[int]
             ) -> Tuple[List[Profile], Tuple[LinkModel, Dict[int, LinkModel]]]:
    """Run the workers: each profiles the job side by side with the others when ``threads`` is given (with that
    many threads), then all measure the links. Returns the workers' profiles and the fitted link models."""
    count = _worker_count(config, workers)
    folder = tempfile.mkdtemp(prefix="nni_pipebd_profile_")
    try:
        run_processes(_worker, count, (folder, config, workers, threads), folder)
        raw = json.loads((Path(folder) / "links.json").read_text())
        profiles = [Profile.load(Path(folder) / f"profile{rank}.json") for rank in range(count)] if threads else []
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    p2p = _fit(raw["p2p"])
    allreduce = {int(g): _fit(points, max(raw["allreduce_latency"][g], min(points)[1]))
                 for g, points in raw["allreduce"].items()}
    return profiles, (p2p, allreduce)


def _fit(points: List[Tuple[int, float]], latency_s: Optional[float] = None) -> LinkModel:
    """``t = a + b n`` through the measured ``(bytes, seconds)`` points: ``a`` is ``latency_s`` when given, else the
    smallest message's time (a least-squares intercept, pulled by the noise of the largest, can be off several-fold
    here); ``b`` the slope from the smallest to the largest message (both >= 0)."""
    points = sorted(points)
    (n0, t0), (n1, t1) = points[0], points[-1]
    slope = max(0.0, (t1 - t0) / (n1 - n0)) if n1 > n0 else 0.0
    return LinkModel(max(0.0, t0 if latency_s is None else latency_s), slope)


def _median_time(fn, device: str, repeats: int = 15) -> float:
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def _between_computes(allreduce, device: torch.device, calls: int = 8) -> float:
    """Seconds one small all-reduce adds between two pieces of compute, as a synchronised BatchNorm's do in a
    running step (the ranks arrive apart and the collective's threads wake on busy cores): ``calls`` convolutions
    with an all-reduce after each, less the convolutions alone, per all-reduce."""
    conv = torch.nn.Conv2d(32, 32, 3, padding=1).to(device)
    x = torch.randn(8, 32, 16, 16, device=device)

    def computes(with_allreduce: bool):
        def run():
            with torch.no_grad():
                for _ in range(calls):
                    conv(x)
                    if with_allreduce:
                        allreduce()
        return run

    alone = _median_time(computes(False), device.type)
    return max(0.0, (_median_time(computes(True), device.type) - alone) / calls)


def _split_student(config: Config, device: torch.device, group) -> Optional[Callable[[nn.Module], nn.Module]]:
    """How the runtime prepares a student whose batch is split (BatchNorm over ``group`` with ``sync_bn``)."""
    if not config.execution.sync_bn:
        return None
    return lambda student: convert_sync_batchnorm(student, group, device.type)


def _worker(rank: int, world: int, folder: str, config: Config, workers: int, threads: Optional[int]) -> None:
    """One measuring process: the job's profile (when ``threads`` is given), side by side with the others, then the
    links."""
    torch.set_num_threads(threads or 1)
    device = resolve_device(config, rank)
    device_type = device.type
    join_group(rank, world, device, config.execution.backend, f"file://{os.path.join(folder, 'store')}",
               datetime.timedelta(seconds=config.execution.timeout_s))
    try:
        if threads:  # a group of its own: a split student's BatchNorm computes as in a run, sending nothing
            alone = [dist.new_group([r]) for r in range(world)][rank]
            profile_job(build_job(config), workers, device, sync=dist.barrier,
                        split_student=_split_student(config, device, alone)).save(Path(folder) / f"profile{rank}.json")
        groups = {g: dist.new_group(list(range(g))) for g in range(2, world + 1)}
        results = {"p2p": [], "allreduce": {}, "allreduce_latency": {}}
        for size in SIZES:
            buffer = torch.zeros(size // 4, device=device)

            def ping():
                if rank == 0:
                    dist.send(buffer, 1)
                    dist.recv(buffer, 1)
                elif rank == 1:
                    dist.recv(buffer, 0)
                    dist.send(buffer, 0)

            t = _median_time(ping, device_type) if rank < 2 else 0.0
            results["p2p"].append((size, t / 2))
            dist.barrier()
        for g, group in groups.items():
            points = []
            for size in SIZES:
                buffer = torch.zeros(size // 4, device=device)
                if rank < g:
                    points.append((size, _median_time(lambda: dist.all_reduce(buffer, group=group), device_type)))
                dist.barrier()
            small = torch.zeros(SIZES[0] // 4, device=device)
            if rank < g:
                results["allreduce_latency"][g] = _between_computes(lambda: dist.all_reduce(small, group=group),
                                                                    device)
            dist.barrier()
            results["allreduce"][g] = points
        if rank == 0:
            (Path(folder) / "links.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
