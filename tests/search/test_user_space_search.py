"""DNA ranking and constrained search over a user's NNI block space: its own labels, int and str values, Repeat depths."""

import json

import pytest
import torch

from conftest import user_config
from nni_pipebd.executors.launch import train
from nni_pipebd.search.costs import count_params, parse_budget
from nni_pipebd.search.finetune import build_network
from nni_pipebd.search.loaded import open_library
from nni_pipebd.search.ranking import RankingSettings
from nni_pipebd.search.runner import search_library

pytestmark = pytest.mark.timeout(300)

FAST = RankingSettings(latency_runs=0, val_batches=2, calib_batches=2)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_space_search")
    train(user_config(model={"student": {"class_path": "custom_space:block_space"}}), root / "lib")
    return root / "lib"


def test_dna_search_over_the_user_space(library):
    result = search_library(library, "dna", "params=1e9", top_k=3, ranking=FAST)
    blocks = result["ranking"]["blocks"]
    assert [b["num_paths"] for b in blocks] == [18, 18, 18, 1] and all(b["exhaustive"] for b in blocks)
    best = result["architectures"][0]["sample"]
    assert sorted(best) == sorted(f"b{i}_{name}" for i in range(3) for name in ("width", "op", "depth"))
    assert isinstance(best["b0_width"], int) and isinstance(best["b0_depth"], int) and isinstance(best["b0_op"], str)
    scores = json.loads((library / "scores.json").read_text())
    assert scores["blocks"][1]["labels"] == ["b1_width", "b1_op", "b1_depth"]
    # costs are those of the frozen network the architecture builds
    lib = open_library(library)
    net = build_network(lib, best)
    assert result["architectures"][0]["cost"]["params"] == count_params(net)
    net.eval()
    assert net(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_a_budget_prefers_the_small_paths(library):
    everything = search_library(library, "dna", "params=1e9", top_k=1, ranking=FAST)["architectures"][0]
    smallest = min(search_library(library, "dna", "params=1e9", top_k=50, ranking=FAST)["architectures"],
                   key=lambda a: a["cost"]["params"])
    tight = search_library(library, "dna", f"params={smallest['cost']['params']}", top_k=1, ranking=FAST)
    found = tight["architectures"][0]
    assert parse_budget(tight["budget"]).fits(found["cost"]["params"])
    assert found["cost"]["params"] <= everything["cost"]["params"]
