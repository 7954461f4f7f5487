"""Export -> freeze -> forward with library weights; finetuning; architecture files and key errors."""

import json

import pytest
import torch
from nni.nas.nn.pytorch import LayerChoice

from conftest import tiny_config
from nni_pipebd.executors.launch import train
from nni_pipebd.library import load_block
from nni_pipebd.search.constrained import dna_search
from nni_pipebd.search.costs import parse_budget
from nni_pipebd.search.errors import ArchitectureError, SearchError
from nni_pipebd.search.finetune import (FinetuneSettings, architecture_id, build_network, finetune,
                                        load_architecture)
from nni_pipebd.search.loaded import open_library
from nni_pipebd.search.ranking import RankingSettings, rank_library

SAMPLE = {"s0_i0": "k5e2", "s1_i0": "k3e2", "s1_i1": "k5e2", "s2_i0": "k5e2", "s2_i1": "k3e2", "s3_i0": "k3e2",
          "s3_i1": "k5e2"}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    train(tiny_config(root), root / "lib")
    return root / "lib"


def test_search_export_freeze_forward_round_trip(library):
    scores = rank_library(library, RankingSettings(latency_runs=0))
    sample = dna_search(scores, parse_budget("params=1e9"))[0]["sample"]
    lib = open_library(library)
    net = build_network(lib, sample)
    assert not any(isinstance(m, LayerChoice) for m in net.modules())
    state = net.state_dict()
    for i in range(lib.num_blocks):  # every weight of the network is the library's
        saved = load_block(library, i)
        mine = {k[len(f"blocks.{i}."):]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        assert mine and all(torch.equal(v, saved[k] if k in saved else _candidate_weight(saved, k, sample, i))
                            for k, v in mine.items())
    x = torch.randn(4, 3, 16, 16)
    net.eval()
    expected = x
    with torch.no_grad():
        for block in lib.job.spec.student:
            if getattr(block, "choices", {}):
                block.set_path(sample)
            expected = block.eval()(expected)
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    with torch.no_grad():  # an independent copy: training it leaves the library untouched
        next(net.parameters()).add_(1.0)
    assert torch.equal(next(open_library(library).job.spec.student[0].parameters()),
                       next(lib.job.spec.student[0].parameters()))


def _candidate_weight(saved, key, sample, block):
    """The library key of a frozen layer's weight: ``layers.{j}.{candidate}.rest``."""
    _, j, rest = key.split(".", 2)
    return saved[f"layers.{j}.{sample[f's{block}_i{j}']}.{rest}"]


def test_wrong_sample_keys_name_bad_and_valid_ones(library):
    lib = open_library(library)
    bad = {**SAMPLE, "s9_i0": "k3e2", "s1_i0": "k7e9"}
    del bad["s0_i0"]
    with pytest.raises(ArchitectureError) as info:
        build_network(lib, bad)
    message = str(info.value)
    assert "unknown labels ['s9_i0']" in message and "missing labels ['s0_i0']" in message
    assert "s1_i0='k7e9' is not a candidate (valid: ['k3e2', 'k5e2'])" in message
    assert "'s3_i1': ['k3e2', 'k5e2']" in message
    assert info.value.unknown == ["s9_i0"] and info.value.missing == ["s0_i0"]


@pytest.mark.slow  # runs long (over a second here)
def test_finetune_trains_evaluates_and_writes(library, tmp_path):
    out, model = tmp_path / "result.json", tmp_path / "model.pt"
    settings = FinetuneSettings(epochs=2, max_steps_per_epoch=2, lr=0.01)
    result = finetune(library, SAMPLE, settings, out=out, save_model=model)
    assert json.loads(out.read_text()) == result
    assert result["id"] == architecture_id(SAMPLE) and result["sample"] == SAMPLE
    assert len(result["train_losses"]) == 2
    for side in ("student", "teacher"):
        assert 0 <= result[side]["val_accuracy"] <= 1 and result[side]["params"] > 0
    assert result["params_ratio"] == result["student"]["params"] / result["teacher"]["params"]
    state = torch.load(model, weights_only=True)
    initial = build_network(open_library(library), SAMPLE).state_dict()
    assert state.keys() == initial.keys()
    assert any(not torch.equal(state[k], v) for k, v in initial.items() if v.is_floating_point())
    again = finetune(library, SAMPLE, settings)
    assert again["student"]["val_accuracy"] == result["student"]["val_accuracy"]
    assert again["train_losses"] == result["train_losses"]


def test_finetune_labels_scratch_and_zero_epochs(library):
    result = finetune(library, SAMPLE, FinetuneSettings(epochs=0))
    assert result["student"]["val_accuracy"] == result["student"]["val_accuracy_init"]
    assert result["train_losses"] == []
    scratch = finetune(library, SAMPLE, FinetuneSettings(epochs=1, max_steps_per_epoch=1, mode="labels",
                                                         init="scratch"))
    assert len(scratch["train_losses"]) == 1


def test_load_architecture_forms(tmp_path):
    plain, one, many = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    plain.write_text(json.dumps(SAMPLE))
    one.write_text(json.dumps({"sample": SAMPLE, "score": 1.0}))
    many.write_text(json.dumps({"architectures": [{"sample": SAMPLE}, {"sample": {}}]}))
    assert load_architecture(plain) == load_architecture(one) == load_architecture(many) == SAMPLE
    with pytest.raises(SearchError, match="does not exist"):
        load_architecture(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SearchError, match="must hold an NNI sample dict"):
        load_architecture(tmp_path / "bad.json")
    with pytest.raises(SearchError, match="empty list"):
        load_architecture({"architectures": []})


def test_bad_settings():
    with pytest.raises(SearchError, match="mode = 'soft'"):
        FinetuneSettings(mode="soft")
    with pytest.raises(SearchError, match="kd_weight"):
        FinetuneSettings(kd_weight=2.0)
    with pytest.raises(SearchError, match=r"finetune setting precision = 'fp16' is not valid; choose one of \['32-true'"):
        FinetuneSettings(precision="fp16")
    with pytest.raises(SearchError, match="finetune setting devices = 0 must be an int >= 1"):
        FinetuneSettings(devices=0)
    with pytest.raises(SearchError, match=r"finetune setting strategy = 'horovod' is not valid; .*'ddp_spawn'"):
        FinetuneSettings(strategy="horovod")
    options = FinetuneSettings(precision="bf16-mixed", devices=2, strategy="ddp").trainer_options("cpu")
    assert (options.accelerator, options.devices, options.precision, options.strategy) == ("cpu", 2, "bf16-mixed", "ddp")
