"""Fault injection for tests: ``NNI_PIPEBD_FAULT="rank=R,step=S[,kind=raise|kill|slow]"`` fails rank R at step S.

``slow`` does not fail: it makes rank R sleep ``seconds`` (default 0.3) before every step from S on, so that a test can
signal a run while it trains.
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
    spec = os.environ.get(ENV)
    if not spec:
        return
    try:
        fields = dict(item.split("=", 1) for item in spec.split(","))
        target_rank, target_step = int(fields["rank"]), int(fields["step"])
        kind = fields.get("kind", "raise")
        seconds = float(fields.get("seconds", 0.3))
    except (KeyError, ValueError):
        raise ValueError(f"{ENV} = {spec!r}; expected 'rank=R,step=S[,kind=raise|kill|slow][,seconds=X]'") from None
    if kind == "slow":
        if rank == target_rank and step >= target_step:
            time.sleep(seconds)
        return
    if rank != target_rank or step != target_step:
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault at rank {rank}, step {step} ({ENV})")
