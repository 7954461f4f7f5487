"""Blockwise DNA (or DONNA) NAS on scikit-learn's digits as an NNI 3.0 ``NasExperiment``; prints the top architectures.

    python examples/digits/nas_experiment.py                      # in-process (NNI's sequential engine), a few minutes
    python examples/digits/nas_experiment.py --engine ts --port 8080   # NNI manager + web UI, trials as processes
    python examples/digits/nas_experiment.py --method donna --predictor-archs 4

The evaluator holds the job (examples/digits/config.yaml: MobileNetV2 teacher, DNA student); the strategy trains the
block library with the configured executor, searches it under the budget, finetunes the top-k and NNI exports them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from nni.nas.experiment import NasExperiment, NasExperimentConfig

from nni_pipebd.nni import BlockwiseDistillation, BlockwiseDNA, BlockwiseDONNA
from nni_pipebd.search.costs import count_params

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "config.yaml"), help="job YAML")
    parser.add_argument("--library", default="runs/digits-nas/library", help="block library folder")
    parser.add_argument("--method", choices=["dna", "donna"], default="dna")
    parser.add_argument("--budget", default="params=420k",
                        help="params=N, flops=N or latency_ms=X (default: 0.6x the teacher's parameters)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--predictor-archs", type=int, default=4, help="donna: architectures fitting the predictor")
    parser.add_argument("--executor", default="reference", help="reference, dp, ls or pipebd")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1, help="distillation epochs per block")
    parser.add_argument("--max-steps", type=int, default=20, help="steps per epoch (distillation and finetuning)")
    parser.add_argument("--max-paths", type=int, default=12, help="block paths scored per block (all when fewer)")
    parser.add_argument("--engine", choices=["sequential", "ts"], default="sequential",
                        help="sequential: everything in this process; ts: NNI manager, web UI, trial processes")
    parser.add_argument("--port", type=int, default=8080, help="web UI port (--engine ts)")
    parser.add_argument("--overwrite", action="store_true", help="train the library again even if it exists")
    parser.add_argument("--out", help="write the exported architectures there as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    evaluator = BlockwiseDistillation(
        args.config, args.library,
        overrides={"execution": {"executor": args.executor, "workers": args.workers},
                   "distill": {"epochs": args.epochs, "max_steps_per_epoch": args.max_steps}},
        finetune={"epochs": 1, "max_steps_per_epoch": args.max_steps},
        if_exists="overwrite" if args.overwrite else "reuse")
    space = evaluator.student_space()
    ranking = {"latency_runs": 0, "max_paths": args.max_paths, "val_batches": 2, "calib_batches": 2}
    if args.method == "dna":
        strategy = BlockwiseDNA(args.budget, args.top_k, ranking=ranking)
    else:
        strategy = BlockwiseDONNA(args.budget, args.top_k, predictor_archs=args.predictor_archs, ranking=ranking,
                                  population=32, generations=20)
    if args.engine == "sequential":
        config = NasExperimentConfig("sequential", "raw")
    else:
        config = NasExperimentConfig.default(space, evaluator, strategy)
        config.trial_concurrency = 2
    experiment = NasExperiment(space, evaluator, strategy, config)
    try:
        experiment.run(port=args.port)
        samples = experiment.export_top_models(top_k=args.top_k, formatter="dict")
        models = list(experiment.export_top_models(top_k=args.top_k))
    finally:
        experiment.stop()

    print(f"\n{len(samples)} architectures (best validation accuracy first):")
    for model in models:
        print(f"  #{model.rank}: val accuracy {model.metric:.4f}, {model.search['cost']['params']} params: {model.sample}")
    best = space.freeze(samples[0])  # the plain network of the best architecture (fresh weights)
    print(f"best architecture frozen into a {type(best).__name__} with {count_params(best)} parameters")
    if args.out:
        Path(args.out).write_text(json.dumps(samples, indent=2) + "\n")
        print(f"architectures written to {args.out}")


if __name__ == "__main__":
    main()
