"""Your NNI space in a ``NasExperiment``: the ``StudentSpace`` built here (custom_space.py) is the space distilled.

    python examples/custom/nas_experiment.py            # in-process (NNI's sequential engine), a few minutes

The evaluator holds the job (config.yaml: your teacher and data); the space handed to ``NasExperiment`` replaces the
config's student, block by block, and the exported architectures are NNI sample dicts over its labels.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from nni.nas.experiment import NasExperiment, NasExperimentConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # custom_space: importable here and in the worker processes

from custom_space import BlockSpace, StudentSpace  # noqa: E402

from nni_pipebd.nni import BlockwiseDistillation, BlockwiseDNA  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # custom_teacher.build(in_channels=1, width=16) on 16x16 images: 1 -> 16 (16x16) -> 32 (8x8) -> 64 (4x4) -> head
    space = StudentSpace([BlockSpace(0, 1, 16, 1), BlockSpace(1, 16, 32, 2), BlockSpace(2, 32, 64, 2)])
    evaluator = BlockwiseDistillation(
        str(HERE / "config.yaml"), "runs/custom-nas/library",
        overrides={"execution": {"executor": "reference", "workers": 1},
                   "distill": {"epochs": 1, "max_steps_per_epoch": 20}},
        finetune={"epochs": 1, "max_steps_per_epoch": 20})
    strategy = BlockwiseDNA("params=200k", top_k=2, ranking={"latency_runs": 0, "val_batches": 2,
                                                              "calib_batches": 2})
    config = NasExperimentConfig("sequential", "raw")
    experiment = NasExperiment(space, evaluator, strategy, config)
    try:
        experiment.run()
        print(json.dumps(experiment.export_top_models(top_k=2, formatter="dict"), indent=2))
    finally:
        experiment.stop()


if __name__ == "__main__":
    main()
