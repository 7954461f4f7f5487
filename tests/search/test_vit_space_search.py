"""A ViT teacher distilled block by block into the built-in transformer space (model.student.kind: vit), then
searched by DNA and DONNA and finetuned, on CPU."""

import json

import pytest
import torch

from conftest import tiny_config
from nni_pipebd.executors.launch import train
from nni_pipebd.search.costs import count_params
from nni_pipebd.search.finetune import FinetuneSettings, build_network, finetune
from nni_pipebd.search.loaded import open_library
from nni_pipebd.search.ranking import RankingSettings
from nni_pipebd.search.runner import search_library

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

FAST = RankingSettings(latency_runs=0, val_batches=2, calib_batches=2)
VIT = {"teacher": {"arch": None, "kwargs": {}, "class_path": "torchvision.models.vision_transformer.VisionTransformer",
                   "init_args": {"image_size": 16, "patch_size": 4, "num_layers": 8, "num_heads": 2, "hidden_dim": 16,
                                 "mlp_dim": 32, "num_classes": 10}},
       "student": {"kind": "vit", "widths": [0.5, 1.0], "heads": [2, 4], "mlp_ratios": [2, 4]}}
NAMES = ("embed", "depth", "heads", "mlp_ratio")


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_vit_teacher_distilled_searched_and_finetuned(tmp_path, one_thread):
    manifest = train(tiny_config(tmp_path, model=VIT, distill={"loss": "mse"}), tmp_path / "lib")
    assert manifest["num_blocks"] == 5  # 8 encoder layers in 4 blocks of 2, the head
    assert manifest["blocks"][1]["choices"] == {"s1_embed": [8, 16], "s1_depth": [1, 2], "s1_heads": [2, 4],
                                                "s1_mlp_ratio": [2, 4]}
    assert all(len(block["losses"]) == 1 for block in manifest["blocks"])
    dna = search_library(tmp_path / "lib", "dna", "params=1e9", top_k=2, ranking=FAST)
    assert [b["num_paths"] for b in dna["ranking"]["blocks"]] == [16, 16, 16, 16, 1]
    donna = search_library(tmp_path / "lib", "donna", "params=1e9", top_k=1, ranking=FAST, predictor_archs=3,
                           finetune_settings=FinetuneSettings(epochs=1, max_steps_per_epoch=1), population=8,
                           generations=3)
    library = open_library(tmp_path / "lib")
    for result in (dna, donna):
        arch = result["architectures"][0]
        sample = arch["sample"]
        assert sorted(sample) == sorted(f"s{i}_{name}" for i in range(4) for name in NAMES)
        net = build_network(library, sample).eval()
        assert arch["cost"]["params"] == count_params(net)
        assert len(net.blocks[2].layers) == sample["s2_depth"]
        assert net.blocks[2].layers[0].attn.num_heads == sample["s2_heads"]
        assert net(torch.zeros(2, 3, 16, 16)).shape == (2, 10)
    tuned = finetune(tmp_path / "lib", dna["architectures"][0]["sample"],
                     FinetuneSettings(epochs=1, max_steps_per_epoch=1))
    assert tuned["student"]["params"] == dna["architectures"][0]["cost"]["params"]
    assert json.loads((tmp_path / "lib" / "library.json").read_text())["config"]["model"]["student"]["kind"] == "vit"
