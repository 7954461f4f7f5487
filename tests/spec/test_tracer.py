"""Tests of nni_pipebd.spec.tracer: defaulted arguments bound, user leaf modules and functions, errors that name the
frame and the config key, and timm's registries taken only when timm is loaded."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

from nni_pipebd.spec.split import SplitError, split_model, trace_model
from nni_pipebd.spec.tracer import concrete_defaults, library_notrace, trace_graph


def padding_for(size: int, stride: int) -> int:
    """Shape arithmetic torch.fx cannot trace (``max`` on a traced size), as "same" padding does."""
    return max(math.ceil(size / stride) * stride - size, 0)


def pad_to_stride(x: torch.Tensor, stride: int) -> torch.Tensor:
    pad = padding_for(x.shape[-1], stride)
    return nn.functional.pad(x, (0, pad, 0, pad))


class Gate(nn.Module):
    """A module with control flow on a tensor value: untraceable unless it is a leaf."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return self.conv(x) if x.mean() > -1e9 else x


class UserModel(nn.Module):
    """A user's model: a gate that must be a leaf, "same" padding through a function, a defaulted argument."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.gate = Gate(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x, scale: float = 2.0, mask=None):
        x = torch.relu(self.stem(pad_to_stride(x, 2)))
        x = self.gate(x) * scale
        x = self.down(x)
        return self.fc(x.mean((2, 3)))


def _compose(blocks, x):
    for block in blocks:
        x = block(x)
    return x


def test_defaulted_arguments_are_bound_and_only_the_tensor_is_an_input() -> None:
    model = UserModel().eval()
    assert concrete_defaults(model) == {"scale": 2.0, "mask": None}
    graph = trace_graph(model, [Gate], [pad_to_stride]).graph
    assert [n.name for n in graph.nodes if n.op == "placeholder"] == ["x"]
    assert not any("assert" in str(n.target) for n in graph.nodes)  # fx's checks of the bound values are gone


@pytest.mark.parametrize("leaf, function", [
    ("Gate", "pad_to_stride"),  # names of the model's class / of a function in its module
    (f"{__name__}.Gate", f"{__name__}:pad_to_stride"),  # import paths
    (Gate, pad_to_stride),  # the objects
])
def test_user_leaf_modules_and_autowrap_functions_make_the_model_split_exactly(leaf, function) -> None:
    torch.manual_seed(0)
    model = UserModel().eval()
    blocks, names = split_model(model, torch.randn(2, 3, 15, 15), ["gate", "down", "mean"], leaf_modules=[leaf],
                                autowrap_functions=[function])
    assert names == ["gate", "down", "mean"]
    for batch in (1, 3):
        x = torch.randn(batch, 3, 15, 15, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert torch.equal(_compose(blocks, x), model(x))
    kinds = {n.op: n.target for b in blocks for n in b.graph.nodes if n.target in ("gate", pad_to_stride)}
    assert kinds == {"call_module": "gate", "call_function": pad_to_stride}  # one node each


def test_untraceable_function_error_names_the_frame_and_the_config_key() -> None:
    with pytest.raises(SplitError) as info:
        split_model(UserModel().eval(), torch.randn(2, 3, 15, 15), leaf_modules=["Gate"])
    message = str(info.value)
    assert "cannot trace UserModel.forward with torch.fx" in message
    assert "test_tracer.py" in message and "in padding_for(): `return max(math.ceil(size / stride)" in message
    assert f"model.teacher.autowrap_functions: ['{__name__}:pad_to_stride']" in message  # what forward called


def test_untraceable_module_error_names_the_module_and_the_leaf_key() -> None:
    with pytest.raises(SplitError) as info:
        split_model(UserModel().eval(), torch.randn(2, 3, 15, 15), autowrap_functions=["pad_to_stride"])
    message = str(info.value)
    assert "inside module 'gate' (Gate)" in message and "in forward(): `return self.conv(x) if x.mean()" in message
    assert f"model.teacher.leaf_modules: ['{__name__}.Gate']" in message


@pytest.mark.parametrize("kwargs, message", [
    ({"leaf_modules": ["Gat"]}, r"no module of class 'Gat'; close names: \['Gate'"),
    ({"leaf_modules": ["torch.nn.functional:relu"]}, "is a function, not a torch.nn.Module class"),
    ({"leaf_modules": ["nowhere.Gate"]}, "model.teacher.leaf_modules = 'nowhere.Gate': no module named 'nowhere'"),
    ({"autowrap_functions": ["pad_to_strid"]}, r"no function 'pad_to_strid'.*close names: \['pad_to_stride'"),
])
def test_unknown_leaf_modules_and_functions_are_named(kwargs, message) -> None:
    with pytest.raises(SplitError, match=message):
        split_model(UserModel().eval(), torch.randn(2, 3, 15, 15), **kwargs)


def test_timm_registries_are_used_only_when_timm_is_loaded(monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    assert library_notrace() == ([], [])
    assert "timm" not in sys.modules  # asking did not import it


def test_a_leaf_modules_layers_count_in_the_macs() -> None:
    """Tracing does not enter a leaf, so its convolutions are counted by running it on its traced input's shape."""
    traced = trace_model(UserModel().eval(), torch.randn(2, 3, 15, 15), ["Gate"], ["pad_to_stride"])
    gate = next(p for p, node in enumerate(traced.ops) if node.target == "gate")
    assert traced.node_macs[gate] == 8 * 8 * 7 * 7  # a 1x1 conv, 8 -> 8 channels, on the stem's 7x7 map
