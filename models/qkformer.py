"""QKFormer (Zhou et al., "QKFormer: Hierarchical Spiking Transformer using Q-K Attention",
NeurIPS 2024), registered with timm.

A hierarchical spiking transformer (``zhouchenlin2096/QKFormer``, ``imagenet/qkformer.py`` and
``cifar10/model.py``) in three stages at widths C/4, C/2, C:

- Patch embedding with a deformed shortcut (SPEDS): conv3x3-BN(-maxpool)-LIF layers, plus a
  conv1x1 (stride 2 where the branch pools twice)-BN-LIF shortcut from the first spikes (the
  stage's input in later stages); their spikes are added. On ImageNet the first embedding is
  three convs (C/8 pooled, C/4 pooled, C/4) and a later one pools after its first conv; on CIFAR
  the first is two convs without pooling and a later one pools after its second.
- Stages 1 and 2: blocks with Q-K token attention ``x = x + QKTA(x); x = x + MLP(x)``: ``Q, K =
  LIF(BN(conv1x1(x)))``; per head, ``A = LIF_{V_th/2}(sum over the head's channels of Q)`` (one
  spike per token and head), out ``LIF(BN(conv1x1(A * K)))``. Stage 3: Spikformer's blocks
  (``models.spikformer.SpikingSelfAttention``). ImageNet: 1, 2 and depth - 3 blocks; CIFAR: 1,
  1 and depth - 2, with 8 heads everywhere.
- Head: mean over tokens and time, linear.

The neurons, BatchNorm and SOP counting rule are those of ``models.spikformer`` (QKFormer's own
order conv-BN-maxpool-LIF needs no change). A Q spike is summed into its token's count (1 SOP,
``SpikeSum``); ``A * K`` is a mask, and its convolution is credited to K's neurons (an upper bound).

    timm.create_model("qkformer_10_768", T=4, num_classes=1000)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from timm.models import register_model
from torch import Tensor, nn

from models.neurons import LIF, NeuronConfig
from models.spikformer import (PAPER_NEURON, ConvBN, SpikeSum, SpikformerBlock, SpikingSelfAttention,
                               SpikingTransformer, attention_neuron, create_transformer)

__all__ = ["TokenQKAttention", "qk_stem", "QKPatchEmbedInit", "QKPatchEmbedStage", "QKFormer"]

Edges = list[tuple[LIF, nn.Module]]


class TokenQKAttention(nn.Module):
    """Q-K token attention: ``[T, B, C, H, W]`` (sums of spikes) -> spikes of ``proj_lif``."""

    def __init__(self, dim: int, heads: int, neuron: NeuronConfig):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.q, self.k = ConvBN(dim, dim), ConvBN(dim, dim)
        self.q_lif, self.k_lif = LIF(dim, neuron), LIF(dim, neuron)
        self.q_sum = SpikeSum((3,))  # over the head's channels of [T, B, heads, d, H, W]
        self.attn_lif = LIF(heads, attention_neuron(neuron))
        self.proj, self.proj_lif = ConvBN(dim, dim, bias=True), LIF(dim, neuron)

    def forward(self, x: Tensor) -> Tensor:
        q = self.q_lif(self.q(x)).unflatten(2, (self.heads, -1))
        k = self.k_lif(self.k(x)).unflatten(2, (self.heads, -1))
        attn = self.attn_lif(self.q_sum(q))  # [T, B, heads, 1, H, W]: which tokens each head keeps
        return self.proj_lif(self.proj((attn * k).flatten(2, 3)))

    def input_consumers(self) -> list[nn.Module]:
        return [self.q.conv, self.k.conv]

    def spike_edges(self) -> Edges:
        return [(self.q_lif, self.q_sum), (self.k_lif, self.proj.conv)]


def qk_stem(in_chans: int, dim: int, imagenet: bool) -> ConvBN:
    """The first SPEDS embedding's first conv3x3-BN(-maxpool on ImageNet), ``in_chans -> dim / 2``:
    the network's stem."""
    return ConvBN(in_chans, dim // 2, 3, pool=imagenet)


class QKPatchEmbedInit(nn.Module):
    """The first SPEDS embedding after its first conv (``qk_stem``, which the network runs): that
    conv's current -> ``[T, B, dim, H', W']`` sums of spikes.

    ``lif0`` -> ``convs`` each conv3x3-BN(-maxpool)-LIF; the shortcut conv1x1 (stride 2 where
    the branch pools)-BN-LIF reads ``lif0``'s spikes.
    """

    def __init__(self, dim: int, imagenet: bool, neuron: NeuronConfig):
        super().__init__()
        half = dim // 2
        self.lif0 = LIF(half, neuron)
        layers = [(half, dim, True), (dim, dim, False)] if imagenet else [(half, dim, False)]
        self.convs = nn.ModuleList(ConvBN(i, o, 3, pool=p) for i, o, p in layers)
        self.lifs = nn.ModuleList(LIF(o, neuron) for _, o, _ in layers)
        self.res = ConvBN(half, dim, 1, 2 if imagenet else 1)
        self.res_lif = LIF(dim, neuron)

    def forward(self, current: Tensor) -> Tensor:
        s0 = s = self.lif0(current)
        for conv, lif in zip(self.convs, self.lifs):
            s = lif(conv(s))
        return s + self.res_lif(self.res(s0))

    def spike_edges(self, sources: list[LIF]) -> tuple[Edges, list[LIF]]:
        spikes = [self.lif0, *self.lifs]
        edges = [(lif, conv.conv) for lif, conv in zip(spikes, self.convs)] + [(self.lif0, self.res.conv)]
        return edges, [self.lifs[-1], self.res_lif]


class QKPatchEmbedStage(nn.Module):
    """A later SPEDS embedding: ``[T, B, dim/2, H, W]`` sums of spikes -> ``[T, B, dim, H/2, W/2]``.

    conv3x3-BN-LIF twice (maxpool after the first, ``pool_first``, or the second) plus the
    shortcut conv1x1 stride 2-BN-LIF of the input."""

    def __init__(self, dim: int, pool_first: bool, neuron: NeuronConfig):
        super().__init__()
        self.conv1, self.lif1 = ConvBN(dim // 2, dim, 3, pool=pool_first), LIF(dim, neuron)
        self.conv2, self.lif2 = ConvBN(dim, dim, 3, pool=not pool_first), LIF(dim, neuron)
        self.res, self.res_lif = ConvBN(dim // 2, dim, 1, 2), LIF(dim, neuron)

    def forward(self, x: Tensor) -> Tensor:
        return self.lif2(self.conv2(self.lif1(self.conv1(x)))) + self.res_lif(self.res(x))

    def spike_edges(self, sources: list[LIF]) -> tuple[Edges, list[LIF]]:
        edges = [(s, c) for s in sources for c in (self.conv1.conv, self.res.conv)]
        return edges + [(self.lif1, self.conv2.conv)], [self.lif2, self.res_lif]


class QKFormer(SpikingTransformer):
    """QKFormer (HST) at final width ``dim``: three SPEDS embeddings and stages, linear head.

    Args:
        depths: blocks per stage (Q-K token attention in the first two, SSA in the last).
        dim, heads: final embedding width (stages at dim/4, dim/2, dim) and attention heads.
        imagenet: the ImageNet embeddings (224 px -> 14 x 14 tokens) or the CIFAR ones (32 -> 8).
        mlp_ratio, T, num_classes, in_chans, neuron: as in ``models.spikformer.Spikformer``.
    """

    def __init__(self, depths: tuple[int, int, int], dim: int, heads: int, *, imagenet: bool = True,
                 mlp_ratio: int = 4, T: int = 4, num_classes: int = 1000, in_chans: int = 3,
                 neuron: NeuronConfig | Mapping[str, Any] | None = PAPER_NEURON):
        super().__init__(T, num_classes, neuron)
        cfg = self.neuron
        widths = (dim // 4, dim // 2, dim)
        self.stem = qk_stem(in_chans, widths[0], imagenet)
        self.patch_embed1 = QKPatchEmbedInit(widths[0], imagenet, cfg)
        self.stage1 = nn.Sequential(*(SpikformerBlock(TokenQKAttention(widths[0], heads, cfg), widths[0],
                                                      mlp_ratio, cfg) for _ in range(depths[0])))
        self.patch_embed2 = QKPatchEmbedStage(widths[1], imagenet, cfg)
        self.stage2 = nn.Sequential(*(SpikformerBlock(TokenQKAttention(widths[1], heads, cfg), widths[1],
                                                      mlp_ratio, cfg) for _ in range(depths[1])))
        self.patch_embed3 = QKPatchEmbedStage(dim, imagenet, cfg)
        self.stage3 = nn.Sequential(*(SpikformerBlock(SpikingSelfAttention(dim, heads, cfg), dim, mlp_ratio, cfg)
                                      for _ in range(depths[2])))
        self.num_features = dim
        self.head = nn.Linear(dim, num_classes)
        self._init_linear()

    def parts(self) -> list[nn.Module]:
        return [self.patch_embed1, *self.stage1, self.patch_embed2, *self.stage2, self.patch_embed3, *self.stage3]


def _qkformer(name: str, pretrained: bool, depth: int, dim: int, heads: int, cifar: bool, **kwargs: Any) -> QKFormer:
    depths = (1, 1, depth - 2) if cifar else (1, 2, depth - 3)
    model_args = dict(depths=depths, dim=dim, heads=heads, imagenet=not cifar, T=4, num_classes=10 if cifar else 1000)
    return create_transformer(QKFormer, name, pretrained, model_args, kwargs)


@register_model
def qkformer_10_384(pretrained: bool = False, **kwargs: Any) -> QKFormer:
    """QKFormer HST-10-384, ImageNet: 6 heads (16,473,688 parameters; the paper prints 16.47 M)."""
    return _qkformer("qkformer_10_384", pretrained, 10, 384, 6, False, **kwargs)


@register_model
def qkformer_10_512(pretrained: bool = False, **kwargs: Any) -> QKFormer:
    """QKFormer HST-10-512, ImageNet: 8 heads (29,079,336 parameters; the paper prints 29.08 M)."""
    return _qkformer("qkformer_10_512", pretrained, 10, 512, 8, False, **kwargs)


@register_model
def qkformer_10_768(pretrained: bool = False, **kwargs: Any) -> QKFormer:
    """QKFormer HST-10-768, ImageNet: 12 heads (64.96 M; 64,962,760 in the official training log)."""
    return _qkformer("qkformer_10_768", pretrained, 10, 768, 12, False, **kwargs)


@register_model
def qkformer_cifar_4_384(pretrained: bool = False, **kwargs: Any) -> QKFormer:
    """QKFormer HST-4-384, CIFAR-10: 8 heads (6,706,234 parameters; the paper's 6.74 M is the
    count with CIFAR-100's 100 classes)."""
    return _qkformer("qkformer_cifar_4_384", pretrained, 4, 384, 8, True, **kwargs)
