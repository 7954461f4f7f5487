"""Vision-transformer student space (AutoFormer, DONNA): per block, layers, embedding width, heads and MLP ratio."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import nni
import torch
from torch import nn

from nni.nas.nn.pytorch import ModelSpace, MutableLayerNorm, MutableLinear, MutableMultiheadAttention, Repeat

__all__ = ["TransformerLayer", "PatchEmbed", "TransformerBlock", "vit_space", "embed_choices", "teacher_layers"]

Shape = Tuple[int, ...]


def embed_choices(dim: int, widths: Sequence[float], heads: Sequence[int]) -> list:
    """Embedding widths of a block: ``dim * w`` for each ``w``, rounded to a multiple of every head count (NNI's
    mixed attention needs each width divisible by each head count), sorted, distinct."""
    unit = math.lcm(*[int(h) for h in heads])
    return sorted({max(unit, int(round(dim * w / unit)) * unit) for w in widths})


def teacher_layers(teacher_block: nn.Module) -> int:
    """Encoder layers of a teacher block: its outermost attention modules (``nn.MultiheadAttention``, timm's
    ``Attention``, any class whose name ends in ``Attention``). For a traced block (a ``GraphModule``, whose
    containers are plain copies) the classes come from the nodes' ``nn_module_stack``."""
    def attention(cls: Any) -> bool:
        name = cls if isinstance(cls, str) else getattr(cls, "__name__", "")
        return name.endswith("Attention") or cls is nn.MultiheadAttention

    names = {name for name, m in teacher_block.named_modules() if attention(type(m))}
    for node in getattr(getattr(teacher_block, "graph", None), "nodes", ()):
        names.update(name for name, cls in node.meta.get("nn_module_stack", {}).values() if attention(cls))
    return sum(1 for name in names if not any(name.startswith(other + ".") for other in names))


class TransformerLayer(nn.Module):
    """Pre-norm encoder layer whose widths may be NNI choices: LayerNorm, multi-head self-attention, residual;
    LayerNorm, MLP (``embed * mlp_ratio`` hidden, GELU), residual.

    Parameters
    ----------
    embed, heads, mlp_ratio : int or nni.mutable.MutableExpression
        Token width, attention heads and MLP expansion.
    """

    def __init__(self, *, embed: Any, heads: Any, mlp_ratio: Any):
        super().__init__()
        self.norm1 = MutableLayerNorm(embed)
        self.attn = MutableMultiheadAttention(embed, heads, batch_first=True)
        self.norm2 = MutableLayerNorm(embed)
        self.fc1 = MutableLinear(embed, embed * mlp_ratio)
        self.act = nn.GELU()
        self.fc2 = MutableLinear(embed * mlp_ratio, embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class PatchEmbed(nn.Module):
    """Image to tokens at the teacher's width, as a ViT's first block does: non-overlapping ``patch`` x ``patch``
    projection, a class token first when the teacher has one, a learnt position embedding.

    Parameters
    ----------
    channels, dim, patch, tokens : int
        Image channels, token width, patch size and tokens out (patches, plus one with ``class_token``).
    class_token : bool
        Prepend a learnt class token.
    """

    def __init__(self, *, channels: int, dim: int, patch: int, tokens: int, class_token: bool):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position


class TransformerBlock(ModelSpace):
    """One student block of transformer layers, a weight-sharing supernet of AutoFormer's choices: ``s{i}_depth``
    layers (``Repeat``), each ``s{i}_embed`` wide with ``s{i}_heads`` heads and an ``s{i}_mlp_ratio`` MLP, between
    linear maps from and to the teacher's token width (``MutableLinear``, ``MutableLayerNorm``,
    ``MutableMultiheadAttention``: NNI's one-shot supermodules slice the largest weights).

    Parameters
    ----------
    index : int
        Block index (in every label).
    dim_in, dim_out : int
        Token widths of the teacher block's input and output.
    embeds, heads, mlp_ratios : sequence of int
        Candidates of the embedding width, head count and MLP ratio.
    max_depth : int
        Most layers (the depth choice is 1..max_depth).
    embed : nn.Module, optional
        Runs first (a :class:`PatchEmbed` for the first block, whose input is the image).
    """

    def __init__(self, *, index: int, dim_in: int, dim_out: int, embeds: Sequence[int], heads: Sequence[int],
                 mlp_ratios: Sequence[int], max_depth: int, embed: Optional[nn.Module] = None):
        super().__init__()
        width = nni.choice(f"s{index}_embed", list(embeds))
        head = nni.choice(f"s{index}_heads", list(heads))
        ratio = nni.choice(f"s{index}_mlp_ratio", list(mlp_ratios))
        self.embed = embed if embed is not None else nn.Identity()
        self.enter = MutableLinear(dim_in, width)
        self.layers = Repeat(lambda _: TransformerLayer(embed=width, heads=head, mlp_ratio=ratio), (1, max_depth),
                             label=f"s{index}_depth")
        self.norm = MutableLayerNorm(width)
        self.leave = MutableLinear(width, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.leave(self.norm(self.layers(self.enter(self.embed(x)))))


def vit_space(index: int, shape_in: Shape, shape_out: Shape, teacher_block: nn.Module, *,
              widths: Sequence[float] = (0.5, 0.75, 1.0), heads: Sequence[int] = (2, 4),
              mlp_ratios: Sequence[int] = (2, 4), layers: Optional[int] = None) -> Optional[TransformerBlock]:
    """The block-space factory of ``model.student.kind: vit``: a :class:`TransformerBlock` for a teacher block that
    outputs tokens ``(T, D)``, distilled against the teacher's token sequence.

    Embedding widths are ``widths`` relative to ``D`` (:func:`embed_choices`); the most layers is ``layers`` or the
    teacher block's encoder layers (:func:`teacher_layers`). The first block (an image in) embeds patches first
    (:class:`PatchEmbed`: patch size and class token from ``T`` and the image size). A block whose output is not a
    token sequence (the classifier head) gets ``None``: a fresh copy of the teacher block.

    Raises
    ------
    ValueError
        Token counts that differ between input and output, or an image that ``T`` tokens cannot tile.
    """
    if len(shape_out) != 2:
        return None
    tokens, dim = shape_out
    embed = None
    if len(shape_in) == 3:
        channels, height, width = shape_in
        for patches, class_token in ((tokens - 1, True), (tokens, False)):
            patch = math.isqrt(height * width // patches) if patches > 0 else 0
            if patch and height % patch == 0 and width % patch == 0 and (height // patch) * (width // patch) == patches:
                embed = PatchEmbed(channels=channels, dim=dim, patch=patch, tokens=tokens, class_token=class_token)
                break
        else:
            raise ValueError(f"block {index}: {tokens} tokens out of a {tuple(shape_in)} image are not square patches "
                             "(with or without one class token); give this block a space of your own (class_path)")
        dim_in = dim
    elif len(shape_in) == 2 and shape_in[0] == tokens:
        dim_in = shape_in[1]
    else:
        raise ValueError(f"block {index}: kind: vit maps token sequences, got {tuple(shape_in)} -> {tuple(shape_out)}")
    depth = layers if layers is not None else max(1, teacher_layers(teacher_block))
    return TransformerBlock(index=index, dim_in=dim_in, dim_out=dim, embeds=embed_choices(dim, widths, heads),
                            heads=heads, mlp_ratios=mlp_ratios, max_depth=depth, embed=embed)
