"""Search quality on digits: Kendall's tau between stand-alone accuracy and the DNA score / the DONNA predictor."""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
import yaml
from scipy.stats import kendalltau

from nni_pipebd.config import Config
from nni_pipebd.executors.launch import train
from nni_pipebd.library import MANIFEST, atomic_save
from nni_pipebd.search.constrained import normalized_scores
from nni_pipebd.search.donna import AccuracyPredictor, architecture_features, sample_architectures
from nni_pipebd.search.finetune import FinetuneSettings, finetune
from nni_pipebd.search.loaded import open_library
from nni_pipebd.search.ranking import RankingSettings, rank_library

_logger = logging.getLogger("search_quality")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits" / "config.yaml"


def dna_scores(scores: Dict[str, Any], samples: List[Dict[str, str]], normalize: str = "mean") -> np.ndarray:
    """Summed normalised block loss of each architecture (what `dna_search` minimises)."""
    blocks = [b for b in scores["blocks"] if b["labels"]]
    tables = [{tuple(e["path"][l] for l in b["labels"]): s
               for e, s in zip(b["paths"], normalized_scores([e["loss"] for e in b["paths"]], normalize))}
              for b in blocks]
    return np.array([sum(t[tuple(s[l] for l in b["labels"])] for b, t in zip(blocks, tables)) for s in samples])


_LIBRARY = None


def _init_worker(library_dir: str, threads: int) -> None:
    global _LIBRARY
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    _LIBRARY = open_library(library_dir)


def _finetune_job(job) -> Dict[str, Any]:
    sample, settings, out = job
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


def tau(a, b) -> Dict[str, float]:
    result = kendalltau(a, b)
    return {"tau": float(result.statistic), "p_value": float(result.pvalue)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/search-quality", help="work folder (library, per-arch results)")
    parser.add_argument("--archs", type=int, default=20, help="architectures trained stand-alone")
    parser.add_argument("--library-epochs", type=int, default=10, help="blockwise epochs per block")
    parser.add_argument("--library-lr", type=float, default=0.01, help="blockwise learning rate (Adam)")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="end-to-end epochs per architecture")
    parser.add_argument("--init", choices=["library", "scratch"], default="library",
                        help="stand-alone training starts from the library's weights or from scratch")
    parser.add_argument("--identity", action="store_true",
                        help="add skip candidates to the space (variable depth, as in DNA's space)")
    parser.add_argument("--max-paths", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the architecture sample")
    parser.add_argument("--seeds", type=int, default=2,
                        help="finetuning runs (data-order seeds) per architecture; accuracy is their mean")
    parser.add_argument("--processes", type=int, default=2, help="finetuning worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["distill"].update({"epochs": args.library_epochs, "lr": args.library_lr})
    raw["execution"]["threads_per_worker"] = args.threads
    raw["model"]["student"]["identity"] = args.identity
    config = Config.from_dict(raw, EXAMPLE.parent)
    library_dir = out / "library"
    manifest_path = library_dir / MANIFEST
    same = manifest_path.is_file() and json.loads(manifest_path.read_text())["config"] == config.to_dict()
    t0 = time.perf_counter()
    if not same:
        train(config, library_dir, overwrite=True)
    library_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    library = open_library(library_dir)
    scores = rank_library(library_dir, RankingSettings(max_paths=args.max_paths), library=library)
    ranking_s = time.perf_counter() - t0

    samples = sample_architectures(scores, args.archs, args.seed)
    jobs = [(sample, FinetuneSettings(epochs=args.finetune_epochs, init=args.init, seed=seed),
             str(out / f"arch_{i:02d}_seed{seed}.json"))
            for seed in range(args.seeds) for i, sample in enumerate(samples)]
    t0 = time.perf_counter()
    runs = run_finetunes(library_dir, jobs, args.processes, args.threads)
    finetune_s = time.perf_counter() - t0
    per_seed = np.array([[r["student"]["val_accuracy"] for r in runs[k * len(samples):(k + 1) * len(samples)]]
                         for k in range(args.seeds)])
    results = runs[:len(samples)]

    accuracy = per_seed.mean(0)
    init_accuracy = np.array([r["student"]["val_accuracy_init"] for r in results])
    params = np.array([r["student"]["params"] for r in results], dtype=float)
    dna = dna_scores(scores, samples)
    features = architecture_features(scores, samples)
    predictor = AccuracyPredictor()
    loo = predictor.leave_one_out(features, accuracy)
    fitted = AccuracyPredictor().fit(features, accuracy).predict(features)
    half = len(samples) // 2
    split = AccuracyPredictor().fit(features[:half], accuracy[:half]).predict(features[half:])
    seed_taus = [tau(per_seed[a], per_seed[b])["tau"] for a in range(args.seeds) for b in range(a + 1, args.seeds)]
    report = {
        "command": "python benchmarks/search_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "library_loss_final": [b["losses"][-1] for b in library.manifest["blocks"]],
        "teacher_val_accuracy": results[0]["teacher"]["val_accuracy"],
        "accuracy": {"min": float(accuracy.min()), "max": float(accuracy.max()), "mean": float(accuracy.mean()),
                     "seed_std": float(per_seed.std(0, ddof=1).mean()) if args.seeds > 1 else None},
        "seed_to_seed_kendall_tau": float(np.mean(seed_taus)) if seed_taus else None,
        "kendall_tau": {
            "dna_score": tau(accuracy, -dna),
            "donna_predictor_leave_one_out": tau(accuracy, loo),
            "donna_predictor_in_sample": tau(accuracy, fitted),
            "donna_predictor_fit_first_half_on_second_half": tau(accuracy[half:], split),
            "sum_nsr": tau(accuracy, -features.sum(1)),
            "params (baseline)": tau(accuracy, params),
            "accuracy_before_finetune (library weights)": tau(accuracy, init_accuracy),
        },
        "archs": [{"sample": r["sample"], "val_accuracy": float(acc), "val_accuracy_per_seed": seeds.tolist(),
                   "val_accuracy_init": r["student"]["val_accuracy_init"], "params": r["student"]["params"],
                   "dna_score": float(d), "block_nsr": f.tolist(), "donna_loo": float(p)}
                  for r, acc, seeds, d, f, p in zip(results, accuracy, per_seed.T, dna, features, loo)],
        "time_s": {"library": library_s, "ranking": ranking_s, "finetune": finetune_s,
                   "total": time.perf_counter() - start},
    }
    print("| quality measure vs stand-alone accuracy | Kendall tau | p-value |")
    print("|---|---|---|")
    for name, value in report["kendall_tau"].items():
        print(f"| {name} | {value['tau']:.3f} | {value['p_value']:.3g} |")
    if seed_taus:
        print(f"| seed-to-seed (same architectures, another data order) | {np.mean(seed_taus):.3f} | |")
    print(f"accuracy {accuracy.min():.4f}..{accuracy.max():.4f} over {len(samples)} architectures "
          f"(teacher {report['teacher_val_accuracy']:.4f}); time {report['time_s']}")
    if args.json:
        atomic_save(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
