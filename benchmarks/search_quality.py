"""Search quality on digits: do the library's scores rank architectures by accuracy, and does search beat random?

One run, on the digits example (``examples/digits/config.yaml``, its teacher trained and cached on first use):

1. the block library, trained as the example says (Pipe-BD on ``--workers`` workers; each block until its loss
   plateaus), and its ranking (``rank_library``: DNA loss and DONNA NSR of every scored path);
2. the ground truth: ``--archs`` architectures spanning the parameter range of the scored space (evenly spaced
   quantiles of a uniform sample) trained stand-alone with ``--seeds`` seeds each (``finetune``, same recipe
   for all: ``--init``, ``--finetune-epochs``); accuracy is the mean over seeds;
3. Kendall's tau against that mean, with a bootstrap 90% interval (architectures and seeds resampled), of: the
   DNA score, the DONNA predictor (leave-one-out), the library-stacked accuracy (BN recalibrated, no training)
   and the parameter count (the trivial baseline), plus the seed-to-seed tau (the noise ceiling);
4. search against random under a budget (``--budget-ratio`` x the teacher's parameters): the DNA pick, the DONNA
   pick (predictor fitted on the ground truth of step 2) and the best of ``--random`` random architectures within
   the budget, each trained with the same recipe and seeds.

``--json`` keeps every figure; ``--render JSON --doc docs/search.md`` writes the tables between the markers.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
import torch
import yaml
from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docgen import write_between  # noqa: E402  (benchmarks/ is not a package)

from nni_pipebd.known_warnings import hide_in_script  # noqa: E402

hide_in_script()  # before anything imports NNI (its import warns), here and in the workers

from nni_pipebd.config import Config  # noqa: E402 (after the warning filters: importing NNI warns)
from nni_pipebd.executors.launch import train  # noqa: E402
from nni_pipebd.library import MANIFEST, atomic_save
from nni_pipebd.search.constrained import dna_search, normalized_scores
from nni_pipebd.search.costs import Budget
from nni_pipebd.search.donna import AccuracyPredictor, architecture_features, donna_search, sample_architectures
from nni_pipebd.search.finetune import FinetuneSettings, architecture_id, finetune
from nni_pipebd.search.loaded import open_library
from nni_pipebd.search.ranking import RankingSettings, rank_library

_logger = logging.getLogger("search_quality")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits" / "config.yaml"
BEGIN, END = "<!-- search_quality.py tables: begin -->", "<!-- search_quality.py tables: end -->"
POOL = 4000
"""Architectures drawn uniformly from the scored space to pick the ground-truth and random sets from."""


def _lookup(scores: Mapping[str, Any]) -> List[Dict[tuple, Dict[str, Any]]]:
    blocks = [b for b in scores["blocks"] if b["labels"]]
    return [{tuple(e["path"][label] for label in b["labels"]): e for e in b["paths"]} for b in blocks]


def dna_scores(scores: Mapping[str, Any], samples: Sequence[Mapping[str, str]], normalize: str = "mean") -> np.ndarray:
    """Summed normalised block loss of each architecture (what ``dna_search`` minimises)."""
    blocks = [b for b in scores["blocks"] if b["labels"]]
    tables = [{tuple(e["path"][label] for label in b["labels"]): s
               for e, s in zip(b["paths"], normalized_scores([e["loss"] for e in b["paths"]], normalize))}
              for b in blocks]
    return np.array([sum(t[tuple(s[label] for label in b["labels"])] for b, t in zip(blocks, tables))
                     for s in samples])


def params_of(scores: Mapping[str, Any], samples: Sequence[Mapping[str, str]]) -> np.ndarray:
    """Whole-network parameters of each architecture, from the scored paths (blocks without choices included)."""
    fixed = sum(b["paths"][0]["params"] for b in scores["blocks"] if not b["labels"])
    blocks = [b for b in scores["blocks"] if b["labels"]]
    tables = _lookup(scores)
    return np.array([fixed + sum(t[tuple(s[label] for label in b["labels"])]["params"] for b, t in zip(blocks, tables))
                     for s in samples], dtype=float)


def spanning(samples: List[Dict[str, str]], params: np.ndarray, count: int) -> List[int]:
    """Indices of ``count`` samples at evenly spaced quantiles of ``params`` (smallest to largest)."""
    order = np.argsort(params, kind="stable")
    return [int(order[int(round(q))]) for q in np.linspace(0, len(order) - 1, count)]


_LIBRARY = None


def _init_worker(library_dir: str, threads: int) -> None:
    global _LIBRARY
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    _LIBRARY = open_library(library_dir)


def _finetune_job(job) -> Dict[str, Any]:
    sample, settings, out = job
    if Path(out).is_file():  # a run interrupted earlier: its finished trainings are kept
        return json.loads(Path(out).read_text())
    return finetune(_LIBRARY, sample, settings, out=out)


def run_finetunes(library_dir: Path, jobs, processes: int, threads: int) -> List[Dict[str, Any]]:
    """Finetune every (sample, settings, out) job, in ``processes`` spawned workers of ``threads`` threads."""
    if processes == 1:
        _init_worker(str(library_dir), threads)
        return [_finetune_job(job) for job in jobs]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker,
                             initargs=(str(library_dir), threads)) as pool:
        return list(pool.map(_finetune_job, jobs))


def tau(a, b) -> float:
    """Kendall's tau-b of ``a`` and ``b`` (0 where either is constant)."""
    value = kendalltau(a, b).statistic
    return 0.0 if np.isnan(value) else float(value)


def bootstrap_taus(per_seed: np.ndarray, measures: Dict[str, np.ndarray], reps: int, seed: int,
                   level: float = 0.9) -> Dict[str, Dict[str, float]]:
    """Kendall's tau of each measure against the seed-mean accuracy, with a bootstrap interval.

    Each replicate resamples the architectures and, per architecture, its seeds (both with replacement), so the
    interval holds the noise of the ground truth as well as the choice of architectures.
    ``per_seed`` is (seeds, archs); every measure is one value per architecture, larger meaning better.
    """
    seeds, archs = per_seed.shape
    truth = per_seed.mean(0)
    rng = np.random.default_rng(seed)
    draws = {name: [] for name in measures}
    for _ in range(reps):
        pick = rng.integers(archs, size=archs)
        rows = rng.integers(seeds, size=(seeds, archs))
        accuracy = per_seed[rows, pick[None, :]].mean(0)
        for name, values in measures.items():
            draws[name].append(tau(accuracy, values[pick]))
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    result = {}
    for name, values in measures.items():
        test = kendalltau(truth, values)
        result[name] = {"tau": tau(truth, values), "p_value": float(test.pvalue),
                        "lo": float(np.quantile(draws[name], lo)), "hi": float(np.quantile(draws[name], hi))}
    return result


def seed_to_seed(per_seed: np.ndarray) -> float:
    """Mean Kendall's tau between the accuracies of two seeds of the same architectures (the noise ceiling)."""
    pairs = [(a, b) for a in range(len(per_seed)) for b in range(a + 1, len(per_seed))]
    return float(np.mean([tau(per_seed[a], per_seed[b]) for a, b in pairs])) if pairs else float("nan")


def library_config(workers: int, threads: int) -> Config:
    """The digits example as it ships, trained by Pipe-BD on ``workers`` workers of ``threads`` threads."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["execution"].update({"executor": "pipebd", "workers": workers, "threads_per_worker": threads})
    return Config.from_dict(raw, EXAMPLE.parent)


def _accuracies(runs: List[Dict[str, Any]], seeds: int) -> np.ndarray:
    """(seeds, archs) val accuracies of runs ordered seed-major."""
    archs = len(runs) // seeds
    return np.array([[r["student"]["val_accuracy"] for r in runs[k * archs:(k + 1) * archs]] for k in range(seeds)])


def measure(args) -> Dict[str, Any]:
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = library_config(args.workers, args.threads)
    library_dir = out / "library"
    manifest_path = library_dir / MANIFEST
    same = manifest_path.is_file() and json.loads(manifest_path.read_text())["config"] == config.to_dict()
    tic = time.perf_counter()
    if not same:
        shutil.rmtree(out / "runs", ignore_errors=True)  # trainings of another library
    manifest = json.loads(manifest_path.read_text()) if same else train(config, library_dir, overwrite=True)
    library_s = time.perf_counter() - tic
    tic = time.perf_counter()
    scores = rank_library(library_dir, RankingSettings(max_paths=args.max_paths))
    ranking_s = time.perf_counter() - tic

    pool = sample_architectures(scores, min(POOL, _space_size(scores)), args.seed)
    pool_params = params_of(scores, pool)
    truth_set = [pool[i] for i in spanning(pool, pool_params, args.archs)]
    recipe = {"epochs": args.finetune_epochs, "init": args.init, **({"lr": args.lr} if args.lr else {})}
    settings = [FinetuneSettings(**recipe, seed=seed) for seed in range(args.seeds)]

    budget_limit = args.budget_ratio * _teacher_params(library_dir)
    budget = Budget("params", budget_limit)
    within = [s for s, p in zip(pool, pool_params) if p <= budget_limit]
    if len(within) < args.random:
        raise SystemExit(f"only {len(within)} sampled architectures fit params <= {budget_limit:.0f}; "
                         f"raise --budget-ratio (now {args.budget_ratio}) or lower --random (now {args.random})")
    random_set = within[:args.random]
    dna_pick = dna_search(scores, budget)[0]["sample"]

    def jobs(name: str, samples: List[Dict[str, str]]):
        return [(s, st, str(out / "runs" / f"{name}_{i:02d}_{st.init}{st.epochs}_lr{st.lr:g}_seed{st.seed}.json"))
                for st in settings for i, s in enumerate(samples)]

    (out / "runs").mkdir(exist_ok=True)
    tic = time.perf_counter()
    first = jobs("truth", truth_set) + jobs("dna", [dna_pick]) + jobs("random", random_set)
    runs = run_finetunes(library_dir, first, args.processes, args.threads)
    n_truth = len(truth_set) * args.seeds
    truth_runs, dna_runs, random_runs = runs[:n_truth], runs[n_truth:n_truth + args.seeds], runs[n_truth + args.seeds:]
    # the network stacked from the library's blocks (BN recalibrated), evaluated without training
    as_built = FinetuneSettings(epochs=0, init="library", seed=0)
    built = run_finetunes(library_dir, [(s, as_built, str(out / "runs" / f"stacked_{architecture_id(s)}.json"))
                                        for s in truth_set + [dna_pick] + random_set],
                          args.processes, args.threads)
    stacked_of = {architecture_id(r["sample"]): r["student"]["val_accuracy"] for r in built}
    per_seed = _accuracies(truth_runs, args.seeds)
    accuracy = per_seed.mean(0)
    features = architecture_features(scores, truth_set)
    predictor = AccuracyPredictor().fit(features, accuracy)
    donna_pick = donna_search(scores, predictor, budget, top_k=1, seed=args.seed)[0]["sample"]
    donna_runs = run_finetunes(library_dir, jobs("donna", [donna_pick])
                               + [(donna_pick, as_built,
                                   str(out / "runs" / f"stacked_{architecture_id(donna_pick)}.json"))],
                               args.processes, args.threads)
    stacked_of[architecture_id(donna_pick)] = donna_runs.pop()["student"]["val_accuracy"]
    finetune_s = time.perf_counter() - tic

    stacked = np.array([stacked_of[architecture_id(sample)] for sample in truth_set])
    measures = {
        "DNA score": -dna_scores(scores, truth_set),
        "DONNA predictor, leave-one-out": AccuracyPredictor().leave_one_out(features, accuracy),
        "library-stacked accuracy": stacked,
        "parameters (baseline)": params_of(scores, truth_set),
        "DONNA predictor, in sample": predictor.predict(features),
        "NSR sum": -features.sum(1),
    }
    taus = bootstrap_taus(per_seed, measures, args.bootstrap, args.seed)
    teacher_accuracy = truth_runs[0]["teacher"]["val_accuracy"]
    random_acc = _accuracies(random_runs, args.seeds)
    best_random = int(np.argmax(random_acc.mean(0)))

    def entry(sample, accs: np.ndarray, run: Dict[str, Any]) -> Dict[str, Any]:
        return {"sample": sample, "params": run["student"]["params"], "params_ratio": run["params_ratio"],
                "accuracy_mean": float(accs.mean()), "accuracy_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                "accuracy_per_seed": accs.tolist(),
                "library_stacked_accuracy": stacked_of.get(architecture_id(sample))}

    return {
        "command": "python benchmarks/search_quality.py " + " ".join(args.argv),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "doc", "render", "argv")},
        "machine": {"cpus": multiprocessing.cpu_count(), "torch": torch.__version__},
        "library": {"reused": same, "train_s": manifest.get("train_time_s"), "until": config.distill.until,
                    "epochs_cap": config.distill.epochs,
                    "stops": [b.get("stopped") for b in manifest["blocks"]],
                    "final_losses": [b["losses"][-1] if b["losses"] else None for b in manifest["blocks"]]},
        "teacher": {"val_accuracy": teacher_accuracy, "params": truth_runs[0]["teacher"]["params"]},
        "ground_truth": {"archs": len(truth_set), "seeds": args.seeds, "epochs": args.finetune_epochs,
                         "init": args.init, "lr": settings[0].lr, "accuracy_min": float(accuracy.min()),
                         "accuracy_max": float(accuracy.max()),
                         "seed_std_mean": float(per_seed.std(0, ddof=1).mean()) if args.seeds > 1 else None,
                         "params_min": float(measures["parameters (baseline)"].min()),
                         "params_max": float(measures["parameters (baseline)"].max())},
        "seed_to_seed_tau": seed_to_seed(per_seed),
        "kendall_tau": taus,
        "search_vs_random": {
            "budget": str(budget), "budget_ratio": args.budget_ratio,
            "dna": entry(dna_pick, _accuracies(dna_runs, args.seeds)[:, 0], dna_runs[0]),
            "donna": entry(donna_pick, _accuracies(donna_runs, args.seeds)[:, 0], donna_runs[0]),
            "random_best": entry(random_set[best_random], random_acc[:, best_random], random_runs[best_random]),
            "random_median_accuracy": float(np.median(random_acc.mean(0))),
            "random_count": len(random_set),
        },
        "archs": [{"sample": s, "accuracy_per_seed": per_seed[:, i].tolist(), "accuracy_mean": float(accuracy[i]),
                   **{name: float(values[i]) for name, values in measures.items()}}
                  for i, s in enumerate(truth_set)],
        "time_s": {"library": library_s, "ranking": ranking_s, "finetune": finetune_s,
                   "total": time.perf_counter() - start},
    }


def _space_size(scores: Mapping[str, Any]) -> int:
    return int(np.prod([len(b["paths"]) for b in scores["blocks"] if b["labels"]]))


def _teacher_params(library_dir: Path) -> int:
    library = open_library(library_dir)
    return sum(p.numel() for block in library.job.spec.teacher for p in block.parameters())


def render(run: Dict[str, Any]) -> str:
    """The tables of one measured run, Markdown."""
    gt, taus, sv = run["ground_truth"], run["kendall_tau"], run["search_vs_random"]
    teacher = run["teacher"]["val_accuracy"]
    base = taus["parameters (baseline)"]["tau"]
    trained = run["library"].get("train_s")
    if run["time_s"]["library"] < 1:  # the work folder held the same library
        library = "reused" + (f" (trained in {trained:.0f} s by an earlier run)" if trained else "")
    else:
        library = f"{run['time_s']['library']:.0f} s"
    stops = [s["epoch"] if s["reason"] == "epochs" else f"{s['epoch']}p" for s in run["library"]["stops"] if s]
    lines = [f"Generated from the JSON of `{run['command']}` ({run['machine']['cpus']} CPUs, torch "
             f"{run['machine']['torch']}; {run['time_s']['total'] / 60:.1f} min: library {library}, ranking "
             f"{run['time_s']['ranking']:.0f} s, trainings {run['time_s']['finetune']:.0f} s).", "",
             f"Ground truth: {gt['archs']} architectures ({gt['params_min']:,.0f}-{gt['params_max']:,.0f} parameters) "
             f"x {gt['seeds']} seeds x {gt['epochs']} epochs (KD, Adam lr {gt.get('lr', 1e-3):g}, cosine) from "
             f"`{gt['init']}` "
             f"weights; mean accuracy "
             f"{gt['accuracy_min']:.3f}-{gt['accuracy_max']:.3f} (teacher {teacher:.3f}), seed std "
             f"{gt['seed_std_mean']:.3f} on average; seed-to-seed tau **{run['seed_to_seed_tau']:.2f}**. Library: "
             f"epochs per block {', '.join(map(str, stops))} (p: stopped at a plateau; cap "
             f"{run['library']['epochs_cap']}).",
             "",
             "| signal vs mean stand-alone accuracy | Kendall tau | 90% bootstrap interval | p-value | "
             "interval above the parameter baseline |",
             "|---|---|---|---|---|"]
    for name, t in taus.items():
        above = "baseline" if name == "parameters (baseline)" else ("yes" if t["lo"] > base else "no")
        lines.append(f"| {name} | **{t['tau']:.2f}** | {t['lo']:.2f} .. {t['hi']:.2f} | {t['p_value']:.2g} | {above} |")
    lines += ["", f"Search against random under {sv['budget']} ({sv['budget_ratio']:g}x the teacher's parameters), "
              f"same training recipe, mean ± std over {gt['seeds']} seeds:", "",
              "| architecture | parameters | x teacher | stacked from the library | after training |",
              "|---|---|---|---|---|"]
    for key, label in (("dna", "DNA pick"), ("donna", "DONNA pick"),
                       ("random_best", f"best of {sv['random_count']} random (picked on its own accuracy)")):
        e = sv[key]
        lines.append(f"| {label} | {e['params']:,} | {e['params_ratio']:.2f} | {e['library_stacked_accuracy']:.3f} | "
                     f"{e['accuracy_mean']:.3f} ± {e['accuracy_std']:.3f} |")
    lines.append(f"| median of the {sv['random_count']} random | | | | {sv['random_median_accuracy']:.3f} |")
    dna, donna = taus["DNA score"], taus["DONNA predictor, leave-one-out"]
    stacked = sv["dna"]["library_stacked_accuracy"] / teacher
    lines += ["", "Targets (issue 16):", "",
              f"- DNA-score tau >= 0.6: {dna['tau']:.2f} ({'met' if dna['tau'] >= 0.6 else 'missed'}); "
              f"interval above the parameter baseline's {base:.2f}: {'yes' if dna['lo'] > base else 'no'}",
              f"- DONNA-predictor tau >= 0.6: {donna['tau']:.2f} ({'met' if donna['tau'] >= 0.6 else 'missed'}); "
              f"interval above the baseline: {'yes' if donna['lo'] > base else 'no'}",
              f"- library-stacked DNA pick >= 0.8x the teacher: {stacked:.2f}x "
              f"({'met' if stacked >= 0.8 else 'missed'})"]
    return "\n".join(lines) + "\n"


def write_doc(doc: Path, runs: List[Dict[str, Any]]) -> None:
    """Replace the generated part of ``doc`` (between the BEGIN and END markers) with :func:`render_all`."""
    write_between(doc, BEGIN, END, render_all(runs))


def render_all(runs: List[Dict[str, Any]]) -> str:
    """Every run's tables under a heading naming its ground-truth recipe."""
    parts = []
    for run in runs:
        gt = run["ground_truth"]
        parts += [f"### Ground truth trained {gt['epochs']} epochs from `{gt['init']}` weights", "", render(run)]
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/search-quality", help="work folder (library, per-run results)")
    parser.add_argument("--archs", type=int, default=16, help="ground-truth architectures")
    parser.add_argument("--seeds", type=int, default=3, help="trainings per architecture (seeds 0..N-1)")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="epochs of every stand-alone training")
    parser.add_argument("--init", choices=["library", "scratch"], default="library",
                        help="stand-alone training starts from scratch or from the library's weights")
    parser.add_argument("--lr", type=float, help="learning rate of every stand-alone training (default: finetune's)")
    parser.add_argument("--random", type=int, default=20, help="random architectures within the budget")
    parser.add_argument("--budget-ratio", type=float, default=0.6, help="search budget: x the teacher's parameters")
    parser.add_argument("--max-paths", type=int, default=64, help="scored paths per block")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates of every tau")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples, the DONNA search, the bootstrap")
    parser.add_argument("--workers", type=int, default=2, help="Pipe-BD workers training the library")
    parser.add_argument("--processes", type=int, default=2, help="training worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--doc", help="write the tables into this Markdown file (between its markers)")
    parser.add_argument("--render", metavar="JSON", action="append",
                        help="do not measure: make the tables from this saved run (repeatable)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.render:
        runs = [json.loads(Path(path).read_text()) for path in args.render]
    else:
        for name in ("archs", "seeds", "finetune_epochs", "random", "bootstrap", "processes", "threads"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.archs < 4:
            parser.error(f"--archs {args.archs}: Kendall's tau needs at least 4 architectures")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("nni_pipebd").setLevel(logging.WARNING)
        torch.set_num_threads(args.threads)
        runs = [measure(args)]
        if args.json:
            atomic_save(runs[0], args.json)
    if args.doc:
        write_doc(Path(args.doc), runs)
    else:
        print(render_all(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
