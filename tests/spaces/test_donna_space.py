"""The built-in DONNA block space (model.student.kind: donna): labels, shapes of every path, costs of depth and width,
frozen weights, per-block sampling, config options and executor equivalence on it."""

import itertools
import json

import pytest
import torch

from conftest import assert_same_blocks, tiny_config, train_one_step
from nni_pipebd.config import Config, ConfigError, StudentConfig
from nni_pipebd.distill.sampler import PathSampler
from nni_pipebd.executors.launch import train
from nni_pipebd.spaces.builder import build_student, make_block, student_factory
from nni_pipebd.spaces.donna import DonnaBlock, width_choices
from nni_pipebd.spaces.supernet import BlockSupernet
from nni_pipebd.spec.blocks import block_seed, teacher_shapes
from nni_pipebd.spec.teachers import build_teacher_blocks, build_teacher_model

SAMPLE = torch.randn(2, 3, 32, 32)
LABELS = ("depth", "expansion", "kernel", "attention", "width")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    blocks = build_teacher_blocks(build_teacher_model("mobilenet_v2", 10, {"width_mult": 0.35}), SAMPLE)[0]
    return blocks, teacher_shapes(blocks, SAMPLE)


@pytest.fixture(scope="module")
def student(teacher):
    blocks, shapes = teacher
    return build_student(StudentConfig(kind="donna"), blocks, shapes, seed=0)


def paths(block):
    labels = list(block.choices)
    return [dict(zip(labels, values)) for values in itertools.product(*block.choices.values())]


def test_labels_and_candidates_follow_the_teacher(student, teacher):
    blocks = list(student.blocks)
    assert [type(b.space) for b in blocks[:5]] == [DonnaBlock] * 5
    assert not isinstance(blocks[5], BlockSupernet)  # the head: a fresh copy of the teacher's
    for i, block in enumerate(blocks[:5]):
        assert sorted(block.choices) == sorted(f"s{i}_{name}" for name in LABELS)
        assert block.choices[f"s{i}_kernel"] == [3, 5, 7]
        assert block.choices[f"s{i}_expansion"] == [2, 3, 4, 6]
        assert block.choices[f"s{i}_attention"] == ["none", "se"]
        out = teacher[1][i][1][0]
        assert block.choices[f"s{i}_width"] == width_choices(out, (0.5, 0.75, 1.0))
    # depth 1..the teacher block's spatial convolutions (MobileNetV2: one depthwise conv per inverted residual)
    assert [b.choices[f"s{i}_depth"] for i, b in enumerate(blocks[:5])] == [list(range(1, n + 1))
                                                                            for n in (2, 2, 3, 7, 4)]


@pytest.mark.slow  # runs long (over a second here)
def test_every_path_of_every_block_maps_the_teacher_shapes(student, teacher):
    count = 0
    for block, (shape_in, shape_out) in zip(student.blocks, teacher[1]):
        block.eval()
        x = torch.zeros((1,) + shape_in)
        if not isinstance(block, BlockSupernet):
            assert block(x).shape[1:] == shape_out
            continue
        with torch.no_grad():
            for path in paths(block):
                block.set_path(path)
                assert block(x).shape[1:] == shape_out, f"block {block.index} path {path}"
                count += 1
    assert count == 144 + 144 + 216 + 504 + 288


def _layer_params(c_in, c_out, kernel, expansion, se, squeeze):
    hidden = c_in * expansion
    params = c_in * hidden + 2 * hidden + hidden * kernel * kernel + 2 * hidden + hidden * c_out + 2 * c_out
    return params + (2 * hidden * squeeze + squeeze + hidden if se else 0)


def _block_params(c_in, c_out, path, i):
    width, depth, squeeze = path[f"s{i}_width"], path[f"s{i}_depth"], max(1, c_out // 4)
    args = path[f"s{i}_kernel"], path[f"s{i}_expansion"], path[f"s{i}_attention"] == "se", squeeze
    layers = _layer_params(c_in, width, *args) + (depth - 1) * _layer_params(width, width, *args)
    return layers + width * c_out + 2 * c_out


@pytest.mark.parametrize("i", [2, 3])
@pytest.mark.slow  # runs long (over a second here)
def test_depth_and_width_change_the_frozen_parameter_count(student, teacher, i):
    block = student.blocks[i]
    (c_in, _, _), (c_out, _, _) = teacher[1][i]
    count = lambda path: sum(p.numel() for p in block.freeze(path).parameters())  # noqa: E731
    for path in paths(block)[::7]:
        assert count(path) == _block_params(c_in, c_out, path, i), path
    base = {f"s{i}_kernel": 5, f"s{i}_expansion": 3, f"s{i}_attention": "se", f"s{i}_depth": 1,
            f"s{i}_width": block.choices[f"s{i}_width"][0]}
    deeper = [count({**base, f"s{i}_depth": d}) for d in block.choices[f"s{i}_depth"]]
    step = _layer_params(base[f"s{i}_width"], base[f"s{i}_width"], 5, 3, True, max(1, c_out // 4))
    assert [b - a for a, b in zip(deeper, deeper[1:])] == [step] * (len(deeper) - 1)  # one layer per depth
    wider = [count({**base, f"s{i}_width": w}) for w in block.choices[f"s{i}_width"]]
    assert wider == sorted(set(wider))  # strictly more parameters with more inner channels
    assert len(block.freeze({**base, f"s{i}_depth": 3}).layers) == 3


def test_frozen_path_keeps_the_supernet_weights(teacher):
    blocks, shapes = teacher
    factory, options, where = student_factory(StudentConfig(kind="donna"), len(blocks))
    torch.manual_seed(0)
    block = make_block(factory, 2, blocks[2], *shapes[2], options(2), where)
    path = {"s2_kernel": 5, "s2_expansion": 4, "s2_attention": "se", "s2_depth": 2, "s2_width": 12}
    x = torch.randn(4, *shapes[2][0])
    train_one_step(block, x, path)
    expected = block(x)
    frozen = block.freeze(path).eval()
    assert not any(type(m).__name__.startswith(("Mixed", "PathSampling")) for m in frozen.modules())
    torch.testing.assert_close(frozen(x), expected, rtol=0, atol=1e-6)
    dw = frozen.layers[1].depthwise[0].weight  # the centre 5x5 of the shared 7x7 kernels, first 12*4 channels
    assert dw.shape == (48, 1, 5, 5)
    assert torch.equal(dw, block.layers.blocks[1].depthwise[0].weight[:48, :, 1:6, 1:6])
    with torch.no_grad():  # an independent copy
        dw.add_(1.0)
    assert torch.equal(block(x), expected)


def test_paths_and_weights_of_a_block_do_not_depend_on_the_other_blocks(student, teacher):
    blocks, shapes = teacher
    factory, options, where = student_factory(StudentConfig(kind="donna"), len(blocks))
    for i in (1, 3):
        torch.manual_seed(123)  # whatever the global RNG holds
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(block_seed(0, i))
            alone = make_block(factory, i, blocks[i], *shapes[i], options(i), where)
        for a, b in zip(alone.state_dict().values(), student.blocks[i].state_dict().values()):
            assert torch.equal(a, b)
        ours, theirs = PathSampler(alone.choices, 5, i), PathSampler(student.blocks[i].choices, 5, i)
        seq = [ours.sample() for _ in range(20)]
        assert seq == [theirs.sample() for _ in range(20)]
        assert len({tuple(p.values()) for p in seq}) > 10 and all(alone.check_path(p) == p for p in seq)


def test_donna_options_and_errors():
    config = StudentConfig(kind="donna", kernels=[3], expansions=[6], widths=[1.0], attention=["se"], layers=None)
    assert config.candidate_expansions() == [6]
    assert StudentConfig(kind="donna").candidate_expansions() == [2, 3, 4, 6]
    assert StudentConfig().candidate_expansions() == [3, 6]
    # a job file with kind: donna distils with nmse unless it names a loss
    assert tiny_config(model={"student": {"kind": "donna", "expansions": None}}).distill.loss == "nmse"
    assert tiny_config(model={"student": {"kind": "donna"}}, distill={"loss": "mse"}).distill.loss == "mse"
    assert tiny_config().distill.loss == "mse"
    cases = [
        ({"kind": "dna", "widths": [0.5]}, r"widths = \[0.5\] is an option of kind: donna, but kind = 'dna'"),
        ({"kind": "fixed", "attention": ["se"]}, r"attention = \['se'\] is an option of kind: donna"),
        ({"kind": "donna", "identity": True}, "identity = true is an option of kind: dna.*drop identity"),
        ({"kind": "donna", "width_mult": 0.5}, r"width_mult = 0.5 .*give candidates as widths"),
        ({"kind": "donna", "widths": []}, r"widths = \[\] must be a non-empty list of numbers > 0"),
        ({"kind": "donna", "widths": [0.5, -1]}, r"widths = \[0.5, -1.*numbers > 0"),
        ({"kind": "donna", "attention": ["se", "cbam"]}, r"attention = .*\['none', 'se'\]; \['cbam'\] are not"),
        ({"kind": "donna", "attention": ["se", "se"]}, "distinct"),
        ({"kind": "donna", "expansions": [2, 0]}, r"expansions = \[2, 0\] must be a non-empty list of positive ints"),
        ({"kind": "dnaa"}, r"model.student.kind = 'dnaa' is not valid; choose one of \['dna', 'fixed', 'donna', 'vit'\]"),
    ]
    for student, message in cases:
        with pytest.raises(ConfigError, match=message):
            tiny_config(model={"student": {"expansions": None, **student}})
    assert isinstance(tiny_config(model={"student": {"kind": "donna", "expansions": None}}), Config)


@pytest.mark.slow
def test_pipebd_is_bitwise_reference_on_the_donna_space(tmp_path):
    student = {"model": {"student": {"kind": "donna", "kernels": [3, 5], "expansions": [2, 4]}},
               "distill": {"max_steps_per_epoch": 3, "paths_per_step": 2}}
    ref = tmp_path / "ref"
    manifest = train(tiny_config(tmp_path, **student), ref)
    pipe = tmp_path / "pipe"
    pipe_manifest = train(tiny_config(tmp_path, **student, execution={"executor": "pipebd", "workers": 2}), pipe)
    n = manifest["num_blocks"]
    assert_same_blocks(ref, pipe, n, exact=True)
    assert [b["losses"] for b in pipe_manifest["blocks"]] == [b["losses"] for b in manifest["blocks"]]
    assert json.loads((ref / "library.json").read_text())["config"]["distill"]["loss"] == "nmse"
