import pytest
import torch
from torch import nn

from nni_pipebd.config import ConfigError, StudentConfig
from nni_pipebd.spaces.builder import block_geometry, build_student, fresh_copy
from nni_pipebd.spaces.dna import DnaBlock
from nni_pipebd.spaces.supernet import BlockSupernet
from nni_pipebd.spec.blocks import teacher_shapes
from nni_pipebd.spec.teachers import build_teacher_blocks, build_teacher_model

SAMPLE = torch.randn(2, 3, 32, 32)


def mobilenet():
    torch.manual_seed(0)
    return build_teacher_blocks(build_teacher_model("mobilenet_v2", 10, {"width_mult": 0.35}), SAMPLE)[0]


def test_dna_student_follows_teacher_geometry():
    t = mobilenet()
    shapes = teacher_shapes(t, SAMPLE)
    space = build_student(StudentConfig(), t, shapes, seed=0)
    blocks = list(space.blocks)
    assert [type(b.space) for b in blocks[:5]] == [DnaBlock] * 5 and not isinstance(blocks[5], BlockSupernet)
    # layer counts = spatial convs of each teacher block (MobileNetV2: one depthwise conv per inverted residual)
    assert [len(b.layers) for b in blocks[:5]] == [2, 2, 3, 7, 4]
    assert list(space.simplify())[:3] == ["s0_i0", "s0_i1", "s1_i0"]
    for block, (shape_in, shape_out) in zip(blocks, shapes):
        block.eval()
        if isinstance(block, BlockSupernet):
            block.set_path({label: names[-1] for label, names in block.choices.items()})
        assert block(torch.zeros((2,) + shape_in)).shape[1:] == shape_out


def test_head_student_is_fresh_copy_without_dropout():
    t = mobilenet()
    head = fresh_copy(t[-1])
    assert not any(isinstance(m, nn.Dropout) for m in head.modules())
    assert all(p.requires_grad for p in head.parameters())
    assert not torch.equal(head.get_submodule("classifier.1").weight, t[-1].get_submodule("classifier.1").weight)
    assert head(torch.zeros(2, *teacher_shapes(t, SAMPLE)[-1][0])).shape == (2, 10)


@pytest.mark.slow  # runs long (over a second here)
def test_initialisation_depends_only_on_seed_and_block():
    t = mobilenet()
    shapes = teacher_shapes(t, SAMPLE)
    a = build_student(StudentConfig(), t, shapes, seed=1)
    torch.manual_seed(99)
    b = build_student(StudentConfig(), t, shapes, seed=1)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    c = build_student(StudentConfig(), t, shapes, seed=2)
    assert not torch.equal(next(iter(a.blocks[0].parameters())), next(iter(c.blocks[0].parameters())))


def test_fixed_student_and_errors():
    t = mobilenet()
    shapes = teacher_shapes(t, SAMPLE)
    fixed = build_student(StudentConfig(kind="fixed", path="k5e3"), t, shapes, seed=0)
    assert all(getattr(b, "choices", {}) == {} for b in fixed.blocks)
    with pytest.raises(ConfigError, match="path is required"):
        build_student(StudentConfig(kind="fixed"), t, shapes, seed=0)
    with pytest.raises(ConfigError, match=r"'k9e9' is not a candidate"):
        build_student(StudentConfig(kind="fixed", path="k9e9"), t, shapes, seed=0)
    with pytest.raises(ConfigError, match=r"path has no choice for \['s0_i1'\]"):
        build_student(StudentConfig(kind="fixed", path={"s0_i0": "k3e3"}), t, shapes, seed=0)
    with pytest.raises(ConfigError, match="layers has 2 entries but the teacher has 6 blocks"):
        build_student(StudentConfig(layers=[1, 2]), t, shapes, seed=0)


def test_geometry_errors():
    with pytest.raises(ValueError, match=r"block 3: .* resizes \(8, 8\) -> \(3, 3\)"):
        block_geometry(3, nn.Identity(), (4, 8, 8), (4, 3, 3))
    with pytest.raises(ValueError, match="block 0: a DNA block maps feature maps"):
        block_geometry(0, nn.Identity(), (4, 8, 8), (10,))


# --- any block space: a user's factory named by class_path (examples/custom/custom_space.py)

from conftest import EXAMPLES  # noqa: E402

USER = StudentConfig(class_path="custom_space:block_space", init_args={"widths": [0.5, 1.0], "max_depth": 2})


def test_user_factory_gives_one_supernet_per_feature_block_and_a_fresh_head():
    t = mobilenet()
    shapes = teacher_shapes(t, SAMPLE)
    space = build_student(USER, t, shapes, seed=0, base_dir=str(EXAMPLES / "custom"))
    blocks = list(space.blocks)
    assert all(isinstance(b, BlockSupernet) for b in blocks[:5]) and not isinstance(blocks[5], BlockSupernet)
    assert blocks[1].choices == {"b1_width": [4, 8], "b1_op": ["conv3", "conv5", "skip"], "b1_depth": [0, 1, 2]}
    assert {label: values for label, values in space.simplify().items() if label.startswith("b1_")}.keys() == \
        blocks[1].choices.keys()
    for block, (shape_in, shape_out) in zip(blocks, shapes):
        if isinstance(block, BlockSupernet):
            block.set_path({label: values[0] for label, values in block.choices.items()})
        assert block.eval()(torch.zeros((2,) + shape_in)).shape[1:] == shape_out
    again = build_student(USER, t, shapes, seed=0, base_dir=str(EXAMPLES / "custom"))
    for x, y in zip(space.state_dict().values(), again.state_dict().values()):
        assert torch.equal(x, y)


def _factory(kind):
    def factory(index, shape_in, shape_out, teacher_block):
        if kind == "bad":
            return "conv"
        return nn.Conv2d(shape_in[0], shape_out[0], 1)
    return factory


def test_factory_results_and_label_clashes(monkeypatch):
    from nni_pipebd.spaces import builder
    from nni_pipebd.spaces.builder import make_block

    t = mobilenet()
    shape_in, shape_out = teacher_shapes(t, SAMPLE)[0]
    fixed = make_block(_factory("fixed"), 0, t[0], shape_in, shape_out, {})
    assert type(fixed) is nn.Conv2d
    with pytest.raises(ConfigError, match=r"returned a str for block 0 .*return an NNI ModelSpace"):
        make_block(_factory("bad"), 0, t[0], shape_in, shape_out, {})
    monkeypatch.syspath_prepend(str(EXAMPLES / "custom"))
    import custom_space

    def same_labels(index, shape_in, shape_out, teacher_block):
        return custom_space.block_space(0, shape_in, shape_out, teacher_block)

    monkeypatch.setattr(builder, "import_object", lambda *args: same_labels)
    with pytest.raises(ConfigError, match=r"label 'b0_width' is used by block 0 and block 1; labels must be unique"):
        build_student(StudentConfig(class_path="anything:here"), t, teacher_shapes(t, SAMPLE), seed=0)


def test_student_module_file_counts_its_blocks(tmp_path, monkeypatch):
    from conftest import EXAMPLES, user_config
    from nni_pipebd.job import build_job
    from nni_pipebd.library import save_object_file

    monkeypatch.syspath_prepend(str(EXAMPLES / "custom"))
    import custom_space

    short = save_object_file(custom_space.StudentSpace([custom_space.BlockSpace(0, 1, 4, 1)]), tmp_path, "student")
    with pytest.raises(ConfigError, match=r"has 1 blocks but the teacher has 4; give one block space per teacher"):
        build_job(user_config().with_student(short))
    with pytest.raises(ConfigError, match="without `blocks`"):
        build_job(user_config().with_student(save_object_file(3, tmp_path, "student")))
    with pytest.raises(ConfigError, match="is the student space itself; drop class_path"):
        user_config(model={"student": {"class_path": "custom_space:block_space", "module": str(short)}})
