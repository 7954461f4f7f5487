"""The few lines ``nni-pipebd train`` / ``demo`` end with: what was made, where it lies, what to run next."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

__all__ = ["train_summary", "where_to_look"]

TRACE_VIEWERS = "open it in https://ui.perfetto.dev or chrome://tracing"


def where_to_look(library: Union[str, Path], trace: Optional[Union[str, Path]] = None,
                  report: Optional[Union[str, Path]] = None, supernet: bool = True) -> List[str]:
    """Aligned ``what: where`` lines for a block library, its timeline and report, and the next commands.

    Parameters
    ----------
    library : str or Path
        The block library folder.
    trace : str or Path, optional
        Its Chrome trace; left out when absent or not written.
    report : str or Path, optional
        A report already written; when ``None`` the line says how to write one.
    supernet : bool
        The library holds supernet blocks (next: ``search``); else a fixed student (next: ``finetune``).
    """
    lib = shlex.quote(str(library))
    rows = [("block library", f"{library}  (library.json, block_<i>.pt)")]
    if trace is not None and Path(trace).is_file():
        rows.append(("timeline", f"{trace}  ({TRACE_VIEWERS})"))
    rows.append(("report", str(report) if report is not None else f"nni-pipebd report {lib}  (Markdown with plots)"))
    rows.append(("next", f"nni-pipebd search {lib} --budget params=N  (architectures within a budget)" if supernet
                 else f"nni-pipebd finetune {lib}  (the student end to end)"))
    width = max(len(name) for name, _ in rows)
    return [f"{name + ':':<{width + 1}} {text}" for name, text in rows]


def train_summary(manifest: Dict[str, Any], out: Union[str, Path], trace: Optional[Union[str, Path]] = None) -> str:
    """The end of ``nni-pipebd train``: blocks, executor, workers, time, final block losses, then :func:`where_to_look`.

    Parameters
    ----------
    manifest : dict
        The library's ``library.json`` as :func:`nni_pipebd.executors.launch.train` returns it.
    out : str or Path
        The library folder.
    trace : str or Path, optional
        The Chrome trace the run wrote.
    """
    losses = ", ".join("-" if not block["losses"] else f"{block['losses'][-1]:.4g}" for block in manifest["blocks"])
    supernet = any(block.get("choices") for block in manifest["blocks"])
    head = (f"trained {manifest['num_blocks']} blocks with {manifest['executor']} on {manifest['workers']} "
            f"worker{'s' if manifest['workers'] != 1 else ''} in {manifest['wall_time_s']:.1f} s; "
            f"final block losses: {losses}")
    return "\n".join([head, *where_to_look(out, trace, supernet=supernet)])
