"""The run report: Markdown with PNG plots of block losses, the per-rank timeline, the plan and search results."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from ..library import load_manifest, random_teacher_warning  # noqa: E402
from .metrics import read_step_losses  # noqa: E402

__all__ = ["write_report", "plot_losses", "plot_step_losses", "plot_timeline", "plot_block_scores", "plot_search"]

_logger = logging.getLogger(__name__)

COLORS = {"data": "#8c8c8c", "teacher": "#1f77b4", "student": "#2ca02c", "send": "#ff7f0e", "recv": "#d62728",
          "wait": "#9467bd", "comm": "#e377c2"}


def plot_losses(manifest: Dict[str, Any], path: Path) -> Path:
    """Per-block distillation loss per epoch (log scale when losses span decades)."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for block in manifest["blocks"]:
        losses = block["losses"]
        ax.plot(range(1, len(losses) + 1), losses, marker="o", label=f"block {block['index']}")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(f"{manifest['config']['distill']['loss']} loss (epoch mean)")
    ax.set_title(f"Block losses ({manifest['executor']}, {manifest['workers']} workers)")
    values = [v for b in manifest["blocks"] for v in b["losses"] if v > 0]
    if values and max(values) / min(values) > 50:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_step_losses(curves: Dict[int, List[Tuple[int, float]]], loss: str, path: Path) -> Path:
    """Per-block loss at every step (faint) and its moving average over about 5% of the block's steps."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for block, points in curves.items():
        steps, values = [s for s, _ in points], [v for _, v in points]
        window = max(1, len(values) // 20)
        smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                  for i in range(len(values))]
        line, = ax.plot(steps, smooth, label=f"block {block}")
        ax.plot(steps, values, color=line.get_color(), alpha=0.2, linewidth=0.8)
    ax.set_xlabel("step of the block")
    ax.set_ylabel(f"{loss} loss (moving average)")
    ax.set_title("Block losses per step")
    values = [v for points in curves.values() for _, v in points if v > 0]
    if values and max(values) / min(values) > 50:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_timeline(trace: Dict[str, Any], path: Path, seconds: Optional[float] = None) -> Path:
    """Gantt chart of the Chrome trace: one row per rank, one colour per span kind (the first ``seconds``)."""
    events = trace["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M"}
    spans = [e for e in events if e.get("ph") == "X"]
    end = max((e["ts"] + e["dur"] for e in spans), default=0.0) / 1e6
    window = min(end, seconds) if seconds else end
    ranks = sorted(names)
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(ranks) + 1.6), dpi=120)
    for row, rank in enumerate(ranks):
        for kind in COLORS:
            bars = [(e["ts"] / 1e6, e["dur"] / 1e6) for e in spans
                    if e["tid"] == rank and e["name"] == kind and e["ts"] / 1e6 <= window]
            if bars:
                ax.broken_barh(bars, (row - 0.35, 0.7), facecolors=COLORS[kind], label=kind)
    ax.set_yticks(range(len(ranks)), [names[r] for r in ranks], fontsize=8)
    ax.set_xlim(0, window)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first span")
    ax.set_title("Per-rank timeline")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, ncol=len(unique), loc="upper center",
              bbox_to_anchor=(0.5, -0.25 if len(ranks) < 3 else -0.15), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_block_scores(scores: Dict[str, Any], path: Path) -> Path:
    """Distribution of the ranked paths' distillation loss in every block (DNA ranking)."""
    blocks = [b for b in scores["blocks"] if b.get("paths")]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.boxplot([[p["loss"] for p in b["paths"]] for b in blocks], tick_labels=[f"b{b['index']}" for b in blocks])
    ax.set_ylabel("path loss on validation (after BN recalibration)")
    ax.set_title("DNA block ranking: loss of every scored path")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_search(search: Dict[str, Any], path: Path) -> Path:
    """Found architectures: cost against score (the Pareto front for DONNA)."""
    archs = search["architectures"]
    metric = search["budget"].split("=")[0] if "=" in search["budget"] else "params"
    xs = [a["cost"].get(metric) for a in archs]
    if search["method"] == "donna":
        ys, ylabel = [a.get("predicted_accuracy") for a in archs], "predicted accuracy"
    else:
        ys, ylabel = [a.get("score") for a in archs], "summed normalised block loss"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(xs, ys, "o-" if search["method"] == "donna" else "o")
    for i, (x, y) in enumerate(zip(xs, ys)):
        ax.annotate(str(i), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(metric)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{search['method'].upper()} search under {search['budget']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(directory: Union[str, Path], out: Union[str, Path, None] = None,
                 extra: Optional[List[str]] = None) -> Path:
    """Write ``report.md`` (and its PNGs) for the run in ``directory`` (a block library, maybe with trace.json,
    plan.json, scores.json and search.json); returns the Markdown path."""
    directory = Path(directory)
    manifest = load_manifest(directory)  # before the folder is made: a wrong directory leaves nothing behind
    out = Path(out) if out is not None else directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# nni_pipebd run report: `{directory}`", ""]
    warning = random_teacher_warning(manifest)
    if warning:
        lines += [f"> **Warning**: {warning}.", ""]
    lines += extra or []
    counters = manifest["counters"]
    lines += ["## Block library", "",
              f"{manifest['num_blocks']} blocks trained by `{manifest['executor']}` on {manifest['workers']} "
              f"worker(s) in {manifest.get('train_time_s', manifest['wall_time_s']):.1f} s; "
              f"{counters['samples_per_block']} samples per block; teacher block forwards per sample "
              f"{counters['teacher_block_forwards_per_sample']:g}, samples loaded per sample "
              f"{counters['samples_loaded_per_sample']:g}.", "",
              "| block | final loss | steps |", "|---|---|---|"]
    for block in manifest["blocks"]:
        final = f"{block['losses'][-1]:.4g}" if block["losses"] else "-"
        lines.append(f"| {block['index']} | {final} | {block['steps']} |")
    lines += ["", f"![block losses]({plot_losses(manifest, out / 'losses.png').name})", ""]
    curves = read_step_losses(directory)
    if curves:
        plot = plot_step_losses(curves, manifest["config"]["distill"]["loss"], out / "step_losses.png")
        lines += [f"![block losses per step]({plot.name})", ""]
    if manifest.get("ranks"):
        lines += ["| rank | role | train s | peak RSS MB | busy |", "|---|---|---|---|---|"]
        for r in manifest["ranks"]:
            busy = f"{r['busy_fraction']:.2f}" if r.get("busy_fraction") is not None else "-"
            lines.append(f"| {r['rank']} | {r['label']} | {r['train_time_s']:.1f} | {r['peak_rss_mb']:.0f} | {busy} |")
        lines.append("")
    trace = directory / "trace.json"
    if trace.is_file():
        data = json.loads(trace.read_text())
        plot_timeline(data, out / "timeline.png", seconds=_window(data))
        lines += ["## Timeline", "", "Per-rank spans (the first seconds of training; open `trace.json` in "
                  "Perfetto or chrome://tracing for all of it).", "", "![timeline](timeline.png)", ""]
    plan = directory / "plan.json"
    if plan.is_file():
        from ..plan.plan import Plan
        lines += ["## Plan", "", "```", Plan.load(plan).grid(manifest["num_blocks"]), "```", ""]
    scores = directory / "scores.json"
    if scores.is_file():
        plot_block_scores(json.loads(scores.read_text()), out / "block_scores.png")
        lines += ["## Block ranking", "", "![block scores](block_scores.png)", ""]
    search = directory / "search.json"
    if search.is_file():
        result = json.loads(search.read_text())
        plot_search(result, out / "search.png")
        lines += [f"## Search ({result['method']}, {result['budget']})", "", "![search](search.png)", "",
                  "| # | architecture | cost |", "|---|---|---|"]
        for i, arch in enumerate(result["architectures"][:10]):
            sample = ", ".join(f"{k}={v}" for k, v in arch["sample"].items())
            cost = ", ".join(f"{k}={v:.4g}" for k, v in arch["cost"].items() if isinstance(v, (int, float)))
            lines.append(f"| {i} | {sample} | {cost} |")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    _logger.info("report written to %s", path)
    return path


def _window(trace: Dict[str, Any]) -> float:
    """Enough of the timeline to see a few steps: 5% of the run, at least 2 s."""
    spans = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    end = max((e["ts"] + e["dur"] for e in spans), default=0.0) / 1e6
    return min(end, max(2.0, 0.05 * end))
