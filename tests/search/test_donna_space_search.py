"""DONNA search end to end on a library of the built-in DONNA space (model.student.kind: donna): NSR scores,
predictor features and NSGA-II over its labels (int kernels, expansions, widths and Repeat depths; str attention)."""

import itertools
import json

import pytest
import torch

from conftest import tiny_config
from nni_pipebd.executors.launch import train
from nni_pipebd.search.costs import Budget, count_params
from nni_pipebd.search.donna import (AccuracyPredictor, architecture_features, donna_search, predictor_from_results,
                                     sample_architectures)
from nni_pipebd.search.finetune import FinetuneSettings, build_network
from nni_pipebd.search.loaded import open_library
from nni_pipebd.search.ranking import RankingSettings, rank_library
from nni_pipebd.search.runner import search_library

pytestmark = pytest.mark.timeout(300)

RANKING = RankingSettings(max_paths=12, latency_runs=0, val_batches=2, calib_batches=2)
NAMES = ("kernel", "expansion", "depth", "attention", "width")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("donna_space")
    # mse: nmse (the kind's default) divides by the random tiny teacher's near-zero feature maps and blows up
    config = tiny_config(root, model={"student": {"kind": "donna", "kernels": [3, 5], "expansions": [2, 4]}},
                         distill={"loss": "mse"})
    train(config, root / "lib")
    return root / "lib"


@pytest.mark.slow  # runs long (over a second here)
def test_scores_name_the_donna_labels_and_values(library):
    scores = rank_library(library, RANKING)
    searchable = [b for b in scores["blocks"] if b["labels"]]
    assert scores["loss"] == "mse" and len(searchable) == 4
    for block in searchable:
        i = block["index"]
        assert sorted(block["labels"]) == sorted(f"s{i}_{name}" for name in NAMES)
        assert block["scored"] == min(12, block["num_paths"]) and block["num_paths"] % 24 == 0
        for entry in block["paths"]:
            path = entry["path"]
            assert path[f"s{i}_attention"] in ("none", "se") and path[f"s{i}_kernel"] in (3, 5)
            assert all(isinstance(path[f"s{i}_{name}"], int) for name in ("kernel", "expansion", "depth", "width"))
            assert entry["nsr"] >= 0 and entry["params"] > 0
    # scored paths of a block with more candidates than max_paths: a sample over every label, depths included
    deep = max(searchable, key=lambda b: b["num_paths"])
    assert len({e["path"][f"s{deep['index']}_depth"] for e in deep["paths"]}) > 1


def test_donna_search_over_the_donna_space(library):
    scores = json.loads(json.dumps(rank_library(library, RANKING)))  # values as scores.json gives them back
    samples = sample_architectures(scores, 12, seed=1)
    features = architecture_features(scores, samples)
    assert features.shape == (12, 4)
    accuracy = 0.9 - 0.1 * features.sum(1)
    fitted = predictor_from_results(scores, samples, accuracy)
    assert fitted["r2"] == pytest.approx(1.0)
    predictor = AccuracyPredictor.from_dict(fitted["predictor"])
    params = [[e["params"] for e in b["paths"]] for b in scores["blocks"]]
    low, high = sum(min(p) for p in params), sum(max(p) for p in params)
    limit = low + 0.5 * (high - low)
    front = donna_search(scores, predictor, Budget("params", limit), population=16, generations=15)
    assert front and all(a["cost"]["params"] <= limit for a in front)
    accs = [a["predicted_accuracy"] for a in front]
    assert accs == sorted(accs, reverse=True)
    lib = open_library(library)
    for arch in front[:3]:
        sample = arch["sample"]
        assert sorted(sample) == sorted(f"s{i}_{name}" for i in range(4) for name in NAMES)
        assert isinstance(sample["s0_depth"], int) and isinstance(sample["s0_attention"], str)
        assert arch["predicted_accuracy"] == pytest.approx(0.9 - 0.1 * architecture_features(scores, [sample]).sum())
        net = build_network(lib, sample)  # the frozen DONNA blocks and the head
        assert arch["cost"]["params"] == count_params(net)
        assert len(net.blocks[0].layers) == sample["s0_depth"]
        net.eval()
        assert net(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.slow  # runs long (over a second here)
def test_search_cli_flow_fits_the_predictor_by_finetuning(library):
    result = search_library(library, "donna", "params=1e9", top_k=2, ranking=RANKING, predictor_archs=3,
                            finetune_settings=FinetuneSettings(epochs=1, max_steps_per_epoch=1), population=8,
                            generations=4)
    assert len(result["predictor"]["blocks"]) == 4 and len(result["architectures"]) <= 2
    best = result["architectures"][0]["sample"]
    assert {f"s3_{name}" for name in NAMES} <= set(best)


def test_donna_search_functions_on_float_str_and_int_values_after_json():
    """Scores over labels of any value type (a float ratio, a str op, a Repeat depth), as scores.json gives them."""
    blocks = []
    for i in range(3):
        paths = [{"path": {f"b{i}_ratio": r, f"b{i}_op": op, f"b{i}_depth": d},
                  "nsr": 0.1 * (i + 1) / r + 0.01 * d, "loss": 0.0, "params": int(100 * r * (d + 1)), "flops": 1,
                  "latency_ms": None}
                 for r in (0.5, 0.75, 1.0) for op in ("conv3", "skip") for d in (0, 1, 2)]
        blocks.append({"index": i, "labels": [f"b{i}_ratio", f"b{i}_op", f"b{i}_depth"], "num_paths": 18,
                       "scored": 18, "exhaustive": True, "paths": paths})
    blocks.append({"index": 3, "labels": [], "num_paths": 1, "scored": 1, "exhaustive": True,
                   "paths": [{"path": {}, "nsr": 0.0, "loss": 0.0, "params": 7, "flops": 1, "latency_ms": None}]})
    scores = json.loads(json.dumps({"blocks": blocks}))
    samples = sample_architectures(scores, 6, seed=0)
    assert all(isinstance(s["b0_ratio"], float) and isinstance(s["b0_op"], str) and isinstance(s["b0_depth"], int)
               for s in samples)
    features = architecture_features(scores, samples)
    predictor = AccuracyPredictor.from_dict(predictor_from_results(scores, samples, 1 - features.sum(1))["predictor"])
    front = donna_search(scores, predictor, Budget("params", 700), population=32, generations=40)
    assert front and all(a["cost"]["params"] <= 700 for a in front)
    best = front[0]["sample"]
    # the best under the budget: the widest ratio wins NSR, depth 0 is cheapest — checked by enumeration
    assert architecture_features(scores, [best]).sum() == pytest.approx(min(
        sum(e["nsr"] for e in combo) for combo in itertools.product(*(b["paths"] for b in blocks[:3]))
        if sum(e["params"] for e in combo) + 7 <= 700))
    assert architecture_features(scores, [{**best, "b0_ratio": 1}]).shape == (1, 3)  # 1 == 1.0 as in JSON
