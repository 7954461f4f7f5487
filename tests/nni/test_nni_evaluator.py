"""BlockwiseDistillation: plain-data tracing, library reuse rules, NNI metrics, models that serialise as JSON."""

import pytest
import torch

import nni
from nni.nas.space import ModelStatus

from conftest import tiny_config
from nni_helpers import FINETUNE, tiny_evaluator
from nni_pipebd.config import ConfigError
from nni_pipebd.nni import ArchitectureModel, BlockwiseDistillation, DistillationTask, LibraryMismatchError
from nni_pipebd.nni.evaluator import architecture_metrics, distillation_metrics, structure_config
from nni_pipebd.search.errors import ArchitectureError, SearchError

SAMPLE = {"s0_i0": "k3e2", "s1_i0": "k5e2", "s1_i1": "k3e2", "s2_i0": "k3e2", "s2_i1": "k5e2", "s3_i0": "k3e2",
          "s3_i1": "k3e2"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluator")
    evaluator = tiny_evaluator(root)
    manifest = evaluator.distill()
    return evaluator, manifest


def test_arguments_are_kept_as_plain_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluator = BlockwiseDistillation(tiny_config(tmp_path), "lib", finetune=FINETUNE,
                                      overrides={"distill": {"epochs": 2}, "model": {"student": {"kernels": [3]}}})
    kwargs = evaluator.trace_kwargs
    assert isinstance(kwargs["config"], dict) and kwargs["library_dir"] == str(tmp_path / "lib")
    assert kwargs["base_dir"] == str(tmp_path)
    assert evaluator.config.distill.epochs == 2 and evaluator.config.model.student.kernels == [3]
    assert evaluator.config.model.student.expansions == [2]  # overrides merge key by key
    text = nni.dump(evaluator)
    assert "__nni_obj__" not in text and "bytes:" not in text  # JSON, no pickle
    again = nni.load(text)
    assert isinstance(again, BlockwiseDistillation) and again.config == evaluator.config
    assert again.library_dir == evaluator.library_dir


def test_yaml_path_and_bad_arguments(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("data: {name: synthetic, image_size: 16, batch_size: 8, num_samples: 16}\n"
                      "model: {teacher: {arch: digits_cnn, kwargs: {width: 4}, pretrained: false}}\n")
    evaluator = BlockwiseDistillation(str(config), str(tmp_path / "lib"))
    assert evaluator.trace_kwargs["config"] == str(config) and evaluator.config.base_dir == str(tmp_path)
    with pytest.raises(ConfigError, match="distill.epochs"):
        BlockwiseDistillation(str(config), "lib", overrides={"distill": {"epochs": 0}})
    with pytest.raises(ValueError, match="if_exists"):
        BlockwiseDistillation(str(config), "lib", if_exists="maybe")
    with pytest.raises(SearchError, match="epochs"):
        BlockwiseDistillation(str(config), "lib", finetune={"epochs": -1})


def test_structure_config_needs_no_weights_or_data(tmp_path):
    config = tiny_config(tmp_path, model={"teacher": {"checkpoint": "missing.pt", "pretrained": True}},
                         data={"name": "cifar10", "root": "nowhere"})
    structure = structure_config(config)
    assert structure.model.teacher.checkpoint is None and structure.data.name == "synthetic"
    evaluator = BlockwiseDistillation(config, str(tmp_path / "lib"))
    assert len(evaluator.space_choices()) == 7


def test_distillation_metrics(trained):
    _, manifest = trained
    intermediates, final = distillation_metrics(manifest)
    losses = [b["losses"] for b in manifest["blocks"]]
    assert len(intermediates) == 1 and intermediates[0]["block_2"] == losses[2][0]
    assert final["default"] == pytest.approx(-sum(l[-1] for l in losses) / len(losses))
    assert final["default"] < 0 and final["train_time_s"] > 0


def test_reuse_same_config_refuse_another(trained, tmp_path):
    evaluator, manifest = trained
    stamp = (evaluator.library_dir / "block_0.pt").stat().st_mtime_ns
    assert evaluator.distill()["wall_time_s"] == manifest["wall_time_s"]
    assert (evaluator.library_dir / "block_0.pt").stat().st_mtime_ns == stamp
    other = BlockwiseDistillation(tiny_config(tmp_path, distill={"lr": 0.01}), str(evaluator.library_dir))
    with pytest.raises(LibraryMismatchError, match=r"distill.lr \(0.05 -> 0.01\)"):
        other.distill()
    strict = BlockwiseDistillation(evaluator.config, str(evaluator.library_dir), if_exists="error")
    with pytest.raises(FileExistsError, match="if_exists"):
        strict.distill()


def test_evaluate_architecture_and_metrics(trained):
    evaluator, _ = trained
    result = evaluator.evaluate(SAMPLE)
    assert result["sample"] == SAMPLE and 0.0 <= result["student"]["val_accuracy"] <= 1.0
    assert (evaluator.library_dir / f"finetune_{result['id']}.json").is_file()
    intermediates, final = architecture_metrics(result)
    assert final["default"] == result["student"]["val_accuracy"]
    assert [m["train_loss"] for m in intermediates] == result["train_losses"]
    with pytest.raises(ArchitectureError, match="s3_i1"):
        evaluator.evaluate({k: v for k, v in SAMPLE.items() if k != "s3_i1"})
    with pytest.raises(TypeError, match="sample dict"):
        evaluator.evaluate(torch.nn.Identity())


def test_models_report_through_nni_and_round_trip(trained):
    evaluator, _ = trained
    model = ArchitectureModel(SAMPLE, evaluator, "candidate", 0, {"score": 1.5})
    with evaluator.mock_runtime(model):
        model.execute()
    assert isinstance(model.metric, float) and len(model.metrics.intermediates) == 1
    text = nni.dump(model)
    assert "__nni_obj__" not in text
    again = nni.load(text)
    assert isinstance(again, ArchitectureModel) and again.sample == SAMPLE and again.search == {"score": 1.5}
    assert again.metric == model.metric and again.status == ModelStatus.Frozen
    net = again.executable_model()
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    task = DistillationTask(evaluator)
    with evaluator.mock_runtime(task):
        task.execute()
    assert task.metric < 0 and len(task.metrics.intermediates) == 1
    assert isinstance(nni.load(nni.dump(task)), DistillationTask)
    assert sorted(task.executable_model().simplify()) == sorted(SAMPLE)
    with pytest.raises(ValueError, match="role"):
        ArchitectureModel(SAMPLE, evaluator, role="winner")


def test_gpu_check_names_trial_gpu_number(monkeypatch, tmp_path):
    from nni_pipebd.nni.evaluator import check_visible_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="trialGpuNumber: 2"):
        check_visible_gpus(tiny_config(tmp_path, execution={"workers": 2, "executor": "dp"}))
    check_visible_gpus(tiny_config(tmp_path, execution={"workers": 2, "executor": "dp", "device": "cpu"}))
    check_visible_gpus(tiny_config(tmp_path, execution={"workers": 1}))
