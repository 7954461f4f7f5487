"""Launching workers — in this process, by local spawn (file store rendezvous) or under torchrun (env://)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import resource
import signal
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.distributed as dist

from ..config import Config, ConfigError
from ..job import build_job
from ..library import atomic_save, save_object_file, block_path, load_manifest, remove_stale, write_manifest, MANIFEST
from ..spec.pretrain import prepare_teacher
from ..report.metrics import LOGS, EpochResults, MetricsWriter
from ..report.progress import ProgressBars, ProgressWriter
from ..report.trace import Tracer, busy_fraction, write_chrome_trace
from .base import WorkerContext, WorkerReport, get_executor, rss_mb
from .checkpoint import CHECKPOINTS, CheckpointError
from .processes import (WorkerError, deterministic_kernels, device_kind, join_group, resolve_device,
                        run_processes, worker_threads)
from .torchrun import under_torchrun
from .stopping import LeadSignals, RunStopped, StopControl, die_with_parent, forget_parent, worker_signals

__all__ = ["train", "WorkerError", "RunStopped", "under_torchrun"]

_logger = logging.getLogger(__name__)


def train(config: Config, out_dir: Union[str, Path], *, overwrite: bool = False,
          trace: Union[str, Path, None] = None, resume: bool = False,
          progress: bool = False, teacher: Optional[torch.nn.Module] = None,
          student: Optional[torch.nn.Module] = None,
          on_epoch: Optional[Callable[[int, Dict[int, float]], None]] = None) -> Optional[Dict[str, Any]]:
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
    resume : bool
        Continue the interrupted run in ``out_dir`` from its latest checkpoint (same config required); the
        result equals an uninterrupted run.
    progress : bool
        Draw a progress bar per worker (in this process only; workers never write to the terminal).
    teacher : torch.nn.Module, optional
        The teacher itself, instead of the config's: it is saved whole into ``out_dir`` (``teacher-<hash>.pt``) and
        every worker loads it from there, so its class must be importable (defined in a module, not in ``__main__``
        of an interactive session); its weights travel in the file. The library's config names that file.
    student : torch.nn.Module, optional
        The student space itself, instead of the config's: an NNI ``ModelSpace`` whose ``blocks`` are the block spaces
        (one per teacher block, or one fewer for a fresh copy of the teacher's head); saved into ``out_dir``
        (``student-<hash>.pt``) like ``teacher`` and named by the library's config (``model.student.module``).
    on_epoch : callable, optional
        ``on_epoch(epoch, {block: loss})`` is called in this process while training runs, as soon as every block has
        finished epoch ``epoch`` (counting from 1) or stopped before it (not under torchrun). Every rank also logs
        each step's block losses to ``out_dir/logs/rank<r>`` (CSV; TensorBoard when installed).

    Raises
    ------
    RunStopped
        A SIGINT or SIGTERM asked the run to stop: every rank stopped after the same step and checkpointed it
        (``resume=True`` continues it, bitwise as if never stopped); a second signal stops at once, without a
        checkpoint. ``library.json`` is not written. A ``KeyboardInterrupt``.
    WorkerError
        A worker failed; the others were stopped.
    """
    if teacher is not None:
        from ..spec.teachers import save_teacher_module

        config = config.with_teacher(save_teacher_module(teacher, out_dir))
    if student is not None:
        config = config.with_student(save_object_file(student, out_dir, "student"))
    executor_cls = get_executor(config.execution.executor)
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else config.execution.workers
    executor_cls(config).check(world)
    device_kind(config)  # a precision the device cannot run fails here, before any worker starts
    out_dir = Path(out_dir)
    rank = int(os.environ.get("RANK", 0)) if under_torchrun() else 0
    trace = None if trace is None else str(trace)
    original = config
    if rank == 0:
        _prepare_out_dir(out_dir, overwrite, resume, config)
        prepare_teacher(config, out_dir / "logs")
    if config.execution.plan == "auto" and not under_torchrun():
        from .autoplan import auto_plan

        plan, _ = auto_plan(config, world)
        path = plan.save(out_dir / "plan.json")
        _logger.info("automatic hybrid distribution for %d workers (saved to %s):\n%s", world, path, plan.grid())
        config = config.replace(execution={"plan": str(path.resolve())})
    options = {"trace": trace, "resume": resume}
    try:
        if under_torchrun():
            _worker(int(os.environ["RANK"]), world, config, str(out_dir), "env://", options)
        elif world == 1 and not executor_cls.needs_process_group:
            with tempfile.TemporaryDirectory(prefix="nni_pipebd_progress_") as folder, LeadSignals() as signals:
                with ProgressBars(folder, 1, enabled=progress), EpochResults(folder, 1, on_epoch):
                    _worker(0, 1, config, str(out_dir), None, {**options, "progress_dir": folder,
                                                               "lead_signals": signals})
        else:
            executor_cls(config).check(world, build_job(config).num_blocks)  # fail here, not in every worker
            _spawn(world, config, out_dir, options, progress, on_epoch)
    except RunStopped as stopped:
        if rank == 0 and stopped.resumable and not (out_dir / CHECKPOINTS / "config.json").is_file():
            atomic_save(original.to_dict(), out_dir / CHECKPOINTS / "config.json")  # what --resume compares with
        _logger.warning("%s", RunStopped(stopped.signum, stopped.step, str(out_dir)))
        raise RunStopped(stopped.signum, stopped.step, str(out_dir)) from None
    return load_manifest(out_dir) if rank == 0 else None


def _prepare_out_dir(out_dir: Path, overwrite: bool, resume: bool, config: Config) -> None:
    flag = "--resume" if resume else "--out"
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{flag} {out_dir} is a file, not a folder; the block library needs a folder: choose "
                              f"another {flag}")
    checkpoints = out_dir / CHECKPOINTS
    saved_config = checkpoints / "config.json"
    if resume:
        if (out_dir / MANIFEST).exists():
            raise FileExistsError(f"{out_dir} holds a finished block library; there is nothing to resume")
        if not saved_config.is_file():
            raise CheckpointError(f"{out_dir} holds no checkpoints of an interrupted run ({saved_config} is "
                                  "missing); train with execution.checkpoint_every set to be able to resume")
        before = json.loads(saved_config.read_text())
        try:  # settings added to the config since the run was interrupted take their defaults
            before = Config.from_dict(before, config.base_dir).to_dict()
        except (ConfigError, TypeError):
            pass  # compared as saved: every difference is named
        changed = _changed_keys(before, config.to_dict())
        if changed:
            raise CheckpointError(f"cannot resume {out_dir} with a changed config: {', '.join(changed)}; resume "
                                  "with the config of the interrupted run or start a new --out folder")
        _logger.info("resuming the interrupted run in %s", out_dir)
        return
    if (out_dir / MANIFEST).exists() or saved_config.is_file():
        what = "a block library" if (out_dir / MANIFEST).exists() else "an interrupted run (use --resume)"
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds {what}; choose another --out folder or pass --overwrite")
        if (out_dir / MANIFEST).exists():
            remove_stale(out_dir, range(load_manifest(out_dir).get("num_blocks", 0)))
        shutil.rmtree(checkpoints, ignore_errors=True)
        shutil.rmtree(out_dir / LOGS, ignore_errors=True)
        _logger.info("replacing the contents of %s", out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".nni_pipebd_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise type(err)(err.errno, f"--out {out_dir}: cannot create or write the folder ({err.strerror}); choose a "
                                   "writable --out folder") from None
    if config.execution.checkpoint_every:
        checkpoints.mkdir(exist_ok=True)
        atomic_save(config.to_dict(), saved_config)


def _changed_keys(before: Dict[str, Any], after: Dict[str, Any], where: str = "") -> List[str]:
    keys = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{where}{key}.")
        elif a != b:
            keys.append(f"{where}{key} ({a!r} -> {b!r})")
    return keys


def _spawn(world: int, config: Config, out_dir: Path, options: Dict[str, Any], progress: bool = False,
           on_epoch: Optional[Callable[[int, Dict[int, float]], None]] = None) -> None:
    """Start ``world`` workers; if one fails, the others are stopped and the root cause is named.

    SIGINT / SIGTERM to this process (or its process group) ask the workers to stop after a common step with a
    checkpoint (:class:`RunStopped`); a second signal kills them at once. Workers die with this process, however
    it dies (``PR_SET_PDEATHSIG``).
    """
    rendezvous = tempfile.mkdtemp(prefix="nni_pipebd_rdzv_")
    options = {**options, "role_dir": rendezvous, "progress_dir": rendezvous, "spawned": True}
    try:
        with LeadSignals(rendezvous) as signals:
            init = f"file://{os.path.join(rendezvous, 'store')}"
            try:
                with EpochResults(rendezvous, world, on_epoch):
                    run_processes(_worker, world, (config, str(out_dir), init, options), rendezvous,
                                  ProgressBars(rendezvous, world, enabled=progress))
            except WorkerError as err:
                if signals.requested and any(Path(rendezvous, f"rank{r}.stopped").is_file() for r in range(world)):
                    raise RunStopped(signals.signum) from None  # ls: ranks stop independently, none resumable
                raise WorkerError(f"{err}; the other workers were stopped{_resume_hint(config, out_dir)}") from None
            stopped = _stopped(rendezvous, world)
            if stopped is not None:
                raise stopped
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)


def _stopped(rendezvous: str, world: int) -> Optional[RunStopped]:
    """The stop every rank reported (``rank<r>.stopped``: signal and step), else ``None`` (the run finished)."""
    reports = {}
    for rank in range(world):
        path = Path(rendezvous, f"rank{rank}.stopped")
        if path.is_file():
            signum, _, step = path.read_text().partition(" ")
            reports[rank] = (int(signum), None if step in ("", "None") else int(step))
    if not reports:
        return None
    steps = {step for _, step in reports.values()}
    if len(reports) < world or len(steps) > 1:
        raise WorkerError(f"the workers stopped inconsistently: {reports} (rank: (signal, step)) of {world} ranks; "
                          "the checkpoints may not share a step — resume will say so; please report this")
    signum, step = reports[min(reports)]
    return RunStopped(signum, step)


def _resume_hint(config: Config, out_dir: Path) -> str:
    if config.execution.checkpoint_every:
        return f"; continue from the last checkpoint with `nni-pipebd train CONFIG --resume {out_dir}`"
    return ""


def _worker(rank: int, world: int, config: Config, out_dir: str, init_method: Optional[str],
            options: Optional[Dict[str, Any]] = None) -> None:
    """Body of every worker: join the group, build the job, run the executor, gather reports to rank 0."""
    options = options or {}
    trace = options.get("trace")
    stop = StopControl(folder=options.get("role_dir"), lead=options.get("lead_signals"))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if options.get("spawned"):  # a process of its own (dying with the lead): it leaves Ctrl-C to the lead
        worker_signals(stop, ignore_sigint=True)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(config, local_rank)
    timeout = datetime.timedelta(seconds=config.execution.timeout_s)
    local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if init_method == "env://" else world
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads(config, local_workers))
    group = None
    if init_method is not None:
        group = join_group(rank, world, device, config.execution.backend, init_method, timeout)
        stop.store = _default_store()
        if not options.get("spawned"):  # torchrun: it forwards SIGINT / SIGTERM to every worker, rank 0 decides
            die_with_parent()
            worker_signals(stop, ignore_sigint=False)
    kernels = deterministic_kernels(config.execution.deterministic)
    kernels.__enter__()
    try:
        start = time.perf_counter()
        job = build_job(config)
        executor = get_executor(config.execution.executor)(config)
        executor.check(world, job.num_blocks)
        ctx = WorkerContext(rank, world, local_rank, device, timeout, group, Tracer(enabled=trace is not None),
                            out_dir, bool(options.get("resume")), options.get("role_dir"),
                            ProgressWriter(options.get("progress_dir"), rank), stop,
                            MetricsWriter(out_dir, options.get("progress_dir"), rank, bool(options.get("resume"))))
        if group is not None:
            dist.barrier(group=group)  # start the clocks together

        def save_block(index: int, state: Dict[str, torch.Tensor]) -> None:
            atomic_save({k: v.detach().cpu() for k, v in state.items()}, block_path(out_dir, index))

        begin = time.time()
        try:
            report = executor.run_worker(ctx, job, save_block)
        except RunStopped as stopped:
            if ctx.role_dir is not None:
                Path(ctx.role_dir, f"rank{rank}.stopped").write_text(f"{stopped.signum} {stopped.step}")
            if group is not None and stopped.step is not None:
                dist.barrier(group=group)  # every rank stopped after the same step: leave together
            raise
        ctx.metrics.close()
        report.start, report.end, report.spans = begin, time.time(), ctx.tracer.spans
        report.peak_rss_mb = rss_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        reports: List[WorkerReport] = [report]
        if group is not None:
            gathered: Optional[List[Any]] = [None] * world if rank == 0 else None
            dist.gather_object(report, gathered, dst=0, group=group)
            reports = gathered if rank == 0 else []
        if rank == 0:
            if trace is not None:
                write_chrome_trace(trace, {r.rank: r.spans for r in reports}, {r.rank: r.label for r in reports})
            _write_library(out_dir, config, world, job.num_blocks, reports, time.perf_counter() - start, job)
            shutil.rmtree(Path(out_dir) / CHECKPOINTS, ignore_errors=True)  # the library is complete
    finally:
        kernels.__exit__(None, None, None)
        if group is not None:
            dist.destroy_process_group()
        torch.set_num_threads(previous_threads)
        if init_method is not None and not options.get("spawned"):  # torchrun: the caller's process lives on
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            forget_parent()


def _default_store():
    """The process group's key-value store (``None`` where torch hides it)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


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
             "losses": blocks[i].losses, "steps": blocks[i].steps, "stopped": blocks[i].stopped}
            for i in range(num_blocks)
        ],
        "counters": {**counters, "samples_per_block": samples,
                     "teacher_block_forwards_per_sample": counters.get("teacher_block_forwards", 0) / samples,
                     "samples_loaded_per_sample": counters.get("samples_loaded", 0) / samples},
        "wall_time_s": wall_s,
        "train_time_s": max(r.end for r in reports) - min(r.start for r in reports),
        "ranks": [{"rank": r.rank, "label": r.label, "train_time_s": r.end - r.start,
                   "peak_rss_mb": r.peak_rss_mb, "rss_mb_per_epoch": r.rss_mb_per_epoch,
                   "busy_fraction": busy_fraction(r.spans, r.start, r.end) if r.spans else None}
                  for r in sorted(reports, key=lambda r: r.rank)],
    }
    write_manifest(out_dir, manifest)
