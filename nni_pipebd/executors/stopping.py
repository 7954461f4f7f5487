"""Stopping on request: signals in the lead and the workers, the stop decision, and dying with the parent."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

__all__ = ["RunStopped", "LeadSignals", "StopControl", "worker_signals", "die_with_parent", "forget_parent", "ignored_signals",
           "STOP_FILE", "STORE_KEY"]

_logger = logging.getLogger(__name__)

STOP_FILE = "stop"
"""In the spawn rendezvous folder: its presence asks the workers to stop (the lead writes the signal number)."""

STORE_KEY = "nni_pipebd/stop"
"""In the process group's store: a worker that got a signal itself (e.g. under torchrun) asks rank 0 to stop."""

_PR_SET_PDEATHSIG = 1
_REPEAT_S = 1.0  # a copy of a signal within this time is the same request (torchrun forwards what the group got)


class RunStopped(KeyboardInterrupt):
    """The run was stopped on request (SIGINT or SIGTERM) before it finished; ``library.json`` was not written.

    A ``KeyboardInterrupt``, so code that catches ``Exception`` (NNI's engines, user loops) lets it through and
    ``Experiment.run`` stops the experiment as on Ctrl-C.

    Parameters
    ----------
    signum : int
        The signal that asked for the stop.
    step : int, optional
        The step every rank stopped after and checkpointed (``None``: stopped without a checkpoint).
    out_dir : str, optional
        The run's folder (what ``--resume`` takes).
    """

    def __init__(self, signum: int, step: Optional[int] = None, out_dir: Optional[str] = None):
        self.signum, self.step, self.out_dir = int(signum), step, out_dir
        name = signal.Signals(self.signum).name
        if step is None:
            text = f"stopped on {name} before any checkpoint could be written; nothing to resume"
        else:
            text = f"stopped on {name} after step {step}; every rank checkpointed it in {out_dir}"
        super().__init__(text)

    @property
    def resumable(self) -> bool:
        return self.step is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports a signalled program."""
        return 128 + self.signum

    def __reduce__(self):
        return type(self), (self.signum, self.step, self.out_dir)


class LeadSignals:
    """Context manager of the process that started the workers: SIGINT / SIGTERM ask for a stop, a second one
    stops at once.

    The first signal writes :data:`STOP_FILE` into ``folder`` (when given) and sets :attr:`signum`; a second one
    (later than a second after the first) sets :attr:`forced` and raises :class:`RunStopped` without a step where
    the main thread is (the launcher then kills the workers). Outside the main thread no handler can be
    installed: then nothing changes (the default handlers stay).
    """

    def __init__(self, folder: Optional[str] = None):
        self.folder = folder
        self.signum: Optional[int] = None
        self.forced = False
        self._first = 0.0
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "LeadSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first = signum, now
            if self.folder is not None:
                write_stop_file(self.folder, signum)
            _logger.warning("%s: stopping at the next step boundary with a checkpoint (send it again to stop at "
                            "once, without one)", signal.Signals(signum).name)
        elif now - self._first > _REPEAT_S and not self.forced:
            self.forced = True
            _logger.warning("%s again: stopping at once, without a checkpoint", signal.Signals(signum).name)
            raise RunStopped(self.signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None


def write_stop_file(folder: str, signum: int) -> None:
    """Ask the workers that watch ``folder`` to stop (atomically: a reader never sees an empty file)."""
    tmp = Path(folder, STOP_FILE + ".tmp")
    tmp.write_text(str(int(signum)))
    os.replace(tmp, Path(folder, STOP_FILE))


class StopControl:
    """A worker's view of the stop request.

    The request comes from this process's signal handler (:func:`worker_signals`, or :class:`LeadSignals` when the
    worker runs in the lead), from the lead's :data:`STOP_FILE` in ``folder``, or from another rank through the
    process group's ``store``. Only the *leader* (rank 0) turns a request into a decision, at the start of a step:
    that step is the last, and the executors pass the decision along with the step's data and gradients, so every
    rank stops after the same step (see ``docs/reliability.md``). Other ranks forward a request they got
    themselves to the leader through the store.
    """

    def __init__(self, folder: Optional[str] = None, store: Any = None, lead: Optional[LeadSignals] = None):
        self.folder, self.store, self.lead = folder, store, lead
        self.signum: Optional[int] = None  # set by this process's handler
        self.forwarded = False
        self.pending = False  # a stop was decided at a block's last step; the executor stops once it is saved
        self.stopped_at: Optional[int] = None

    def local_signal(self) -> Optional[int]:
        if self.signum is not None:
            return self.signum
        return self.lead.signum if self.lead is not None else None

    def requested(self) -> Optional[int]:
        """The signal number of a pending request from any source (``None``: none)."""
        local = self.local_signal()
        if local is not None:
            return local
        if self.folder is not None:
            try:
                return int(Path(self.folder, STOP_FILE).read_text() or signal.SIGTERM)
            except (OSError, ValueError):
                pass
        if self.store is not None:
            try:
                if self.store.check([STORE_KEY]):
                    return int(self.store.get(STORE_KEY))
            except (RuntimeError, ValueError):
                pass
        return None

    def poll(self, leader: bool) -> bool:
        """At the start of a step: whether it is to be the last one (always ``False`` off the leader)."""
        if leader:
            return self.requested() is not None
        local = self.local_signal()
        if local is not None and not self.forwarded and self.store is not None:
            self.store.set(STORE_KEY, str(local))
            self.forwarded = True
        return False

    def stop(self, step: Optional[int]) -> "RunStopped":
        """The exception that ends this worker after ``step`` (checkpointed; ``None``: without a checkpoint)."""
        self.stopped_at = step
        return RunStopped(self.requested() or signal.SIGTERM, step)


def worker_signals(control: StopControl, ignore_sigint: bool) -> None:
    """Install a worker's handlers: SIGTERM (and SIGINT unless ``ignore_sigint``) asks for a stop; a repeat later
    than a second exits at once (128 + signal)."""
    first = [0.0]

    def handle(signum, _frame):
        now = time.monotonic()
        if control.signum is None:
            control.signum, first[0] = signum, now
        elif now - first[0] > _REPEAT_S:
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else handle)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def ignored_signals() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM here while processes are started: a started program inherits an ignored signal
    (and Python keeps SIGINT ignored), so a signal sent to the process group while the workers import does not kill
    them; they install their own handlers (:func:`worker_signals`) once ready. Only the main thread can do this
    (elsewhere nothing changes); this process's handlers are back as soon as the processes are started (a signal
    that arrives in those milliseconds is lost)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def die_with_parent(parent_pid: Optional[int] = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``); exit now if the
    parent (``parent_pid``) is already gone. Elsewhere a thread polls the parent's pid."""
    expected = parent_pid if parent_pid is not None else os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError):
        threading.Thread(target=_watch_parent, args=(expected,), name="nni_pipebd-parent", daemon=True).start()
    if os.getppid() != expected:  # the parent died before the kernel was told
        os._exit(1)


def forget_parent() -> None:
    """Undo :func:`die_with_parent`'s kernel request (a torchrun worker's process outlives its run, e.g. in tests)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _watch_parent(expected: int) -> None:
    while os.getppid() == expected:
        time.sleep(1.0)
    os._exit(1)
