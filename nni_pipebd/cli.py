"""The ``nni-pipebd`` command line."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from .config import load_config
from .executors.forkserver import start_server_for  # standard library only, as the next two
from .executors.stopping import RunStopped  # standard library only: the CLI's imports stay light
from .known_warnings import command_warnings

# Every command checks its arguments and its config (or library folder) first and imports torch, torchvision, NNI
# and Lightning (seconds) only then: a typo fails at once (tests/test_cli.py::test_errors_before_heavy_imports).

__all__ = ["main", "KNOWN_ERRORS", "one_line", "resume_command"]

_logger = logging.getLogger("nni_pipebd")


def _train(args: argparse.Namespace) -> int:
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
    if args.plan is not None:
        execution["plan"] = args.plan if args.plan == "auto" else str(Path(args.plan).resolve())
    if args.memory_limit is not None:
        execution["memory_limit_mb"] = args.memory_limit
    if args.checkpoint_every is not None:
        execution["checkpoint_every"] = args.checkpoint_every
    config = config.replace(execution=execution, distill=distill)
    if args.resume and args.out and Path(args.resume) != Path(args.out):
        raise ValueError(f"--resume {args.resume} and --out {args.out} name different folders; give one")
    out = Path(args.resume or args.out or f"runs/{Path(args.config).stem}-{config.execution.executor}")
    trace = args.trace or str(out / "trace.json")
    start_server_for(config.execution.executor, config.execution.workers)
    from .executors.launch import train
    from .report.summary import train_summary

    manifest = train(config, out, overwrite=args.overwrite, trace=trace, resume=bool(args.resume),
                     progress=not args.quiet)
    if manifest is None:  # a torchrun rank other than 0
        return 0
    if args.json:
        print(json.dumps({"out": str(out), **{k: manifest[k] for k in ("executor", "workers", "num_blocks",
                                                                        "counters", "wall_time_s")}}, indent=2))
    elif not args.quiet:
        print(train_summary(manifest, out, trace))
    return 0


def _profile(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    workers = args.workers or config.execution.workers
    start_server_for("pipebd", workers)  # profiling measures the links with worker processes
    from .executors.autoplan import get_profile

    profile = get_profile(config, workers, args.out)
    rows = ["block  " + "  ".join(f"g={g}: teacher/student ms, MB" for g in sorted(profile.blocks[0].teacher_s))]
    for i, block in enumerate(profile.blocks):
        cells = "  ".join(f"{1e3 * block.teacher_s[g]:7.2f}/{1e3 * block.student_s[g]:7.2f}, {block.memory_mb[g]:6.1f}"
                          for g in sorted(block.teacher_s))
        rows.append(f"{i:<5}  {cells}")
    print("\n".join(rows))
    print(f"p2p: {profile.p2p.latency_s * 1e6:.0f} us + {profile.p2p.s_per_byte * 1e9:.3f} ns/byte; all-reduce: "
          + ", ".join(f"g={g}: {m.latency_s * 1e6:.0f} us + {m.s_per_byte * 1e9:.3f} ns/byte"
                      for g, m in sorted(profile.allreduce.items())))
    return 0


def _plan(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.memory_limit is not None:
        config = config.replace(execution={"memory_limit_mb": args.memory_limit})
    start_server_for("pipebd", args.workers)  # profiling measures the links with worker processes
    from .executors.autoplan import auto_plan

    plan, profile = auto_plan(config, args.workers, args.profile)
    if args.out:
        plan.save(args.out)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.grid(len(profile.blocks)))
        slowest = "slowest stage" if plan.is_pipeline else "slowest rank"
        if plan.predicted.get("optimal") is False:
            slowest += f"; best found, none below {1e3 * plan.predicted['bound_s']:.1f} ms"
        print(f"predicted step: {1e3 * plan.predicted['step_s']:.1f} ms ({slowest})")
    return 0


def _search(args: argparse.Namespace) -> int:
    from .search.inputs import FinetuneSettings, RankingSettings
    from .search.runner import check_search, search_library

    ranking = RankingSettings(max_paths=args.max_paths, val_batches=args.val_batches,
                              calib_batches=args.calib_batches, seed=args.seed, latency_runs=args.latency_runs)
    settings = FinetuneSettings(epochs=args.epochs, seed=args.seed)
    budget = check_search(args.library, args.method, args.budget, args.top_k)
    _set_threads(args.threads)
    result = search_library(args.library, args.method, budget, top_k=args.top_k, ranking=ranking,
                            normalize=args.normalize, predictor_archs=args.predictor_archs,
                            finetune_settings=settings, seed=args.seed, device=args.device, out=args.out)
    for arch in result["architectures"]:
        quality = (f"score {arch['score']:.4f}" if "score" in arch
                   else f"predicted accuracy {arch['predicted_accuracy']:.4f}")
        _logger.info("#%d %s, cost %s: %s", arch["rank"], quality, arch["cost"], arch["sample"])
    if args.out:
        _logger.info("%d architectures written to %s", len(result["architectures"]), args.out)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .library import read_library
    from .search.inputs import FinetuneSettings, architecture_id, load_architecture

    settings = FinetuneSettings(epochs=args.epochs, mode=args.mode, lr=args.lr, init=args.init,
                                max_steps_per_epoch=args.max_steps, seed=args.seed)
    read_library(args.library)
    sample = None if args.arch is None else load_architecture(args.arch)
    _set_threads(args.threads)
    from .search.finetune import finetune
    from .search.loaded import open_library

    library = open_library(args.library)
    if sample is None and library.choices:
        raise ValueError(f"{args.library} is a supernet library ({len(library.choices)} layer choices): give "
                         "--arch ARCH.json (an NNI sample dict or the output of `nni-pipebd search --out`)")
    sample = {} if sample is None else sample
    out = args.out or str(Path(args.library) / f"finetune_{architecture_id(sample)}.json")
    result = finetune(library, sample, settings, out=out, save_model=args.save_model, device=args.device)
    _logger.info("val accuracy %.4f (teacher %.4f), %d params (teacher %d); result written to %s",
                 result["student"]["val_accuracy"], result["teacher"]["val_accuracy"],
                 result["student"]["params"], result["teacher"]["params"], out)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _blocks(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from .job import probe_teacher
    from .spec.split import trace_model

    _, sample, model = probe_teacher(config, weights=False)  # only shapes matter here
    traced = trace_model(model, sample, config.model.teacher.leaf_modules, config.model.teacher.autowrap_functions)
    default = set(traced.default_positions())
    chosen = set(default if config.model.teacher.boundaries is None else
                 (traced.position(b) for b in config.model.teacher.boundaries))
    points = traced.split_points()
    total = max(traced.total_macs, 1)
    width = max([len(p.name) for p in points] + [6])
    rows = [f"{type(model).__name__} on input {tuple(sample.shape[1:])}: {len(points)} split points, "
            f"{total / 1e6:.1f} M multiply-accumulates per sample",
            f"{'name':<{width}}  {'input shape':<18}  {'MACs before':>11}  split"]
    for point in points:
        mark = ("used" if point.position in chosen else "") + (" (default)" if point.position in default else "")
        rows.append(f"{point.name:<{width}}  {str(point.shape):<18}  {100 * point.macs_before / total:10.1f}%  "
                    f"{mark.strip()}")
    print("\n".join(rows))
    bounds = [0] + sorted(chosen) + [len(traced.ops)]
    shares = [100 * sum(traced.node_macs[a:b]) / total for a, b in zip(bounds, bounds[1:])]
    print(f"{len(shares)} blocks, MACs per block: {', '.join(f'{share:.1f}%' for share in shares)}")
    print(f"model.teacher.boundaries: {[traced.name_at(p) for p in sorted(chosen)]}")
    return 0


def _nni_meta(args: argparse.Namespace) -> int:
    from .nni import meta_path

    print(meta_path())
    return 0


def _nni_space(args: argparse.Namespace) -> int:
    from .nni.jobconfig import resolve_config, structure_config

    config = structure_config(resolve_config(args.config))
    from .job import build_job
    from .nni.space import legacy_search_space
    from .spaces.dna import path_choices

    choices = path_choices(list(build_job(config).space.blocks))
    text = json.dumps(legacy_search_space(choices), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
        _logger.info("search space (%d layer choices) written to %s", len(choices), args.out)
    else:
        print(text)
    return 0


def _set_threads(threads: Optional[int]) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads} must be >= 1")
        import torch

        torch.set_num_threads(threads)


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_summary, run_demo

    summary = run_demo(args.config, args.out, workers=args.workers, finetune_epochs=args.finetune_epochs,
                       progress=not args.quiet)
    print(format_summary(summary))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .library import load_manifest

    load_manifest(args.directory)  # a folder without a library fails before matplotlib loads
    from .report.report import write_report

    print(write_report(args.directory, args.out))
    return 0


def _version() -> str:
    """The installed distribution's version (the package's own when it runs from a source tree)."""
    try:
        return importlib.metadata.version("nni-pipebd")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def _int_list(text: str, flag: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be comma-separated integers, e.g. 0,2,4") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nni-pipebd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", "--debug", action="store_true",
                        help="debug logging, third-party warnings, and the full traceback of an error")
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
    train.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from its last checkpoint")
    train.add_argument("--checkpoint-every", type=int, help="checkpoint every this many steps (resumable)")
    train.add_argument("--boundaries", help="pipebd: first block of every stage, e.g. 0,2,4")
    train.add_argument("--no-decoupled", action="store_true",
                       help="pipebd: barrier across stages before every step (teacher relaying only)")
    train.add_argument("--plan", help="pipebd: 'auto' (profile + solve, hybrid stages) or a plan JSON file")
    train.add_argument("--memory-limit", type=float, help="pipebd --plan auto: MB per device")
    train.add_argument("--trace", help="per-rank timeline as a Chrome trace (default: OUT/trace.json)")
    train.add_argument("--json", action="store_true", help="print a JSON summary")
    train.set_defaults(func=_train)

    blocks = commands.add_parser("blocks", help="list where the teacher can be split (module, shape, cost) and "
                                                "the blocks the config uses")
    blocks.add_argument("config", help="YAML job file")
    blocks.set_defaults(func=_blocks)

    profile = commands.add_parser("profile", help="measure per-block time and memory per devices-per-stage")
    profile.add_argument("config")
    profile.add_argument("--workers", type=int, help="largest devices per stage to profile (default: execution.workers)")
    profile.add_argument("--out", help="profile JSON (default: the cache, $NNI_PIPEBD_CACHE or ~/.cache/nni_pipebd)")
    profile.set_defaults(func=_profile)

    plan = commands.add_parser("plan", help="plan teacher links and where every student block trains "
                                            "(execution.placement: free; stages: Pipe-BD AHD)")
    plan.add_argument("config")
    plan.add_argument("--workers", type=int, required=True)
    plan.add_argument("--memory-limit", type=float, help="MB per device")
    plan.add_argument("--profile", help="profile JSON to use or write (default: the cache)")
    plan.add_argument("--out", help="write the plan JSON here (for train --plan FILE)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_plan)

    demo = commands.add_parser("demo", help="the whole flow on digits: Pipe-BD vs dp, search, finetune, report")
    demo.add_argument("--config", help="job file (default: examples/digits/config.yaml)")
    demo.add_argument("--out", default="runs/demo", help="output folder (replaced)")
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--finetune-epochs", type=int, default=8)
    demo.set_defaults(func=_demo)

    report = commands.add_parser("report", help="write a Markdown report with plots for a run folder")
    report.add_argument("directory", help="a block library folder (with trace.json, plan.json, scores.json, ...)")
    report.add_argument("--out", help="report folder (default DIRECTORY/report)")
    report.set_defaults(func=_report)

    search = commands.add_parser("search", help="search a block library for architectures within a budget")
    search.add_argument("library", help="block library folder (written by `nni-pipebd train`)")
    search.add_argument("--method", choices=["dna", "donna"], default="dna",
                        help="dna: exact constrained search on block losses; donna: predictor + NSGA-II front")
    search.add_argument("--budget", required=True,
                        help="params=N, flops=N (multiply-accumulates) or latency_ms=X; suffixes k, M, G")
    search.add_argument("--top-k", type=int, help="architectures to output (dna default 5; donna: whole front)")
    search.add_argument("--max-paths", type=int, default=64, help="paths scored per block (exhaustive up to this)")
    search.add_argument("--val-batches", type=int, default=8, help="validation batches the block scores use")
    search.add_argument("--calib-batches", type=int, default=4, help="training batches of BN recalibration")
    search.add_argument("--latency-runs", type=int, default=5, help="timed runs per path (0: no latency)")
    search.add_argument("--normalize", choices=["mean", "min", "none"], default="mean",
                        help="dna: divide each block's losses by their mean / minimum before summing")
    search.add_argument("--predictor-archs", type=int, default=8, help="donna: architectures finetuned to fit it")
    search.add_argument("--epochs", type=int, default=1, help="donna: finetuning epochs of those architectures")
    search.add_argument("--seed", type=int, default=0, help="path sample, predictor architectures, evolution")
    search.add_argument("--threads", type=int, help="torch threads (latency is always timed on one)")
    search.add_argument("--device", default="cpu", help="cpu, cuda or auto (losses and finetuning)")
    search.add_argument("--out", help="write the architectures there as JSON")
    search.add_argument("--json", action="store_true", help="print the result as JSON")
    search.set_defaults(func=_search)

    tune = commands.add_parser("finetune", help="build an architecture from a library and finetune it end to end")
    tune.add_argument("library", help="block library folder")
    tune.add_argument("--arch", help="JSON: an NNI sample dict or `search --out` output (first architecture); "
                                     "not needed for a fixed-student library")
    tune.add_argument("--epochs", type=int, default=1, help="finetuning epochs")
    tune.add_argument("--lr", type=float, default=1e-3, help="learning rate (Adam, cosine schedule)")
    tune.add_argument("--mode", choices=["kd", "labels"], default="kd", help="teacher KD + labels, or labels only")
    tune.add_argument("--init", choices=["library", "scratch"], default="library", help="initial weights")
    tune.add_argument("--max-steps", type=int, help="cut every epoch after this many steps")
    tune.add_argument("--seed", type=int, default=0, help="data order (and scratch initialisation)")
    tune.add_argument("--threads", type=int, help="torch threads")
    tune.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    tune.add_argument("--out", help="result JSON (default LIBRARY/finetune_<id>.json)")
    tune.add_argument("--save-model", help="write the finetuned network's state_dict there")
    tune.add_argument("--json", action="store_true", help="print the result as JSON")
    tune.set_defaults(func=_finetune)

    meta = commands.add_parser("nni-meta", help="print the path of the tuner's meta file for `nnictl algo register --meta`")
    meta.set_defaults(func=_nni_meta)

    space = commands.add_parser("nni-space", help="print the job's search space as NNI JSON (nnictl searchSpaceFile)")
    space.add_argument("config", help="YAML job file")
    space.add_argument("--out", help="write the JSON there instead of printing it")
    space.set_defaults(func=_nni_space)
    return parser


KNOWN_ERRORS = (ValueError, OSError, RuntimeError, ArithmeticError, LookupError)
"""What a bad input, a failed worker or a broken file raises: one line (plus its hint) and exit status 2."""


def one_line(err: BaseException) -> str:
    """``Type: message`` on one line (a worker's or a library's multi-line message joined)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text}"


def resume_command(argv: List[str], out: str) -> str:
    """The command line that continues a stopped ``train``: the same arguments, ``--resume OUT`` for the folder."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--resume"):
            skip = True
        elif arg == "--overwrite" or arg.startswith(("--out=", "--resume=")):
            continue
        else:
            kept.append(arg)
    return " ".join(shlex.quote(a) for a in ["nni-pipebd", *kept, "--resume", out])


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``nni-pipebd``; returns the exit status.

    0: done; 2: an error the package knows (one line, with a hint; ``-v`` adds the traceback); 130 / 143: stopped by
    SIGINT / SIGTERM (a ``train`` stopped that way prints the command that resumes it).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with command_warnings(verbose=args.verbose):  # third-party noise hidden unless -v (workers included)
            return args.func(args)
    except RunStopped as stopped:
        if stopped.resumable and stopped.out_dir:
            _logger.warning("%s; continue with: %s", stopped, resume_command(argv, stopped.out_dir))
        else:
            _logger.warning("%s", stopped)
        return stopped.exit_code
    except KeyboardInterrupt:
        _logger.warning("interrupted (SIGINT) before training started; nothing to resume")
        return 130
    except KNOWN_ERRORS as err:
        _logger.error("%s", one_line(err), exc_info=err if args.verbose else None)
        return 2


if __name__ == "__main__":
    sys.exit(main())
