"""Tests of nni_pipebd.spec.split: exact splits of traced models at named modules, defaults, split points, errors."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from nni_pipebd.spec.split import SplitError, split_model, trace_model

# Six families, split at module names; the ones marked * have functional ops between the named modules
# (resnet: torch.flatten; mobilenet_v2: F.adaptive_avg_pool2d + torch.flatten; shufflenet: x.mean([2, 3]);
# regnet / efficientnet: flatten).
NAMED_SPLITS = {
    "resnet18": ({}, ["layer2", "layer3", "layer4", "fc"]),  # *
    "mobilenet_v2": ({"width_mult": 0.35}, ["features.3", "features.11", "classifier"]),  # *
    "shufflenet_v2_x0_5": ({}, ["stage2", "stage4", "conv5", "fc"]),  # *
    "regnet_x_400mf": ({}, ["trunk_output.block2", "trunk_output.block4", "fc"]),
    "efficientnet_b0": ({}, ["features.3", "features.5", "avgpool"]),
    "densenet121": ({}, ["features.transition1", "features.denseblock3", "classifier"]),
    "squeezenet1_1": ({}, ["features.5", "features.9", "classifier"]),
    "convnext_tiny": ({}, ["features.2", "features.4", "classifier"]),
}


def _compose(blocks, x):
    for block in blocks:
        x = block(x)
    return x


@pytest.mark.parametrize("arch", list(NAMED_SPLITS))
def test_named_split_composes_exactly(arch: str) -> None:
    kwargs, names = NAMED_SPLITS[arch]
    torch.manual_seed(0)
    model = tvm.get_model(arch, weights=None, num_classes=10, **kwargs).eval()
    blocks, used = split_model(model, torch.randn(2, 3, 64, 64), names)
    assert used == names and len(blocks) == len(names) + 1
    for batch in (1, 3):  # other batch sizes than the probe's
        x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert torch.equal(_compose(blocks, x), model(x))
    # blocks share the model's modules (no copies): the teacher's weights are the blocks' weights
    ids = {id(p) for block in blocks for p in block.parameters()}
    assert ids == {id(p) for p in model.parameters()}


class Branchy(nn.Module):
    """A user model: functional ops between modules, a residual, a parameter used functionally."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.scale = nn.Parameter(torch.full((16, 1, 1), 0.5))
        self.unused = nn.Linear(2, 2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.b(torch.relu(self.a(x)))
        x = self.down(x) * self.scale
        x = torch.flatten(x.mean((2, 3)), 1)
        return self.fc(x)


def test_user_model_defaults_points_and_functional_ops() -> None:
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(2, 3, 16, 16)
    blocks, names = split_model(model, x)
    assert names == ["down", "mean"]
    with torch.no_grad():
        assert torch.equal(_compose(blocks, x), model(x))
    traced = trace_model(model, x)
    points = traced.split_points()
    assert [p.name for p in points] == ["relu", "a", "down", "mul", "mean", "flatten", "fc"]
    assert points[0].shape == (8, 8, 8) and points[-1].shape == (16,)
    macs = [p.macs_before for p in points]
    assert macs == sorted(macs) and 0 < macs[-1] < traced.total_macs


@pytest.mark.parametrize("boundaries, message", [
    (["b"], r"2 values cross it \(relu, relu_1\).*inside a branch.*near it: \["),
    (["dwon"], r"no module 'dwon'; close names: \['down'"),
    (["unused"], "module 'unused' is never called"),
    (["stem"], "where the model starts"),
    (["fc", "down"], r"boundaries \['fc', 'down'\] are not in execution order"),
    ([7], "not a child index"),
    ([1.5], "must be a module name"),
])
def test_split_errors_name_module_reason_and_valid_points(boundaries, message) -> None:
    with pytest.raises(SplitError, match=message):
        split_model(Branchy().eval(), torch.randn(2, 3, 16, 16), boundaries)


def test_untraceable_and_multi_input_models() -> None:
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(SplitError, match="cannot trace DataDependent.forward with torch.fx"):
        split_model(DataDependent(), torch.randn(1, 3, 4, 4))

    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(SplitError, match="takes 2 inputs"):
        split_model(TwoInputs(), torch.randn(1, 3, 4, 4))


def test_training_flags_restored() -> None:
    model = Branchy().train()
    split_model(model, torch.randn(2, 3, 16, 16))
    assert all(m.training for m in model.modules())


def test_vision_transformer_splits_between_encoder_layers_in_balanced_blocks() -> None:
    """Resolution never drops: the repeated encoder layers are grouped into blocks of balanced MACs, the patch
    embedding (conv_proj, class token, position embedding) with the first, the pooled head last."""
    from torchvision.models.vision_transformer import VisionTransformer

    from nni_pipebd.plan.partition import balanced_boundaries

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=8, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    traced = trace_model(model, x)
    layers = [f"encoder.layers.encoder_layer_{i}" for i in range(8)]
    assert traced.repeated_units(traced.head_start()) == layers
    blocks, names = split_model(model, x)
    assert names == ["encoder.layers.encoder_layer_2", "encoder.layers.encoder_layer_4",
                     "encoder.layers.encoder_layer_6", "getitem_21"]  # x[:, 0]: the class token, then heads
    targets = [{str(n.target) for n in b.graph.nodes if n.op == "call_module"} for b in blocks]
    assert "conv_proj" in targets[0] and targets[-1] == {"heads.head"}
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert torch.equal(_compose(blocks, x), model(x))
    # balanced: the grouping is the min-max partition of the layers' MACs (embedding costed with the first layer)
    starts = [traced.first[name] for name in layers]
    costs = [sum(traced.node_macs[a:b]) for a, b in zip(starts, starts[1:] + [traced.head_start()])]
    costs[0] += sum(traced.node_macs[:starts[0]])
    assert [layers[i] for i in balanced_boundaries(costs, 4)[1:]] == names[:3]
    assert costs[1] > 0 and len(set(costs[1:])) == 1  # attention (a leaf nn.MultiheadAttention) counted
