"""Soak: many epochs on tiny data with Pipe-BD on 2 workers; resident memory per worker per epoch must not grow.

    python benchmarks/soak.py [--epochs 40] [--workers 2] [--json PATH]

Prints, per worker, RSS (MB) at the end of every epoch and the growth after the first epoch (warm-up:
allocator caches, lazily built kernels). Growth beyond noise means a leak (e.g. activations kept alive by
pending sends, unbounded traces or histories).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from nni_pipebd.known_warnings import hide_in_script

hide_in_script()  # before anything imports NNI (its import warns), here and in the workers

from nni_pipebd.config import Config
from nni_pipebd.executors.launch import train


def soak(epochs: int, workers: int = 2, steps: int = 8) -> dict:
    """Run the soak; returns per-rank RSS per epoch and growth after epoch 1 (MB)."""
    config = Config.from_dict({
        "model": {"teacher": {"arch": "digits_cnn", "num_classes": 10, "kwargs": {"width": 8}, "pretrained": False},
                  "student": {"kind": "dna", "kernels": [3, 5], "expansions": [2, 4]}},
        "data": {"name": "synthetic", "image_size": 16, "batch_size": 16, "num_samples": 128},
        "distill": {"optimizer": "adam", "lr": 1e-3, "epochs": epochs, "max_steps_per_epoch": steps},
        "execution": {"executor": "pipebd", "workers": workers, "threads_per_worker": 1, "timeout_s": 120},
    })
    with tempfile.TemporaryDirectory(prefix="nni_pipebd_soak_") as out:
        manifest = train(config, Path(out) / "lib")
    ranks = []
    for r in manifest["ranks"]:
        rss = r["rss_mb_per_epoch"]
        ranks.append({"rank": r["rank"], "label": r["label"], "rss_mb_per_epoch": [round(v, 1) for v in rss],
                      "growth_after_epoch_1_mb": round(max(rss[1:]) - rss[1], 1) if len(rss) > 1 else 0.0})
    return {"epochs": epochs, "workers": workers, "steps_per_epoch": steps, "ranks": ranks}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    result = soak(args.epochs, args.workers)
    for r in result["ranks"]:
        rss = r["rss_mb_per_epoch"]
        print(f"rank {r['rank']} ({r['label']}): epoch 1 {rss[0]:.1f} MB, epoch 2 {rss[1]:.1f} MB, "
              f"last {rss[-1]:.1f} MB, max growth after epoch 1: {r['growth_after_epoch_1_mb']:.1f} MB")
        print("  per epoch:", " ".join(f"{v:.0f}" for v in rss))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
