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


@pytest.mark.slow  # runs long (over a second here)
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


# --- a cell-style user space (examples/custom/cell_space.py): InputChoice with n_chosen 1 and 2, widths as nni.choice
# expressions (w * 2, w // 2) shared by two layers; trained, ranked, searched by DNA and DONNA, frozen and finetuned

CELL = {"student": {"class_path": "cell_space:block_space"}}


@pytest.fixture(scope="module")
def cell_library(tmp_path_factory):
    root = tmp_path_factory.mktemp("cell_space_search")
    train(user_config(model=CELL, distill={"paths_per_step": 2}), root / "lib")
    return root / "lib"


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two threads wait on each other (196 s for this test, 20 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_input_choices_and_expressions_are_trained_searched_frozen_and_finetuned(cell_library, one_thread):
    from nni_pipebd.search.finetune import FinetuneSettings, finetune

    manifest = json.loads((cell_library / "library.json").read_text())
    assert manifest["blocks"][1]["choices"] == {"c1_width": [4, 8], "c1_op": ["conv3", "conv5"],
                                                "c1_first": [[0], [1]], "c1_pair": [[0, 1], [0, 2], [1, 2]]}
    dna = search_library(cell_library, "dna", "params=1e9", top_k=2, ranking=FAST)
    assert [b["num_paths"] for b in dna["ranking"]["blocks"]] == [24, 24, 24, 1]
    donna = search_library(cell_library, "donna", "params=1e9", top_k=1, ranking=FAST, predictor_archs=3,
                           finetune_settings=FinetuneSettings(epochs=1, max_steps_per_epoch=1), population=8,
                           generations=3)
    lib = open_library(cell_library)
    for result in (dna, donna):
        arch = result["architectures"][0]
        sample = arch["sample"]
        assert len(sample["c0_first"]) == 1 and len(sample["c0_pair"]) == 2 and isinstance(sample["c0_width"], int)
        net = build_network(lib, sample)
        assert arch["cost"]["params"] == count_params(net)
        assert net.blocks[0].entry[0].weight.shape[0] == 2 * sample["c0_width"]  # the expression, frozen
        assert net.blocks[0].squeeze[0].weight.shape[0] == sample["c0_width"] // 2
    tuned = finetune(cell_library, dna["architectures"][0]["sample"], FinetuneSettings(epochs=1, max_steps_per_epoch=1))
    assert tuned["student"]["params"] == dna["architectures"][0]["cost"]["params"]
    assert 0.0 <= tuned["student"]["val_accuracy"] <= 1.0
