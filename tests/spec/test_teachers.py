"""Tests of nni_pipebd.spec.teachers: building, flattening, splitting and loading teachers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nni_pipebd.spec.teachers import (
    TEACHER_ARCHS,
    TeacherError,
    TeacherWeightsNotFoundError,
    build_teacher_blocks,
    build_teacher_model,
    default_boundaries,
    load_teacher_weights,
    split_layers,
    split_sequential,
    teacher_layers,
)

SMALL_KWARGS = {
    "mobilenet_v2": {"width_mult": 0.35},
    "efficientnet_b0": {},
    "resnet18": {},
    "digits_cnn": {"width": 8},
}
EXPECTED_BOUNDARIES = {
    "mobilenet_v2": [2, 4, 7, 14, 18],
    "efficientnet_b0": [2, 3, 4, 6, 8],
    "resnet18": [2, 3, 4, 5],
    "digits_cnn": [1, 3, 5, 7],
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


@pytest.mark.parametrize("arch", TEACHER_ARCHS)
def test_blocks_reproduce_model_exactly(arch: str, tmp_path: Path) -> None:
    model, path = _saved_model(arch, tmp_path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    blocks = build_teacher_blocks(arch, 10, SMALL_KWARGS[arch], checkpoint=path, sample=x)
    assert len(blocks) == len(EXPECTED_BOUNDARIES[arch]) + 1
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


@pytest.mark.parametrize("arch", TEACHER_ARCHS)
def test_default_boundaries_at_32(arch: str) -> None:
    torch.manual_seed(0)
    model = build_teacher_model(arch, 10, SMALL_KWARGS[arch]).train()
    layers, head = teacher_layers(arch, model)
    assert head == len(layers) - 1
    bounds = default_boundaries(layers, head, torch.randn(2, 3, 32, 32))
    assert bounds == EXPECTED_BOUNDARIES[arch]
    assert all(m.training for m in model.modules()), "training flags must be restored"


def test_layers_reuse_model_submodules() -> None:
    model = build_teacher_model("resnet18", 10)
    layers, head = teacher_layers("resnet18", model)
    assert layers[1] is model.layer1
    assert layers[head][-1] is model.fc
    mobilenet = build_teacher_model("mobilenet_v2", 10, {"width_mult": 0.35})
    layers, head = teacher_layers("mobilenet_v2", mobilenet)
    assert len(layers) == 19 and layers[0] is mobilenet.features[0]
    assert layers[head][0] is mobilenet.features[18]


def test_default_sample_and_explicit_boundaries() -> None:
    blocks = build_teacher_blocks("digits_cnn", 5, {"in_channels": 1, "width": 4})
    assert len(blocks) == 5
    blocks = build_teacher_blocks("digits_cnn", 5, {"in_channels": 1, "width": 4}, boundaries=[3, 7])
    assert [len(b) for b in blocks] == [3, 4, 1]
    assert blocks[-1](blocks[1](blocks[0](torch.zeros(1, 1, 28, 28)))).shape == (1, 5)


def test_split_sequential_custom() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    blocks = split_sequential(model, [2, 4])
    assert [len(b) for b in blocks] == [2, 2, 1]
    assert blocks[0][0] is model[0] and blocks[2][0] is model[4]
    x = torch.randn(1, 3, 8, 8)
    out = x
    for block in blocks:
        out = block(out)
    assert torch.equal(out, model(x))
    assert len(split_sequential(model, [])) == 1
    with pytest.raises(TeacherError, match="nn.Sequential"):
        split_sequential(nn.Linear(2, 2), [1])


@pytest.mark.parametrize("bounds", [[0, 2], [2, 2], [3, 1], [1, 5], [1.5]])
def test_bad_boundaries_message(bounds: list) -> None:
    layers = [nn.Identity() for _ in range(5)]
    with pytest.raises(TeacherError) as info:
        split_layers(layers, bounds)
    msg = str(info.value)
    assert str(bounds) in msg
    assert "5 teacher layers" in msg and "1..4" in msg and "strictly increasing" in msg


def test_bad_head_index() -> None:
    with pytest.raises(TeacherError, match="head_index=0"):
        default_boundaries([nn.Identity(), nn.Identity()], 0, torch.zeros(1, 1, 4, 4))


def test_unknown_arch_lists_valid() -> None:
    with pytest.raises(TeacherError) as info:
        build_teacher_model("vgg11", 10)
    assert "vgg11" in str(info.value)
    assert all(arch in str(info.value) for arch in TEACHER_ARCHS)
    with pytest.raises(ValueError, match="resnet18"):
        teacher_layers("vgg", nn.Sequential())


def test_bad_kwargs() -> None:
    with pytest.raises(TeacherError, match="depth"):
        build_teacher_model("digits_cnn", 10, {"depth": 3})
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
