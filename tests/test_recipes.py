"""The CIFAR-10 and ImageNet recipes run on small generated data laid out like the real thing."""

import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torchvision.datasets import CIFAR10

from datagen import _make_cifar
from nni_pipebd.config import Config, load_config
from nni_pipebd.executors.launch import train
from nni_pipebd.spec.teachers import build_teacher_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.timeout(300)


def shrink(raw: dict, tmp_path: Path, **data) -> Config:
    raw["data"].update(batch_size=4, num_workers=0, **data)
    raw["distill"].update(epochs=1, max_steps_per_epoch=1)
    raw["execution"].update(executor="pipebd", workers=2, plan=None, device="cpu", threads_per_worker=1,
                            checkpoint_every=None)
    return Config.from_dict(raw, tmp_path)


@pytest.mark.parametrize("name", ["config.yaml", "config-cpu.yaml"])
@pytest.mark.slow  # runs long (over a second here)
def test_cifar10_recipe(tmp_path, monkeypatch, name):
    root = tmp_path / "data" / "cifar10"
    _make_cifar(root, per_batch=4, test=4)
    folder = root / "cifar-10-batches-py"
    import hashlib
    md5 = {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in [f"data_batch_{i}" for i in range(1, 6)]
           + ["test_batch", "batches.meta"]}
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5[n]] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5[n]] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    raw = yaml.safe_load((EXAMPLES / "cifar10" / name).read_text())
    raw["model"]["teacher"]["kwargs"] = {"width_mult": 0.25}
    raw["model"]["teacher"]["train_epochs"] = 1
    config = shrink(raw, tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config.to_dict()))
    # the recipe's teacher script (in-process, so the checksum patch applies)
    sys.path.insert(0, str(EXAMPLES / "cifar10"))
    try:
        from train_teacher import main as train_teacher
        assert train_teacher([str(job), "--epochs", "1", "--log-dir", str(tmp_path / "logs")]) == 0
    finally:
        sys.path.remove(str(EXAMPLES / "cifar10"))
    assert (tmp_path / raw["model"]["teacher"]["checkpoint"]).is_file()
    manifest = train(config.replace(execution={"executor": "reference", "workers": 1}), tmp_path / "lib")
    assert manifest["num_blocks"] == 6 and manifest["counters"]["samples_per_block"] == 4


@pytest.mark.slow
def test_imagenet_recipe_on_image_folder(tmp_path):
    for split, per_class in (("train", 3), ("val", 1)):
        for label, colour in (("n01", (255, 0, 0)), ("n02", (0, 0, 255))):
            folder = tmp_path / "data" / "imagenet" / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (80, 60), colour).save(folder / f"{i}.JPEG")
    raw = yaml.safe_load((EXAMPLES / "imagenet" / "config.yaml").read_text())
    assert raw["model"]["teacher"]["weights"] == "IMAGENET1K_V1"
    # no hub weights here: stand in a local checkpoint of the same architecture (the recipe's other option)
    torch.save(build_teacher_model("efficientnet_b0", 2).state_dict(), tmp_path / "teacher.pt")
    raw["model"]["teacher"].update(weights=None, checkpoint="teacher.pt", num_classes=2)
    config = shrink(raw, tmp_path, image_size=64)
    manifest = train(config, tmp_path / "lib")
    assert manifest["num_blocks"] == 6 and manifest["executor"] == "pipebd"


def test_dna_recipe_timm_teacher_on_image_folder(tmp_path):
    """examples/dna, reduced: a TF-ported timm EfficientNet (B0 for B7) on a generated ImageFolder, DNA's space."""
    timm = pytest.importorskip("timm")
    for split, per_class in (("train", 3), ("val", 1)):
        for label, colour in (("n01", (255, 0, 0)), ("n02", (0, 0, 255))):
            folder = tmp_path / "data" / "imagenet" / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (80, 60), colour).save(folder / f"{i}.JPEG")
    raw = yaml.safe_load((EXAMPLES / "dna" / "config.yaml").read_text())
    teacher = raw["model"]["teacher"]
    assert teacher["class_path"] == "timm.create_model" and teacher["init_args"]["model_name"] == "tf_efficientnet_b7"
    assert raw["model"]["student"] == {"kind": "dna", "kernels": [3, 5, 7], "expansions": [3, 6], "identity": True}
    assert raw["data"]["name"] == "imagefolder" and raw["execution"]["workers"] == 8
    teacher["init_args"] = {"model_name": "tf_efficientnet_b0", "num_classes": 2}
    torch.save(timm.create_model("tf_efficientnet_b0", num_classes=2).state_dict(), tmp_path / teacher["checkpoint"])
    raw["model"]["student"].update(kernels=[3], expansions=[3])
    config = shrink(raw, tmp_path, image_size=64).replace(execution={"executor": "reference", "workers": 1})
    manifest = train(config, tmp_path / "lib")
    assert manifest["num_blocks"] == 6 and manifest["counters"]["samples_per_block"] == 4


def test_recipe_files_parse():
    for path in (EXAMPLES / "cifar10" / "config.yaml", EXAMPLES / "cifar10" / "config-cpu.yaml",
                 EXAMPLES / "imagenet" / "config.yaml", EXAMPLES / "digits" / "config.yaml",
                 EXAMPLES / "dna" / "config.yaml"):
        assert load_config(path).execution.workers >= 1
