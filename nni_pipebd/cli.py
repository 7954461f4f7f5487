"""The ``nni-pipebd`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["main"]

_logger = logging.getLogger("nni_pipebd")


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .executors.launch import train

    config = load_config(args.config)
    execution, distill = {}, {}
    if args.executor is not None:
        execution["executor"] = args.executor
    if args.workers is not None:
        execution["workers"] = args.workers
    if args.epochs is not None:
        distill["epochs"] = args.epochs
    if args.max_steps is not None:
        distill["max_steps_per_epoch"] = args.max_steps
    if args.seed is not None:
        distill["seed"] = args.seed
    if args.boundaries is not None:
        execution["boundaries"] = _int_list(args.boundaries, "--boundaries")
    if args.no_decoupled:
        execution["decoupled"] = False
    config = config.replace(execution=execution, distill=distill)
    out = Path(args.out or f"runs/{Path(args.config).stem}-{config.execution.executor}")
    manifest = train(config, out, overwrite=args.overwrite, trace=args.trace)
    if manifest is None:  # a torchrun rank other than 0
        return 0
    final = [round(block["losses"][-1], 6) if block["losses"] else None for block in manifest["blocks"]]
    _logger.info("block library written to %s (%d blocks, %.1f s); final block losses: %s",
                 out, manifest["num_blocks"], manifest["wall_time_s"], final)
    if args.json:
        print(json.dumps({"out": str(out), **{k: manifest[k] for k in ("executor", "workers", "num_blocks",
                                                                        "counters", "wall_time_s")}}, indent=2))
    return 0


def _int_list(text: str, flag: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be comma-separated integers, e.g. 0,2,4") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nni-pipebd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a block library (blockwise distillation)")
    train.add_argument("config", help="YAML job file (e.g. examples/digits/config.yaml)")
    train.add_argument("--executor", help="reference, dp, ls or pipebd (overrides execution.executor)")
    train.add_argument("--workers", type=int, help="worker processes (overrides execution.workers)")
    train.add_argument("--epochs", type=int, help="epochs per block (overrides distill.epochs)")
    train.add_argument("--max-steps", type=int, help="cut every epoch after this many steps")
    train.add_argument("--seed", type=int, help="overrides distill.seed")
    train.add_argument("--out", help="library folder (default runs/<config>-<executor>)")
    train.add_argument("--overwrite", action="store_true", help="replace a library already in --out")
    train.add_argument("--boundaries", help="pipebd: first block of every stage, e.g. 0,2,4")
    train.add_argument("--no-decoupled", action="store_true",
                       help="pipebd: barrier across stages before every step (teacher relaying only)")
    train.add_argument("--trace", help="write the per-rank timeline to this Chrome-trace JSON file")
    train.add_argument("--json", action="store_true", help="print a JSON summary")
    train.set_defaults(func=_train)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``nni-pipebd``; returns the exit status."""
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        _logger.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
