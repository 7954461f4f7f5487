"""Compression: a fixed student trained blockwise, finetuned, compared with the teacher."""

import json

import pytest

from conftest import tiny_config
from nni_pipebd.cli import main
from nni_pipebd.executors.launch import train
from nni_pipebd.search.compress import COMPRESSION, compress, compression_report
from nni_pipebd.search.errors import SearchError
from nni_pipebd.search.finetune import FinetuneSettings
from nni_pipebd.search.runner import search_library

SETTINGS = FinetuneSettings(epochs=1, max_steps_per_epoch=2, lr=0.01)


@pytest.mark.parametrize("executor, workers", [("reference", 1), ("dp", 2)])
@pytest.mark.slow
def test_compress_end_to_end(tmp_path, executor, workers):
    config = tiny_config(tmp_path, model={"student": {"kind": "fixed", "path": "k3e2", "width_mult": 0.5}},
                         execution={"executor": executor, "workers": workers})
    report = compress(config, tmp_path / "lib", SETTINGS)
    assert json.loads((tmp_path / "lib" / COMPRESSION).read_text()) == report
    assert report["sample"] == {}
    student, teacher = report["student"], report["teacher"]
    assert 0 < student["params"] < teacher["params"]
    assert report["compression"] == pytest.approx(teacher["params"] / student["params"])
    assert report["accuracy_drop"] == pytest.approx(teacher["val_accuracy"] - student["val_accuracy"])
    assert 0 <= student["val_accuracy"] <= 1 and len(report["train_losses"]) == 1
    assert json.loads((tmp_path / "lib" / "library.json").read_text())["executor"] == executor
    with pytest.raises(SearchError, match="nothing to search"):
        search_library(tmp_path / "lib", "dna", "params=1e9")
    assert main(["finetune", str(tmp_path / "lib"), "--epochs", "0", "--out", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["student"]["params"] == student["params"]


def test_compression_needs_a_fixed_student(tmp_path):
    with pytest.raises(SearchError, match="kind: fixed"):
        compress(tiny_config(tmp_path), tmp_path / "lib", SETTINGS)
    train(tiny_config(tmp_path), tmp_path / "lib")
    with pytest.raises(SearchError, match="supernet library .* 7 layer choices"):
        compression_report(tmp_path / "lib", SETTINGS)
