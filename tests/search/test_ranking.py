"""DNA ranking: scores per path after BN recalibration, deterministic, cached in scores.json."""

import copy
import json

import pytest
import torch

from conftest import tiny_config
from nni_pipebd.data.datasets import build_dataset, make_loader
from nni_pipebd.distill.loss import get_loss
from nni_pipebd.executors.launch import train
from nni_pipebd.search.errors import SearchError
from nni_pipebd.search.loaded import calib_batches, open_library, recalibrate_bn
from nni_pipebd.search.ranking import SCORES, RankingSettings, block_paths, rank_library

FAST = RankingSettings(latency_runs=0)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranking")
    train(tiny_config(root), root / "lib")
    return root / "lib"


def _without_latency(scores):
    return [[{k: v for k, v in e.items() if k != "latency_ms"} for e in b["paths"]] for b in scores["blocks"]]


def test_scores_every_path_and_the_head(library):
    scores = rank_library(library, FAST, force=True)
    assert [b["num_paths"] for b in scores["blocks"]] == [2, 4, 4, 4, 1]
    assert all(b["exhaustive"] and b["scored"] == b["num_paths"] for b in scores["blocks"])
    head = scores["blocks"][-1]
    assert head["labels"] == [] and head["paths"][0]["path"] == {}
    first = scores["blocks"][1]["paths"]
    assert [e["path"] for e in first] == [{"s1_i0": a, "s1_i1": b} for a in ("k3e2", "k5e2") for b in ("k3e2", "k5e2")]
    assert all(e["loss"] > 0 and e["nsr"] > 0 and e["params"] > 0 and e["flops"] > 0 for b in scores["blocks"]
               for e in b["paths"])
    assert json.loads((library / SCORES).read_text()) == scores


def test_ranking_is_deterministic(library):
    a = rank_library(library, FAST, force=True)
    b = rank_library(library, FAST, force=True)
    assert _without_latency(a) == _without_latency(b)


def test_score_matches_a_hand_computation(library):
    scores = rank_library(library, FAST)
    lib = open_library(library)
    teacher, config = lib.job.spec.teacher, lib.config
    val = build_dataset(config.data, config.base_dir, "val")
    x_val = val.tensors[0][:config.data.batch_size * FAST.val_batches]
    (x_cal,) = [torch.cat([images for images, _ in make_loader(
        lib.job.dataset, calib_batches(lib.job.dataset, config.data.batch_size, FAST.seed, FAST.calib_batches))])]
    index, entry = 2, scores["blocks"][2]["paths"][3]
    with torch.no_grad():
        for block in teacher[:index]:
            x_val, x_cal = block(x_val), block(x_cal)
        target = teacher[index](x_val)
        student = copy.deepcopy(lib.job.spec.student[index])
        student.set_path(entry["path"])
        bs = config.data.batch_size
        recalibrate_bn(student, list(x_cal.split(bs)))
        out = student(x_val)
    loss = get_loss(config.distill.loss)
    expected = sum(float(loss(o, t)) * len(o) for o, t in zip(out.split(bs), target.split(bs))) / len(out)
    assert entry["loss"] == pytest.approx(expected, rel=1e-5)
    assert entry["nsr"] == pytest.approx(float((out - target).pow(2).sum() / target.pow(2).sum()), rel=1e-5)


def test_scores_are_reused_only_with_the_same_settings(library):
    first = rank_library(library, FAST, force=True)
    again = rank_library(library, FAST)
    assert again["time_s"] == first["time_s"]  # read back, not recomputed
    other = rank_library(library, RankingSettings(latency_runs=0, val_batches=1))
    assert other["settings"]["val_batches"] == 1 and other["time_s"] != first["time_s"]


def test_block_paths_samples_distinct_paths_when_too_many():
    choices = {"a": ["x", "y", "z"], "b": ["x", "y", "z"], "c": ["x", "y"]}
    paths, total, exhaustive = block_paths(choices, 5, seed=1, index=3)
    assert total == 18 and not exhaustive and len(paths) == 5
    assert len({tuple(p.values()) for p in paths}) == 5
    assert block_paths(choices, 5, seed=1, index=3)[0] == paths
    assert block_paths(choices, 5, seed=2, index=3)[0] != paths
    assert block_paths(choices, 18, seed=1, index=3)[2] is True


def test_sampled_blocks_record_sample_size(library):
    scores = rank_library(library, RankingSettings(max_paths=3, latency_runs=0))
    assert [(b["scored"], b["exhaustive"]) for b in scores["blocks"]] == [(2, True), (3, False), (3, False),
                                                                           (3, False), (1, True)]


def test_recalibrate_bn_averages_batch_statistics():
    bn = torch.nn.BatchNorm2d(2)
    bn.running_mean.fill_(5.0)
    inputs = [torch.randn(4, 2, 3, 3) + 1, torch.randn(4, 2, 3, 3) - 3]
    recalibrate_bn(bn, inputs)
    expected = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected)
    assert not bn.training and bn.momentum == 0.1


def test_bad_settings():
    with pytest.raises(SearchError, match="max_paths = 0"):
        RankingSettings(max_paths=0)
    with pytest.raises(SearchError, match="latency_runs"):
        RankingSettings(latency_runs=-1)
