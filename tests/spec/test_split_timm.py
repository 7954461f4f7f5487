"""Tests of nni_pipebd.spec.split on timm teachers (random weights): every family splits by default, exactly."""

from __future__ import annotations

import pytest
import torch

from nni_pipebd.spec import tracer
from nni_pipebd.spec.split import SplitError, split_model

timm = pytest.importorskip("timm")

SIZE = 64
# family -> (create_model kwargs, default blocks). TF ports use "same" padding (timm's Conv2dSame / pad_same, traced
# through timm's FX registries); the transformers' forward has defaulted arguments (bound as concrete_args).
FAMILIES = {
    "tf_efficientnet_b0": ({}, 6),  # TF-ported EfficientNet
    "tf_mixnet_s": ({}, 6),  # TF-ported MixNet
    "tf_mobilenetv3_small_100": ({}, 6),  # TF-ported MobileNetV3
    "efficientnet_b0": ({}, 6),
    "mobilenetv3_small_100": ({}, 6),
    "resnet18": ({}, 6),
    "seresnet18": ({}, 6),  # squeeze-excitation
    "regnetx_002": ({}, 6),
    "convnext_atto": ({}, 5),
    "ghostnet_100": ({}, 6),
    "efficientvit_b0": ({}, 6),
    "mobilevit_xxs": ({}, 6),
    "vit_tiny_patch16_224": ({"img_size": SIZE}, 5),  # 12 encoder layers in 4 blocks of 3, then the head
    "deit_tiny_patch16_224": ({"img_size": SIZE}, 5),
    "swin_tiny_patch4_window7_224": ({"img_size": SIZE, "window_size": 4}, 5),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two threads wait on each other (60 ms per tiny conv)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _compose(blocks, x):
    for block in blocks:
        x = block(x)
    return x


@pytest.mark.parametrize("name", list(FAMILIES))
def test_timm_family_splits_exactly_by_default(name: str) -> None:
    kwargs, expected = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    blocks, names = split_model(model, torch.randn(2, 3, SIZE, SIZE))
    assert len(blocks) == expected, names
    for batch in (1, 3):  # other batch sizes than the probe's
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert torch.equal(_compose(blocks, x), model(x))
    assert {id(p) for b in blocks for p in b.parameters()} == {id(p) for p in model.parameters()}


def test_without_timms_registries_the_error_names_conv2dsame_and_the_keys_that_fix_it(monkeypatch) -> None:
    """What timm's registries save a user from, and that the error's fix works when followed."""
    monkeypatch.setattr(tracer, "library_notrace", lambda: ([], []))
    model = timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=10).eval()
    sample = torch.randn(2, 3, SIZE, SIZE)
    with pytest.raises(SplitError) as info:
        split_model(model, sample)
    message = str(info.value)
    assert "inside module 'conv_stem' (Conv2dSame)" in message and "padding.py" in message
    assert "model.teacher.leaf_modules: ['timm.layers.conv2d_same.Conv2dSame']" in message
    blocks, _ = split_model(model, sample, leaf_modules=["timm.layers.conv2d_same.Conv2dSame"])
    with torch.no_grad():
        assert torch.equal(_compose(blocks, sample), model(sample))


def test_the_config_keys_reach_the_split(monkeypatch, tmp_path, capsys, caplog) -> None:
    """model.teacher.leaf_modules / autowrap_functions in a config: `nni-pipebd blocks` and the job's teacher."""
    import yaml

    from conftest import tiny_config
    from nni_pipebd.cli import main
    from nni_pipebd.job import probe_teacher
    from nni_pipebd.spec.teachers import build_teacher_blocks

    monkeypatch.setattr(tracer, "library_notrace", lambda: ([], []))  # as if timm declared nothing
    teacher = {"arch": None, "kwargs": {}, "class_path": "timm.create_model",
               "init_args": {"model_name": "tf_mobilenetv3_small_minimal_100", "num_classes": 10},
               "leaf_modules": ["Conv2dSame"], "autowrap_functions": ["timm.layers.padding:pad_same"]}
    config = tiny_config(tmp_path, model={"teacher": teacher}, data={"image_size": 32})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["blocks", str(path)]) == 0
    assert "6 blocks, MACs per block:" in capsys.readouterr().out
    _, sample, model = probe_teacher(config, weights=False)
    blocks, _ = build_teacher_blocks(model, sample, leaf_modules=teacher["leaf_modules"],
                                     autowrap_functions=teacher["autowrap_functions"])
    with torch.no_grad():
        assert torch.equal(_compose(blocks, sample), model.eval()(sample))
    raw = config.to_dict()
    raw["model"]["teacher"].update(leaf_modules=[], autowrap_functions=[])
    path.write_text(yaml.safe_dump(raw))
    assert main(["blocks", str(path)]) == 2  # without them: an error naming the keys that fix it
    assert "model.teacher.leaf_modules: ['timm.layers.conv2d_same.Conv2dSame']" in caplog.text
