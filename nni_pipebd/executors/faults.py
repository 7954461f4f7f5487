"""Fault injection for tests: ``NNI_PIPEBD_FAULT="rank=R,step=S[,kind=raise|kill|slow|wait]"`` fails rank R at step S.

``slow`` does not fail: it makes rank R sleep ``seconds`` (default 0.3) before every step from S on (``every=K``: every
K-th step from S), so that a test can signal a run while it trains or make ranks slow by turns. ``wait`` (with
``file=PATH``) blocks rank R before step S until PATH exists (failing after ``seconds``, default 120): a test that
signals a run writes PATH after the signal, so the run cannot end before the signal, whatever the load. Several faults
are separated by ``;``.
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["ENV", "InjectedFault", "inject"]

ENV = "NNI_PIPEBD_FAULT"


class InjectedFault(RuntimeError):
    """The failure asked for by ``NNI_PIPEBD_FAULT``."""


def inject(rank: int, step: int) -> None:
    """Fail here if ``NNI_PIPEBD_FAULT`` names this rank and step (``step`` counts this worker's steps from 0)."""
    for spec in filter(None, os.environ.get(ENV, "").split(";")):
        _inject(spec, rank, step)


def _inject(spec: str, rank: int, step: int) -> None:
    try:
        fields = dict(item.split("=", 1) for item in spec.split(","))
        target_rank, target_step = int(fields["rank"]), int(fields["step"])
        kind = fields.get("kind", "raise")
        seconds = float(fields.get("seconds", 120 if kind == "wait" else 0.3))
        every = int(fields.get("every", 1))
    except (KeyError, ValueError):
        raise ValueError(f"{ENV} = {spec!r}; expected 'rank=R,step=S[,kind=raise|kill|slow|wait][,seconds=X]"
                         "[,every=K][,file=PATH]' (several separated by ';')") from None
    if kind == "slow":
        if rank == target_rank and step >= target_step and (step - target_step) % every == 0:
            time.sleep(seconds)
        return
    if rank != target_rank or step != target_step:
        return
    if kind == "wait":
        _wait_for(fields.get("file"), seconds, spec, rank, step)
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault at rank {rank}, step {step} ({ENV})")


def _wait_for(path, seconds: float, spec: str, rank: int, step: int) -> None:
    """Block until ``path`` exists; :class:`InjectedFault` when it has not appeared after ``seconds``."""
    if not path:
        raise ValueError(f"{ENV} = {spec!r}: kind=wait needs file=PATH, the file whose appearance ends the wait")
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise InjectedFault(f"injected wait at rank {rank}, step {step}: {path} did not appear within {seconds:g} "
                                f"s ({ENV}); the test must write it once it has signalled the run")
        time.sleep(0.05)
