"""Teacher pretraining under Lightning: the same weights and accuracy for one seed, logs in the run's folder."""

import torch

from conftest import tiny_config
from nni_pipebd.spec.pretrain import prepare_teacher, train_teacher


def test_teacher_training_is_deterministic_and_cached(tmp_path):
    config = tiny_config(tmp_path, model={"teacher": {"checkpoint": "teachers/t.pt", "train_if_missing": True,
                                                      "train_epochs": 1, "pretrained": True}},
                         execution={"device": "cpu"})
    path = tmp_path / "teachers" / "t.pt"
    metrics = train_teacher(config, path, tmp_path / "run" / "logs")
    assert 0.0 <= metrics["val_accuracy"] <= 1.0
    assert train_teacher(config, tmp_path / "again.pt", tmp_path / "run2" / "logs") == metrics  # same accuracy ...
    first, again = torch.load(path, weights_only=True), torch.load(tmp_path / "again.pt", weights_only=True)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)  # ... same weights
    assert (tmp_path / "run" / "logs" / "teacher_t" / "version_0" / "metrics.csv").is_file()
    assert sorted(p.name for p in (tmp_path / "teachers").iterdir()) == ["t.pt"]  # nothing beside the checkpoint
    stamp = path.stat().st_mtime_ns
    prepare_teacher(config, tmp_path / "run3" / "logs")  # the checkpoint exists: nothing is trained
    assert path.stat().st_mtime_ns == stamp
    assert not (tmp_path / "run3").exists()
