"""Warm worker start: workers fork from a server process that imported what they need once."""

from __future__ import annotations

import multiprocessing
import os
import threading
from multiprocessing import forkserver
from typing import Optional

__all__ = ["ENV", "PRELOAD", "start_method", "start_server", "start_server_for", "warm_start", "server_pid",
           "leave_server"]

ENV = "NNI_PIPEBD_START_METHOD"
"""``forkserver`` (the default where the platform has it) or ``spawn`` (every worker imports torch and NNI itself:
slower to start, nothing shared)."""

PRELOAD = "nni_pipebd.executors.preload"
"""The module the server imports before it forks anything (torch, NNI and the worker code)."""

_METHODS = ("forkserver", "spawn")
_lock = threading.Lock()


def start_method() -> str:
    """How worker processes start here: :data:`ENV` if set, else ``forkserver`` where available, else ``spawn``."""
    chosen = os.environ.get(ENV, "").strip().lower()
    if chosen:
        if chosen not in _METHODS:
            raise ValueError(f"{ENV} = {chosen!r} is not valid; choose one of {list(_METHODS)} (or unset it)")
        return chosen
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def start_server() -> Optional[int]:
    """Start the fork server now (once per process) and return its pid; ``None`` when workers spawn instead.

    Called as soon as a command knows it will start workers, so that the server's imports run beside this
    process's own. The server lives as long as this process: every later run forks its workers from it. It is a
    fresh interpreter that never touched CUDA; it inherits this process's environment now, and each worker gets the
    environment of its own start (see :func:`~nni_pipebd.executors.processes.run_processes`).
    """
    if start_method() != "forkserver":
        return None
    with _lock:
        server = forkserver._forkserver
        if server._forkserver_pid is None:
            multiprocessing.set_forkserver_preload([PRELOAD])
        server.ensure_running()
        return server._forkserver_pid


def start_server_for(executor: str, workers: int) -> None:
    """Start the server now if a run of ``executor`` on ``workers`` workers will start worker processes: all but the
    reference on one worker (it runs in this process), and none under torchrun (its ranks are torchrun's)."""
    from .torchrun import under_torchrun

    if not under_torchrun() and (executor != "reference" or workers != 1):
        start_server()


def warm_start() -> str:
    """The ``start_method`` to give ``torch.multiprocessing.start_processes`` (or a ``multiprocessing`` context) for
    workers that start warm: the server started first, with its preloaded modules (a server that multiprocessing
    started on its own would import nothing)."""
    start_server()
    return start_method()


def server_pid() -> Optional[int]:
    """The pid of this process's fork server, if one is running."""
    return forkserver._forkserver._forkserver_pid


def leave_server() -> None:
    """In a worker forked by the server: drop the lead's "alive" pipe the server handed over.

    The server exits when every holder of that pipe has closed it; a worker that kept it would keep the server
    alive after the lead died, and with it the worker itself (whose death signal is tied to the server).
    """
    server = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        try:
            os.close(server._forkserver_alive_fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None
