"""The third-party warnings ``nni-pipebd`` hides (harmless on the supported stack); ``-v`` shows them again."""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, Tuple, Type

__all__ = ["KNOWN_WARNINGS", "ENV", "hide_known_warnings", "hide_if_asked", "hide_in_script", "command_warnings"]

ENV = "NNI_PIPEBD_WARNINGS"
"""``hide``: every process of this run (spawned workers too) hides :data:`KNOWN_WARNINGS`; ``show``: it does not.

The CLI sets it (``show`` under ``-v``); spawned workers inherit it with the environment, and the package hides the
warnings on import when it says ``hide`` — before the worker's first import of NNI, which is when NNI warns.
"""

_THIRD_PARTY = r"(nni|torch|torchvision|pytorch_lightning|lightning_fabric|lightning_utilities|pkg_resources|" \
               r"setuptools|sklearn|matplotlib|tensorboard|tensorboardX)(\.|$)"

KNOWN_WARNINGS: Tuple[Tuple[str, Type[Warning], str], ...] = (
    # NNI 3.0 walks torch.nn at import and warns about every class it does not know (torch.nn.parameter.Buffer,
    # LinearCrossEntropyOptions, ...): "... is found to be not a nn.Module, which is unexpected".
    (r".*is found to be not a nn\.Module", RuntimeWarning, r"nni(\.|$)"),
    # Deprecations inside the libraries we stand on (e.g. Lightning's use of torch's LeafSpec, NNI's pkg_resources):
    # nothing a user of nni-pipebd can act on.
    ("", DeprecationWarning, _THIRD_PARTY),
    ("", PendingDeprecationWarning, _THIRD_PARTY),
    ("", FutureWarning, _THIRD_PARTY),
    # Lightning's advice for a data loader without worker processes: our loaders are small in-memory data sets.
    (r".*does not have many workers", UserWarning, r"(pytorch_lightning|lightning_fabric)(\.|$)"),
)
"""(message regex, category, module regex) of every hidden warning, as :func:`warnings.filterwarnings` takes them."""


def hide_known_warnings() -> None:
    """Ignore :data:`KNOWN_WARNINGS` in this process (calling it twice adds no duplicate filters)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def hide_if_asked() -> bool:
    """Hide :data:`KNOWN_WARNINGS` when the environment says so (:data:`ENV` = ``hide``); returns whether it did.

    The hook of processes the CLI starts (spawned workers): they inherit its environment, not its warning filters.
    """
    if os.environ.get(ENV, "").strip().lower() == "hide":
        hide_known_warnings()
        return True
    return False


def hide_in_script() -> None:
    """For a script or ``python -m`` entry point, before it imports torch or NNI: hide :data:`KNOWN_WARNINGS` here
    and in the processes it starts, as the CLI does (``NNI_PIPEBD_WARNINGS=show`` in the environment shows them)."""
    os.environ.setdefault(ENV, "hide")
    hide_if_asked()


@contextlib.contextmanager
def command_warnings(verbose: bool) -> Iterator[None]:
    """Run one CLI command: :data:`KNOWN_WARNINGS` hidden (``verbose=False``) or shown, in its workers too.

    Sets :data:`ENV` for the processes the command starts; the filters and :data:`ENV` are restored on exit, so a
    caller of :func:`nni_pipebd.cli.main` in its own process (a test, a notebook) keeps its own settings.
    """
    previous = os.environ.get(ENV)
    os.environ[ENV] = "show" if verbose else "hide"
    try:
        with warnings.catch_warnings():
            if not verbose:
                hide_known_warnings()
            yield
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
