"""Worker processes: a rank's device and process group, and local starting that names the rank that failed first."""

from __future__ import annotations

import datetime
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import Config
from ..precision import check_precision
from .forkserver import leave_server, server_pid, warm_start
from .stopping import RunStopped, die_with_parent, ignored_signals

__all__ = ["WorkerError", "resolve_device", "device_kind", "worker_threads", "deterministic_kernels", "join_group",
           "run_processes"]


class WorkerError(RuntimeError):
    """A worker process failed; the message names its rank and cause."""


def resolve_device(config: Config, local_rank: int = 0) -> torch.device:
    """The device of the worker with ``local_rank`` (``execution.device``; ``auto``: CUDA when present).

    Raises ``ValueError`` when ``execution.precision`` cannot run there (``fp16`` with ``auto`` resolved to CPU).
    """
    kind = device_kind(config)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("execution.device = 'cuda' but CUDA is not available; use device: cpu or auto")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                               "start at most one worker per GPU")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def device_kind(config: Config) -> str:
    """``cuda`` or ``cpu``: what ``execution.device`` resolves to here (no side effects), its precision checked."""
    kind = config.execution.device
    where = "execution.device = 'cuda'" if kind == "cuda" else "execution.device = 'cpu'"
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
        where = "execution.device = 'auto'" + ("" if kind == "cuda" else " (no GPU visible)")
    check_precision(config.execution.precision, kind, where)
    return kind


def worker_threads(config: Config, local_workers: int) -> int:
    """Torch threads of each worker: ``execution.threads_per_worker``, else this machine's cores shared among the
    ``local_workers`` workers on it.

    One rule wherever a worker runs (in the lead, spawned or forked, under torchrun), so a block computes alike
    whichever executor runs it with the same number of workers per machine. CPU kernels sum in an order that depends
    on the thread count: layouts with different numbers of workers agree bit for bit only with a fixed
    ``threads_per_worker``.
    """
    return config.execution.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, local_workers))


@contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """While inside: deterministic kernels (``execution.deterministic``); the previous settings come back after.

    Kernels without a deterministic implementation warn instead of failing (``warn_only``); cuBLAS needs
    ``CUBLAS_WORKSPACE_CONFIG`` before its first use in the process, so it is set here only if unset (a launcher
    that runs CUDA work before training should export it).
    """
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]


def join_group(rank: int, world: int, device: torch.device, backend: str, init_method: str,
               timeout: datetime.timedelta):
    """Join the default process group (``backend`` ``auto``: NCCL on CUDA, else gloo); a failure says where and why."""
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)
    except (RuntimeError, ValueError) as err:
        where = (f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}" if init_method == "env://"
                 else init_method)
        hint = ("the port is in use: pick a free MASTER_PORT (torchrun --master-port) or stop the process "
                "holding it" if "in use" in str(err).lower() else
                "check that every worker can reach it and started with the same WORLD_SIZE")
        raise RuntimeError(f"rank {rank} of {world} could not join the process group at {where} "
                           f"({type(err).__name__}: {str(err).splitlines()[0]}); {hint}") from err
    return dist.group.WORLD


def run_processes(fn: Callable[..., None], world: int, args: Sequence[Any], folder: str,
                  watching: Optional[ContextManager] = None) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` worker processes and wait for all of them.

    The workers fork from a server that has imported torch, NNI and the worker code already
    (:mod:`~nni_pipebd.executors.forkserver`; ``NNI_PIPEBD_START_METHOD=spawn`` starts fresh interpreters instead),
    with this process's environment of now. They die with this process (``PR_SET_PDEATHSIG`` against their parent,
    which dies with this process) and start with SIGINT / SIGTERM ignored (they install their own handlers).
    ``folder`` is the run's rendezvous folder: a rank that fails writes ``rank<r>.error`` there (and may announce its
    role in ``rank<r>.role``), so that the :class:`WorkerError` raised here names the rank that failed first and why;
    the other processes are then killed. ``watching`` is entered while waiting (e.g. progress bars).
    """
    context = None
    try:
        with ignored_signals():  # the workers start ignoring them, until their own handlers are in place
            method = warm_start()
            parent = os.getpid() if method == "spawn" else server_pid()
            context = mp.start_processes(_entry, args=(fn, world, folder, parent, dict(os.environ), tuple(args)),
                                         nprocs=world, join=False, start_method=method)
        try:
            with watching or nullcontext():
                while not context.join(timeout=1.0, grace_period=3.0):
                    pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            exit_codes = {rank: process.exitcode for rank, process in enumerate(context.processes)}
            raise WorkerError(_diagnose(folder, world, exit_codes, err)) from None
    finally:
        if context is not None:
            _kill(context.processes)


def _entry(rank: int, fn: Callable[..., None], world: int, folder: str, parent_pid: int, environ: Dict[str, str],
           args: tuple) -> None:
    die_with_parent(parent_pid)
    leave_server()
    os.environ.clear()  # the lead's environment at this run's start (a forked server's is that of its own start)
    os.environ.update(environ)
    try:
        fn(rank, world, *args)
    except RunStopped:
        raise
    except BaseException as err:  # the launcher names the rank that failed first, and why
        Path(folder, f"rank{rank}.error").write_text(f"{time.time()} {type(err).__name__}: {err}")
        raise


def _kill(processes) -> None:
    """SIGKILL the workers still running and reap them (a forced stop, or this process is leaving)."""
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=10)


_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "a peer may have failed",
                 "Broken pipe", "Socket closed")


def _diagnose(rendezvous: str, world: int, exit_codes: Dict[int, Optional[int]], err: Exception) -> str:
    """Name the rank that failed first: its own error, else a rank that died without one, else the earliest."""
    errors = {}
    for rank in range(world):
        path = Path(rendezvous, f"rank{rank}.error")
        if path.is_file():
            stamp, _, cause = path.read_text().partition(" ")
            errors[rank] = (float(stamp), cause)
    own = sorted((t, r) for r, (t, cause) in errors.items() if not any(p in cause for p in _PEER_FAILURE))
    died = [r for r, code in exit_codes.items() if r not in errors and code not in (0, None, -15)]
    if own:
        rank = own[0][1]
        return f"worker rank {rank} of {world} ({_role(rendezvous, rank)}) failed: {errors[rank][1]}"
    if died:
        rank, code = died[0], exit_codes[died[0]]
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        return (f"worker rank {rank} of {world} ({_role(rendezvous, rank)}) died ({how}) — killed, out of memory "
                "or crashed")
    if errors:
        rank = min(errors, key=lambda r: errors[r][0])
        return f"worker rank {rank} of {world} ({_role(rendezvous, rank)}) failed: {errors[rank][1]}"
    return f"worker rank {getattr(err, 'error_index', '?')} of {world} failed: {err}"


def _role(rendezvous: str, rank: int) -> str:
    path = Path(rendezvous, f"rank{rank}.role")
    return path.read_text() if path.is_file() else "before it took its role"
