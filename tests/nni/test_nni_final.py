"""A Lightning ``Classification`` as the final evaluator: evaluator, strategy (sequential engine) and tuner trials."""

import json

import pytest
import torch

import nni
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.evaluator.pytorch import Classification, DataLoader
from nni.nas.experiment import NasExperiment, NasExperimentConfig

from conftest import tiny_config
from nni_helpers import FINETUNE, RANKING, isolate_nni, tiny_evaluator
from nni_pipebd.data.datasets import build_dataset
from nni_pipebd.nni import ArchitectureModel, BlockwiseDNA, BlockwiseTuner
from nni_pipebd.nni.final import FinalEvaluatorError, resolve_final_evaluator
from nni_pipebd.nni.trial import run_trial
from nni_pipebd.search.finetune import architecture_id

SAMPLE = {"s0_i0": "k3e2", "s1_i0": "k5e2", "s1_i1": "k3e2", "s2_i0": "k3e2", "s2_i1": "k5e2", "s3_i0": "k3e2",
          "s3_i1": "k3e2"}


def classification(batches: int = 2) -> Classification:
    """A real NNI Lightning evaluator on the tests' synthetic 16x16 data: one epoch of ``batches`` batches."""
    data = tiny_config().data  # traced data sets: trials rebuild them from their arguments (nni.dump)
    train, val = nni.trace(build_dataset)(data, ".", "train"), nni.trace(build_dataset)(data, ".", "val")
    return Classification(train_dataloaders=DataLoader(train, batch_size=8),
                          val_dataloaders=DataLoader(val, batch_size=8), num_classes=10, learning_rate=0.01,
                          max_epochs=1, limit_train_batches=batches, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("final")
    tiny_evaluator(root).distill()
    return root


def test_classification_evaluates_candidates_outside_nni(library):
    evaluator = tiny_evaluator(library, final_evaluator=classification(), finetune={"epochs": 0, "calib_batches": 1})
    result = evaluator.evaluate(ArchitectureModel(SAMPLE, evaluator))
    assert 0.0 <= result["metric"] <= 1.0 and result["student"]["params"] > 0 and result["student"]["flops"] > 0
    assert result["sample"] == SAMPLE and "Classification" in result["evaluator"]
    assert len(result["intermediates"]) == 1  # its validation epoch
    saved = json.loads((evaluator.library_dir / f"evaluation_{result['id']}.json").read_text())
    assert saved["metric"] == result["metric"]
    predictor = evaluator.evaluate(ArchitectureModel(SAMPLE, evaluator, role="predictor"))
    assert predictor["train_losses"] == []  # DONNA's predictor architectures are finetuned as before (0 epochs here)


def test_final_evaluator_checks(library, tmp_path, monkeypatch):
    with pytest.raises(FinalEvaluatorError, match="must be an NNI evaluator"):
        resolve_final_evaluator(torch.nn.Linear(2, 2))
    with pytest.raises(FinalEvaluatorError, match="is a BlockwiseDistillation"):
        tiny_evaluator(library, final_evaluator=tiny_evaluator(library))
    with pytest.raises(FinalEvaluatorError, match="still has choices"):
        resolve_final_evaluator(FunctionalEvaluator(lambda model, lr: None, lr=nni.choice("lr", [0.1, 0.01])))
    (tmp_path / "my_final.py").write_text("from nni.nas.evaluator import FunctionalEvaluator\n"
                                          "def silent(model):\n    pass\n"
                                          "def build():\n    return FunctionalEvaluator(silent)\n"
                                          "def not_one():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(resolve_final_evaluator("my_final:build"), FunctionalEvaluator)
    with pytest.raises(FinalEvaluatorError, match=r"'my_final:not_one' gave int"):
        resolve_final_evaluator("my_final:not_one")
    silent = tiny_evaluator(library, final_evaluator="my_final:build")
    with pytest.raises(FinalEvaluatorError, match="reported no final metric"):
        silent.evaluate(SAMPLE)


def _sequential(tmp_path):
    config = NasExperimentConfig("sequential", "raw")
    config.experiment_working_directory = str(tmp_path / "experiments")
    return config


@pytest.mark.timeout(300)
@pytest.mark.slow  # runs long (over a second here)
def test_strategy_ranks_the_top_k_by_the_final_evaluator(library, tmp_path, monkeypatch):
    isolate_nni(tmp_path, monkeypatch)
    monkeypatch.setattr(nni.trial, "_params", None)  # the sequential engine leaves its last model as the parameter
    evaluator = tiny_evaluator(library)  # the same job: the library is reused
    space = evaluator.student_space()
    strategy = BlockwiseDNA("params=1M", top_k=2, ranking=RANKING, final_evaluator=classification())
    finetuned = set((library / "lib").glob("finetune_*.json"))
    experiment = NasExperiment(space, evaluator, strategy, _sequential(tmp_path))
    try:
        experiment.run()
        models = list(experiment.export_top_models(top_k=5))
    finally:
        experiment.stop()
    assert len(models) == 2 and [m.metric for m in models] == sorted((m.metric for m in models), reverse=True)
    for model in models:
        saved = json.loads((library / "lib" / f"evaluation_{architecture_id(model.sample)}.json").read_text())
        assert model.metric == saved["metric"] and 0.0 <= model.metric <= 1.0
        assert len(model.metrics.intermediates) == 1  # Classification's validation epoch, passed on to NNI
    assert set((library / "lib").glob("finetune_*.json")) == finetuned  # nothing was finetuned


def test_tuner_trials_evaluate_candidates_with_it(library, tmp_path):
    tuner = BlockwiseTuner(tiny_config(library).to_dict(), "lib", "params=1M", top_k=1, code_dir=str(library),
                           finetune=FINETUNE, ranking=RANKING, final_evaluator=classification())
    tuner.update_search_space({})
    params = tuner.evaluator.settings()
    assert isinstance(params["final_evaluator"], Classification)
    sent = nni.load(nni.dump({"task": "evaluate", "role": "candidate", "rank": 0, "sample": SAMPLE,
                              "evaluator": params}))  # what NNI's dispatcher sends and the trial reads
    result = run_trial(sent)
    assert 0.0 <= result["metric"] <= 1.0 and result["sample"] == SAMPLE
    assert json.loads((library / "lib" / f"evaluation_{result['id']}.json").read_text())["metric"] == result["metric"]
