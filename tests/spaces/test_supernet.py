import copy

import nni
import pytest
import torch
from nni.nas.nn.pytorch import InputChoice, LayerChoice, ModelSpace, MutableBatchNorm2d, MutableConv2d, Repeat
from torch import nn

from conftest import train_one_step
from nni_pipebd.spaces.supernet import BlockSupernet, space_choices


class Space(ModelSpace):
    """LayerChoice, a Repeat over (0, 2) and a width nni.choice in MutableConv2d / MutableBatchNorm2d."""

    def __init__(self):
        super().__init__()
        width = nni.choice("w", [2, 4])
        self.entry = nn.Sequential(MutableConv2d(3, width, 3, padding=1), MutableBatchNorm2d(width), nn.ReLU())
        self.op = LayerChoice({"conv": MutableConv2d(width, width, 3, padding=1), "skip": nn.Identity()}, label="op")
        self.extra = Repeat(lambda _: nn.Sequential(MutableConv2d(width, width, 3, padding=1), nn.ReLU()), (0, 2),
                            label="depth")
        self.out = MutableConv2d(width, 5, 1)

    def forward(self, x):
        return self.out(self.extra(self.op(self.entry(x))))


def supernet():
    torch.manual_seed(0)
    return BlockSupernet(Space(), 3)


def test_choices_keep_the_space_labels_and_value_types():
    block = supernet()
    assert block.choices == {"w": [2, 4], "op": ["conv", "skip"], "depth": [0, 1, 2]}
    assert type(block.op).__name__ == "PathSamplingLayer" and type(block.entry[0]).__name__ == "MixedConv2d"
    assert type(block.extra).__name__ == "ZeroDepthPathSamplingRepeat"
    assert set(block.state_dict()) == set(block.space.state_dict())  # no extra level in parameter names
    assert "entry.0.weight" in block.state_dict()
    assert block.entry[0].weight.shape == (4, 3, 3, 3)  # one weight, the largest width, shared by every path


@pytest.mark.parametrize("sample", [
    {"w": 4, "op": "conv", "depth": 2},
    {"w": 2, "op": "skip", "depth": 0},
    {"w": 2, "op": "conv", "depth": 1},
])
def test_frozen_path_runs_like_the_supernet_with_its_weights(sample):
    block = supernet()
    x = torch.randn(2, 3, 6, 6)
    train_one_step(block, x, sample)
    expected = block(x)
    frozen = block.freeze({**sample, "other_block": "ignored"}).eval()
    assert not any(type(m).__name__.startswith(("Mixed", "PathSampling")) for m in frozen.modules())
    assert frozen.entry[0].weight.shape[0] == sample["w"] and len(frozen.extra) == sample["depth"]
    assert torch.equal(frozen(x), expected)
    with torch.no_grad():  # an independent copy
        frozen.entry[0].weight.add_(1.0)
    assert torch.equal(block(x), expected)


def test_sample_is_applied_to_every_supermodule_and_copies_stay_independent():
    block = supernet()
    block.set_path({"w": 2, "op": "skip", "depth": 1})
    assert block.path == {"w": 2, "op": "skip", "depth": 1}
    assert block.op._sampled == "skip" and block.extra._sampled == 1
    clone = copy.deepcopy(block)
    clone.set_path({"w": 4, "op": "conv", "depth": 2})
    assert block.op._sampled == "skip" and clone.op._sampled == "conv"
    assert clone(torch.randn(1, 3, 4, 4)).shape == (1, 5, 4, 4)
    clone.eval()
    assert not clone.space.training and block.space.training


def test_errors_name_block_label_and_values():
    block = supernet()
    with pytest.raises(RuntimeError, match=r"block 3: no path selected .* call set_path"):
        block(torch.randn(1, 3, 4, 4))
    with pytest.raises(KeyError, match="block 3: the path has no choice for 'depth'"):
        block.set_path({"w": 2, "op": "conv"})
    with pytest.raises(ValueError, match=r"block 3: w = 3 is not a candidate; valid: \[2, 4\]"):
        block.set_path({"w": 3, "op": "conv", "depth": 0})
    with pytest.raises(TypeError, match="block 1: a block space must be an NNI ModelSpace"):
        BlockSupernet(nn.Conv2d(1, 1, 1), 1)


def test_a_label_without_a_finite_list_of_values_is_refused():
    class Uniform(ModelSpace):
        def __init__(self):
            super().__init__()
            self.add_mutable(nni.uniform("lr", 0, 1))

    with pytest.raises(TypeError, match=r"block 0: label 'lr' is a Numerical, not a categorical choice"):
        space_choices(Uniform(), "block 0")


class CellSpace(ModelSpace):
    """InputChoice with n_chosen 1 and 2, and a width used as the expressions ``w * 2`` and ``w // 2`` by two layers."""

    def __init__(self, n_chosen=2, reduction="sum"):
        super().__init__()
        w = nni.choice("w", [4, 8])
        self.a = MutableConv2d(3, w * 2, 3, padding=1)
        self.b = nn.Sequential(MutableConv2d(w * 2, w // 2, 1), MutableBatchNorm2d(w // 2), MutableConv2d(w // 2, 5, 1))
        self.c = MutableConv2d(3, 5, 1)
        self.d = MutableConv2d(3, 5, 5, padding=2)
        self.one = InputChoice(2, n_chosen=1, reduction="sum", label="one")
        self.pick = InputChoice(3, n_chosen=n_chosen, reduction=reduction, label="pick")

    def forward(self, x):
        b = self.b(self.a(x))
        return self.pick([b, self.c(x), self.d(x)]) + self.one([b, self.c(x)])


def test_input_choices_and_width_expressions():
    torch.manual_seed(0)
    block = BlockSupernet(CellSpace(), 0)
    assert block.choices == {"w": [4, 8], "one": [[0], [1]], "pick": [[0, 1], [0, 2], [1, 2]]}  # NNI's sample format
    assert type(block.pick).__name__ == "PathSamplingInput" and block.a.weight.shape[0] == 16  # max of w * 2
    x = torch.randn(2, 3, 6, 6)
    for sample in ({"w": 8, "one": [1], "pick": [0, 2]}, {"w": 4, "one": [0], "pick": (1, 2)}):
        train_one_step(block, x, sample)
        expected = block(x)
        frozen = block.freeze(sample).eval()
        assert frozen.a.weight.shape[0] == 2 * sample["w"] and frozen.b[0].weight.shape[0] == sample["w"] // 2
        assert torch.equal(frozen(x), expected)
    assert block.path == {"w": 4, "one": [0], "pick": [1, 2]}  # a tuple of inputs is taken as NNI's list
    ascending = r"valid \(an InputChoice's chosen inputs in ascending order\): \[\[0, 1\], \[0, 2\]"
    with pytest.raises(ValueError, match=r"block 0: pick = \[2, 0\] is not a candidate; " + ascending):
        block.set_path({"w": 4, "one": [0], "pick": [2, 0]})


@pytest.mark.parametrize("kwargs, message", [
    ({"n_chosen": None}, r"block 2: label 'pick' is a CategoricalMultiple of \[0, 1, 2\] with n_chosen=None .* give "
                         "the InputChoice a fixed n_chosen"),
    ({"reduction": "none"}, r"block 2: InputChoice 'pick' reduces by 'none'.*supports \['sum', 'mean', 'concat'\]"),
])
def test_input_choices_one_shot_cannot_sample_are_refused_up_front(kwargs, message):
    with pytest.raises(TypeError, match=message):
        BlockSupernet(CellSpace(**kwargs), 2)


def test_nnis_cell_is_path_sampled_through_its_input_choices():
    """NNI's ``Cell`` (DARTS-style nodes): RandomOneShot turns its op and input choices into supermodules; the input
    choices' values are lists of predecessors, as every InputChoice's."""
    from nni.nas.nn.pytorch import Cell

    class CellBlock(ModelSpace):
        def __init__(self):
            super().__init__()
            self.cell = Cell({"conv": nn.Conv2d(4, 4, 3, padding=1), "pool": nn.AvgPool2d(3, 1, 1)}, num_nodes=2,
                             num_ops_per_node=1, num_predecessors=1, merge_op="all", label="cell")

        def forward(self, x):
            return self.cell(x)

    torch.manual_seed(0)
    block = BlockSupernet(CellBlock(), 0)
    assert block.choices == {"cell/op_1_0": ["conv", "pool"], "cell/op_2_0": ["conv", "pool"],
                             "cell/input_1_0": [[0]], "cell/input_2_0": [[0], [1]]}
    x = torch.randn(2, 4, 6, 6)
    for first, second, source in (("conv", "pool", [1]), ("pool", "conv", [0])):  # a conv on every path: a gradient
        sample = {"cell/op_1_0": first, "cell/op_2_0": second, "cell/input_1_0": [0], "cell/input_2_0": source}
        train_one_step(block, x, sample)
        expected = block(x)
        assert expected.shape == (2, 8, 6, 6)  # merge_op all: both nodes concatenated
        assert torch.equal(block.freeze(sample).eval()(x), expected)
