"""Tests of nni_pipebd.spaces.vit: the transformer block space on a ViT teacher's blocks (token sequences)."""

import pytest
import torch
from torchvision.models.vision_transformer import VisionTransformer

from nni_pipebd.spaces.supernet import BlockSupernet
from nni_pipebd.spaces.vit import embed_choices, teacher_layers, vit_space
from nni_pipebd.spec.blocks import BlockSpec, teacher_shapes
from nni_pipebd.spec.teachers import build_teacher_blocks


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=8, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=10)
    x = torch.randn(2, 3, 16, 16)
    blocks, _ = build_teacher_blocks(model, x)
    return blocks, teacher_shapes(blocks, x), x


def test_embed_widths_are_multiples_of_every_head_count():
    assert embed_choices(16, (0.5, 0.75, 1.0), (2, 4)) == [8, 12, 16]
    assert embed_choices(192, (0.5, 1.0), (3, 4)) == [96, 192]
    assert embed_choices(10, (0.1,), (4,)) == [4]  # at least one width per head


def test_blocks_choose_depth_embedding_heads_and_mlp_ratio(teacher):
    blocks, shapes, x = teacher
    assert [s for s, _ in shapes] == [(3, 16, 16)] + [(17, 16)] * 4  # 16 patches and the class token
    students = []
    for i, (block, (shape_in, shape_out)) in enumerate(zip(blocks, shapes)):
        space = vit_space(i, shape_in, shape_out, block)
        if i == 4:
            assert space is None  # the head: a fresh copy of the teacher's
            continue
        assert teacher_layers(block) == 2
        student = BlockSupernet(space, i)
        assert student.choices == {f"s{i}_embed": [8, 12, 16], f"s{i}_depth": [1, 2], f"s{i}_heads": [2, 4],
                                   f"s{i}_mlp_ratio": [2, 4]}
        assert type(student.layers.blocks[0].attn).__name__ == "MixedMultiHeadAttention"
        students.append(student)
    assert type(students[0].embed).__name__ == "PatchEmbed" and students[0].embed.class_token is not None
    BlockSpec(blocks[:4], students[:4], x)  # every candidate of every label maps T_i's input to its output shape


@pytest.mark.parametrize("pick", [0, -1])
def test_frozen_path_runs_like_the_supernet(teacher, pick):
    blocks, shapes, _ = teacher
    student = BlockSupernet(vit_space(1, *shapes[1], blocks[1]), 1)
    path = {label: values[pick] for label, values in student.choices.items()}
    student.set_path(path)
    student.eval()
    frozen = student.freeze(path).eval()
    assert not any(type(m).__name__.startswith(("Mixed", "PathSampling")) for m in frozen.modules())
    assert len(frozen.layers) == path["s1_depth"] and frozen.enter.out_features == path["s1_embed"]
    x = torch.randn(3, 17, 16)
    with torch.no_grad():  # sliced weights against the frozen copies: equal up to float rounding of the matmuls
        torch.testing.assert_close(frozen(x), student(x), rtol=1e-5, atol=1e-6)


def test_shapes_the_space_cannot_map_are_named():
    with pytest.raises(ValueError, match=r"block 2: kind: vit maps token sequences, got \(9, 16\) -> \(17, 16\)"):
        vit_space(2, (9, 16), (17, 16), torch.nn.Identity())
    with pytest.raises(ValueError, match=r"block 0: 15 tokens out of a \(3, 16, 16\) image are not square patches"):
        vit_space(0, (3, 16, 16), (15, 16), torch.nn.Identity())


def test_a_timm_vits_traced_blocks_count_their_encoder_layers():
    """timm's attention is traced into (a GraphModule keeps plain containers): the layers are read off the nodes."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, embed_dim=48,
                              depth=6, num_heads=3)
    blocks, names = build_teacher_blocks(model, torch.randn(2, 3, 32, 32))
    assert names == ["blocks.1", "blocks.2", "blocks.4", "getitem_41"]
    assert [teacher_layers(b) for b in blocks] == [1, 1, 2, 2, 0]
    assert BlockSupernet(vit_space(3, (17, 48), (17, 48), blocks[3], heads=(3,)), 3).choices["s3_depth"] == [1, 2]
