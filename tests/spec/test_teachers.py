"""Tests of nni_pipebd.spec.teachers: building, flattening, splitting and loading teachers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nni_pipebd.config import TeacherConfig
from nni_pipebd.spec.teachers import (
    BUILTIN_ARCHS,
    TeacherError,
    TeacherWeightsNotFoundError,
    build_teacher,
    build_teacher_blocks,
    build_teacher_model,
    load_teacher_weights,
    torchvision_archs,
)

SMALL_KWARGS = {
    "mobilenet_v2": {"width_mult": 0.35},
    "efficientnet_b0": {},
    "resnet18": {},
    "digits_cnn": {"width": 8},
}
EXPECTED_BOUNDARIES = {
    "mobilenet_v2": ["features.2", "features.4", "features.7", "features.14", "features.18"],
    "efficientnet_b0": ["features.2", "features.3", "features.4", "features.6", "features.8"],
    "resnet18": ["layer1", "layer2", "layer3", "layer4", "avgpool"],
    "digits_cnn": ["stage1_down", "stage2_down", "stage3_down", "head"],
}


def _randomize_bn_stats(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)


def _saved_model(arch: str, tmp_path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = build_teacher_model(arch, 10, SMALL_KWARGS[arch])
    _randomize_bn_stats(model)
    path = tmp_path / f"{arch}.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), path


@pytest.mark.parametrize("arch", list(SMALL_KWARGS))
def test_blocks_reproduce_model_exactly(arch: str, tmp_path: Path) -> None:
    model, path = _saved_model(arch, tmp_path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    teacher = build_teacher(TeacherConfig(arch=arch, kwargs=SMALL_KWARGS[arch], checkpoint=str(path)))
    blocks, names = build_teacher_blocks(teacher, x)
    assert names == EXPECTED_BOUNDARIES[arch]
    with torch.no_grad():
        expected = model(x)
        out = x
        for block in blocks:
            out = block(out)
    assert out.shape == (2, 10)
    assert torch.equal(out, expected)
    for block in blocks:
        assert not block.training
        assert all(not m.training for m in block.modules())
        assert all(not p.requires_grad for p in block.parameters())


def test_every_torchvision_classifier_is_an_arch() -> None:
    import torchvision.models as tvm

    assert set(torchvision_archs()) == set(tvm.list_models(module=tvm))
    assert {"efficientnet_b7", "regnet_y_400mf", "convnext_tiny", "vit_b_16"} <= set(torchvision_archs())
    model = build_teacher_model("regnet_x_400mf", 7)
    assert model.fc.out_features == 7


def test_explicit_boundaries_by_name_and_index() -> None:
    model = build_teacher_model("digits_cnn", 5, {"in_channels": 1, "width": 4})
    x = torch.zeros(1, 1, 28, 28)
    blocks, names = build_teacher_blocks(model, x)
    assert len(blocks) == 5
    blocks, names = build_teacher_blocks(model, x, boundaries=[3, 7])
    assert names == ["stage2_down", "head"]
    blocks_by_name, _ = build_teacher_blocks(model, x, boundaries=["stage2_down", "head"])
    out = blocks[-1](blocks[1](blocks[0](x)))
    assert out.shape == (1, 5)
    assert torch.equal(out, blocks_by_name[2](blocks_by_name[1](blocks_by_name[0](x))))
    with pytest.raises(TeacherError, match="not a child index"):
        build_teacher_blocks(model, x, boundaries=[9])


def test_class_path_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_teacher.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, width=4, classes=3):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, width, 3, stride=2, padding=1)\n"
        "        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)\n"
        "        self.fc = nn.Linear(width, classes)\n\n"
        "    def forward(self, x):\n"
        "        x = torch.relu(self.conv2(torch.relu(self.conv(x))))\n"
        "        return self.fc(x.mean((2, 3)))\n\n"
        "def make(**kwargs):\n"
        "    return Net(**kwargs)\n\n"
        "NOT_A_MODEL = 3\n"
        "def not_a_module():\n"
        "    return 'model'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for path in ("my_teacher:make", "my_teacher.Net"):
        model = build_teacher(TeacherConfig(class_path=path, init_args={"width": 6}), tmp_path)
        assert model.conv.out_channels == 6
        blocks, names = build_teacher_blocks(model, torch.randn(2, 3, 16, 16))
        assert names == ["conv2", "mean"]  # the functional mean starts the head
    with pytest.raises(TeacherError, match="rejects init_args"):
        build_teacher(TeacherConfig(class_path="my_teacher:make", init_args={"depth": 2}), tmp_path)
    with pytest.raises(TeacherError, match="returned a str, not a torch.nn.Module"):
        build_teacher(TeacherConfig(class_path="my_teacher:not_a_module"), tmp_path)
    with pytest.raises(TeacherError, match="has no attribute 'Nett'"):
        build_teacher(TeacherConfig(class_path="my_teacher:Nett"), tmp_path)
    with pytest.raises(TeacherError, match="no module named 'nowhere_teacher'"):
        build_teacher(TeacherConfig(class_path="nowhere_teacher:make"), tmp_path)
    with pytest.raises(TeacherError, match="not a class or function"):
        build_teacher(TeacherConfig(class_path="my_teacher:NOT_A_MODEL"), tmp_path)


def test_class_path_beside_the_config(tmp_path: Path) -> None:
    (tmp_path / "teacher_beside_config.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(),"
        " nn.LazyLinear(2))\n")
    model = build_teacher(TeacherConfig(class_path="teacher_beside_config:make"), tmp_path)
    assert isinstance(model, nn.Sequential)


def test_module_file_teacher(tmp_path: Path) -> None:
    model, _ = _saved_model("resnet18", tmp_path)
    torch.save(model, tmp_path / "whole.pt")
    loaded = build_teacher(TeacherConfig(module="whole.pt"), tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    with pytest.raises(TeacherWeightsNotFoundError, match="torch.save"):
        build_teacher(TeacherConfig(module="absent.pt"), tmp_path)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    with pytest.raises(TeacherError, match="not an nn.Module"):
        build_teacher(TeacherConfig(module="state.pt"), tmp_path)


def test_unknown_arch_lists_valid() -> None:
    with pytest.raises(TeacherError) as info:
        build_teacher_model("resnet19", 10)
    msg = str(info.value)
    assert "resnet19" in msg and "resnet18" in msg and "class_path" in msg
    assert all(arch in msg for arch in BUILTIN_ARCHS)


def test_bad_kwargs() -> None:
    with pytest.raises(TeacherError, match="depth"):
        build_teacher_model("digits_cnn", 10, {"depth": 3})
    with pytest.raises(TeacherError, match="width"):
        build_teacher_model("digits_cnn", 10, {"width": 0})
    with pytest.raises(TeacherError, match="bogus"):
        build_teacher_model("resnet18", 10, {"bogus": 1})
    with pytest.raises(TeacherError, match="num_classes"):
        build_teacher_model("resnet18", 0)


def test_missing_checkpoint(tmp_path: Path) -> None:
    model = build_teacher_model("digits_cnn", 10)
    path = tmp_path / "nope" / "teacher.pt"
    with pytest.raises(FileNotFoundError) as info:
        load_teacher_weights(model, path, None, "digits_cnn")
    assert isinstance(info.value, TeacherWeightsNotFoundError)
    assert str(path) in str(info.value)
    assert "torch.save" in str(info.value) and "train_if_missing" in str(info.value)


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    model, path = _saved_model("digits_cnn", tmp_path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    for bad in (truncated, garbage):
        with pytest.raises(TeacherError) as info:
            load_teacher_weights(model, bad, None, "digits_cnn")
        assert str(bad) in str(info.value) and "corrupt" in str(info.value)
    not_a_dict = tmp_path / "list.pt"
    torch.save([1, 2], not_a_dict)
    with pytest.raises(TeacherError, match="not a state_dict"):
        load_teacher_weights(model, not_a_dict, None, "digits_cnn")


def test_wrapped_and_prefixed_checkpoints(tmp_path: Path) -> None:
    source, _ = _saved_model("digits_cnn", tmp_path)
    state = source.state_dict()
    for i, obj in enumerate([{"state_dict": state}, {"model": state, "epoch": 3},
                             {f"module.{k}": v for k, v in state.items()}]):
        path = tmp_path / f"wrapped{i}.pt"
        torch.save(obj, path)
        model = build_teacher_model("digits_cnn", 10, SMALL_KWARGS["digits_cnn"])
        load_teacher_weights(model, path, None, "digits_cnn")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_wrong_keys_checkpoint(tmp_path: Path) -> None:
    _, path = _saved_model("digits_cnn", tmp_path)
    model = build_teacher_model("resnet18", 10)
    with pytest.raises(TeacherError) as info:
        load_teacher_weights(model, path, None, "resnet18")
    msg = str(info.value)
    assert str(path) in msg and "missing keys" in msg and "unexpected keys" in msg
    assert "conv1.weight" in msg and "stem.0.weight" in msg
    wider = build_teacher_model("digits_cnn", 10, {"width": 16})
    with pytest.raises(TeacherError, match="shape mismatches"):
        load_teacher_weights(wider, path, None, "digits_cnn")


def test_unknown_weights_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model = build_teacher_model("resnet18", 1000)
    with pytest.raises(TeacherError) as info:
        load_teacher_weights(model, None, "IMAGENET9K", "resnet18")
    assert "IMAGENET9K" in str(info.value) and "IMAGENET1K_V1" in str(info.value)
    with pytest.raises(TeacherError, match="no torchvision weights"):
        load_teacher_weights(build_teacher_model("digits_cnn", 10), None, "IMAGENET1K_V1", "digits_cnn")


def test_absent_hub_file_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def _no_download(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    model = build_teacher_model("resnet18", 1000)
    expected = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(TeacherWeightsNotFoundError) as info:
        load_teacher_weights(model, None, "IMAGENET1K_V1", "resnet18")
    assert str(expected) in str(info.value)


def test_hub_file_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.manual_seed(3)
    source = build_teacher_model("resnet18", 1000)
    (tmp_path / "checkpoints").mkdir()
    torch.save(source.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_teacher_model("resnet18", 1000)
    load_teacher_weights(model, None, "DEFAULT", "resnet18")
    assert torch.equal(model.fc.weight, source.fc.weight)
    small = build_teacher_model("resnet18", 10)
    with pytest.raises(TeacherError, match="fc.weight"):
        load_teacher_weights(small, None, "IMAGENET1K_V1", "resnet18")


def test_no_weights_keeps_random_init() -> None:
    torch.manual_seed(0)
    model = build_teacher_model("digits_cnn", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_teacher_weights(model, None, None, "digits_cnn")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
