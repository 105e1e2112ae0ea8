"""Spike-driven Transformer (Yao et al., NeurIPS 2023) and its v2, Meta-SpikeFormer (Yao et al.,
"Spike-driven Transformer V2: Meta Spiking Neural Network Architecture Inspiring the Design of
Next-generation Neuromorphic Chips", ICLR 2024), registered with timm.

Both put the residual stream on the membrane: a block reads and returns a real-valued current
``x``, and every branch opens with a LIF, so every layer after the stem reads spikes (``models.ms_resnet``'s
shortcut). The neurons, BatchNorm, pooling order and SOP counting rule are those of
``models.spikformer``.

Spike-driven Transformer (``BICLab/Spike-Driven-Transformer``, ``module/ms_conv.py``,
``module/sps.py``, ``model/spikeformer.py``):

- SPS as Spikformer's (pooling ``1111`` on ImageNet, ``0011`` on CIFAR), but its last conv-BN
  (-maxpool) current ``c`` is kept: ``out = c + BN(conv3x3(LIF(c)))``.
- Block: ``x = x + BN(conv1x1(SDSA(LIF(x))))``, ``x = x + MLP(x)``; MLP is LIF-conv1x1-BN twice.
- SDSA: ``Q, K, V = LIF(BN(conv1x1(s)))``, ``kv = LIF_{V_th/2}(sum_N(K * V))`` per channel (a
  mask and a column sum), out ``Q * kv`` (a mask). The heads do not enter (every operation is
  per channel); the reference builds a ``talking_heads`` conv it never calls, left out here.
- Head: mean over tokens of the current, LIF, linear, mean over T.

Meta-SpikeFormer (``BICLab/Spike-Driven-Transformer-V2``, ``classification/models.py``,
``Spiking_vit_MetaFormer``; the released attention is ``MS_Attention_RepConv_qkv_id``):

- Four stages at widths ``C0..C3``: downsample conv7x7/2 (C0/2, no neuron: the stem) and a
  ConvBlock; downsample 3x3/2 (C0), ConvBlock; 3x3/2 (C1), two ConvBlocks; 3x3/2 (C2), six
  transformer blocks; 3x3/1 (C3), two transformer blocks. A downsampling after the first is
  LIF-conv-BN (conv with bias).
- ConvBlock: ``x = x + SepConv(x)``, ``x = x + BN(conv3x3(LIF(BN(conv3x3(LIF(x))))))`` (ratio 4);
  SepConv: LIF-pwconv-BN-LIF-dwconv7x7-pwconv-BN (MobileNetV2's inverted separable conv).
- Transformer block: ``x = x + attn(x)``, ``x = x + MLP(x)``; attn: LIF, Q/K/V by RepConv-BN,
  LIFs, ``LIF_{V_th/2}(Q (K^T V) * 0.125)``, RepConv-BN; MLP as v1's. RepConv is
  conv1x1-BN(padded with its value at 0)-dwconv3x3-pwconv-BN, a 3x3 convolution after
  re-parameterisation; the reference puts a second BN after it (kept: its 2C parameters count).
- Head: mean over tokens of the current, LIF, linear, mean over T.

SOPs of the layers that read a real-valued tensor: a depthwise conv whose output feeds a
pointwise conv with nothing between (SepConv, RepConv) is one convolution after folding, so
the spikes before it are credited with the folded convolution's fan-out (``FoldedConv``); this
counts what a spike-driven implementation of the folded network does.

    timm.create_model("meta_spikeformer_8_512", T=4, num_classes=1000)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import register_model
from torch import Tensor, nn

from models.firing import synapses_per_neuron
from models.neurons import LIF, NeuronConfig
from models.resnet import _time_fold, _time_unfold
from models.spikformer import (CIFAR_POOLS, IMAGENET_POOLS, PAPER_NEURON, ConvBN, SpikeMatmul, SpikeSum,
                               SpikingTransformer, attention_neuron, create_transformer, merge_heads, split_heads,
                               sps_stem)

__all__ = ["SDTPatchEmbed", "SpikeDrivenSelfAttention", "MembraneMLP", "SpikeDrivenBlock", "SpikeDrivenTransformer",
           "FoldedConv", "RepConv", "SepConv", "MetaConvBlock", "Downsampling", "RepSelfAttention",
           "MetaTransformerBlock", "MetaSpikeFormer"]

Edges = list[tuple[LIF, nn.Module]]


# --- Spike-driven Transformer (v1) ---------------------------------------------------------------


class SDTPatchEmbed(nn.Module):
    """SPS with a membrane output, after its first conv (``models.spikformer.sps_stem``, the
    network's stem): that conv's current -> current ``[T, B, dim, H', W']``.

    ``lifs[i]`` reads the current of the i-th conv (the stem's first); the last conv's current
    ``c`` is the output's shortcut: ``c + rpe(lifs[3](c))``.
    """

    def __init__(self, dim: int, pools: Sequence[bool], neuron: NeuronConfig):
        super().__init__()
        widths = [dim // 8, dim // 4, dim // 2, dim]
        self.convs = nn.ModuleList(ConvBN(i, o, 3, pool=p) for i, o, p in zip(widths, widths[1:], pools[1:]))
        self.lifs = nn.ModuleList(LIF(o, neuron) for o in widths)
        self.rpe = ConvBN(dim, dim, 3)

    def forward(self, current: Tensor) -> Tensor:
        for conv, lif in zip(self.convs, self.lifs):
            current = conv(lif(current))
        return current + self.rpe(self.lifs[-1](current))

    def spike_edges(self, sources: list[LIF]) -> tuple[Edges, list[LIF]]:
        edges = [(lif, conv.conv) for lif, conv in zip(self.lifs, self.convs)]
        return edges + [(self.lifs[-1], self.rpe.conv)], []


class SpikeDrivenSelfAttention(nn.Module):
    """SDSA with its shortcut: current ``x [T, B, C, H, W]`` -> ``x + BN(conv1x1(Q * kv))``."""

    def __init__(self, dim: int, neuron: NeuronConfig):
        super().__init__()
        self.shortcut_lif = LIF(dim, neuron)
        self.q, self.k, self.v = (ConvBN(dim, dim) for _ in range(3))
        self.q_lif, self.k_lif, self.v_lif = (LIF(dim, neuron) for _ in range(3))
        self.kv = SpikeSum((-2, -1))  # sum over tokens of K * V, per channel
        self.kv_lif = LIF(dim, attention_neuron(neuron))
        self.proj = ConvBN(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = self.shortcut_lif(x)
        q, k, v = self.q_lif(self.q(s)), self.k_lif(self.k(s)), self.v_lif(self.v(s))
        kv = self.kv_lif(self.kv(k, v))  # [T, B, C, 1, 1] spikes
        return x + self.proj(q * kv)

    def spike_edges(self) -> Edges:
        # proj reads Q masked by kv: credited to Q (an upper bound).
        return [(self.shortcut_lif, c) for c in (self.q.conv, self.k.conv, self.v.conv)] + [
            (self.k_lif, self.kv), (self.q_lif, self.proj.conv)]


class MembraneMLP(nn.Module):
    """``x + BN(conv1x1(LIF(BN(conv1x1(LIF(x))))))`` (biases on): current -> current."""

    def __init__(self, dim: int, hidden: int, neuron: NeuronConfig):
        super().__init__()
        self.fc1_lif, self.fc1 = LIF(dim, neuron), ConvBN(dim, hidden, bias=True)
        self.fc2_lif, self.fc2 = LIF(hidden, neuron), ConvBN(hidden, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.fc2_lif(self.fc1(self.fc1_lif(x))))

    def spike_edges(self) -> Edges:
        return [(self.fc1_lif, self.fc1.conv), (self.fc2_lif, self.fc2.conv)]


class SpikeDrivenBlock(nn.Module):
    """SDSA then MLP, each with its membrane shortcut: ``[T, B, dim, H, W]`` currents."""

    def __init__(self, dim: int, mlp_ratio: int, neuron: NeuronConfig):
        super().__init__()
        self.attn = SpikeDrivenSelfAttention(dim, neuron)
        self.mlp = MembraneMLP(dim, dim * mlp_ratio, neuron)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.attn(x))

    def spike_edges(self, sources: list[LIF]) -> tuple[Edges, list[LIF]]:
        return self.attn.spike_edges() + self.mlp.spike_edges(), []


class _MembraneHead:
    """Mean over tokens of the last current, LIF (``head_lif``), linear, as both papers' heads."""

    head_lif: LIF
    head: nn.Linear

    def forward_head(self, x: Tensor, per_step: bool = False) -> Tensor:
        """Current ``[T, B, C, H, W]`` -> logits ``[B, classes]`` (mean over T), or per step
        ``[T, B, classes]`` with ``per_step``."""
        logits = self.head(self.head_lif(x.mean(dim=(-2, -1))))
        return logits if per_step else logits.mean(0)

    def head_edges(self, sources: list[LIF]) -> Edges:
        return [(self.head_lif, self.head)]


class SpikeDrivenTransformer(_MembraneHead, SpikingTransformer):
    """Spike-driven Transformer-``depth``-``dim``: SPS, ``depth`` SDSA blocks, LIF head.

    Args:
        depth, dim: encoder blocks and embedding width.
        pools: maxpool after each of SPS's four convolutions (``1111`` ImageNet, ``0011`` CIFAR).
        mlp_ratio, T, num_classes, in_chans, neuron: as in ``models.spikformer.Spikformer``.
    """

    def __init__(self, depth: int, dim: int, *, pools: Sequence[bool] = IMAGENET_POOLS, mlp_ratio: int = 4,
                 T: int = 4, num_classes: int = 1000, in_chans: int = 3,
                 neuron: NeuronConfig | Mapping[str, Any] | None = PAPER_NEURON):
        super().__init__(T, num_classes, neuron)
        cfg = self.neuron
        self.stem = sps_stem(in_chans, dim, pools)
        self.patch_embed = SDTPatchEmbed(dim, pools, cfg)
        self.blocks = nn.Sequential(*(SpikeDrivenBlock(dim, mlp_ratio, cfg) for _ in range(depth)))
        self.num_features = dim
        self.head_lif = LIF(dim, cfg)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():  # the reference's init: its convolutions; linear layers keep torch's
            if isinstance(m, nn.Conv2d):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def parts(self) -> list[nn.Module]:
        return [self.patch_embed, *self.blocks]


# --- Meta-SpikeFormer (v2) -----------------------------------------------------------------------


class FoldedConv(nn.Module):
    """Base of a chain of convolutions with nothing nonlinear between them that folds into one
    ``kernel`` x ``kernel`` convolution (padding ``kernel // 2``) from ``in_ch`` to ``out_ch``:
    the spikes it reads are credited with that convolution's fan-out (module docstring)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int):
        super().__init__()
        self.folded_geometry = (in_ch, out_ch, kernel)

    def synapses_per_neuron(self, neuron_shape: tuple[int, ...]) -> float:
        """Fan-out of one input neuron of ``neuron_shape`` ``[C, H, W]`` into the folded conv."""
        in_ch, out_ch, kernel = self.folded_geometry
        folded = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False, device="meta")
        return synapses_per_neuron(folded, neuron_shape)


class _BNAndPad(nn.BatchNorm2d):
    """BN, then pad 1 pixel with the value BN gives a zero input, without gradient:
    conv1x1-this-dwconv3x3 (no padding) equals conv1x1-BN-dwconv3x3 on a zero-padded input of
    the BN, so RepConv folds exactly into one 3x3 conv. In eval the value comes from the running
    statistics (the fold is exact); in training from the batch's, where the reference reads the
    running ones: those a recomputation under activation checkpointing would read one update
    later, so its gradients would not be the forward pass's."""

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        with torch.no_grad():
            if self.training:
                var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
            else:
                var, mean = self.running_var, self.running_mean
            pad = self.bias - mean * self.weight / torch.sqrt(var + self.eps)
        y = F.pad(y, [1, 1, 1, 1])
        border = torch.ones_like(y[:1, :1], dtype=torch.bool)
        border[..., 1:-1, 1:-1] = False
        return torch.where(border, pad.view(1, -1, 1, 1).to(y.dtype), y)


class RepConv(FoldedConv):
    """conv1x1-BN(padded)-dwconv3x3-pwconv1x1-BN-BN, ``dim -> out_ch`` on folded time; a 3x3
    conv once folded (the trailing second BN is the reference's ``nn.Sequential(RepConv, BN)``)."""

    def __init__(self, dim: int, out_ch: int):
        super().__init__(dim, out_ch, 3)
        self.conv1x1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn_pad = _BNAndPad(dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, groups=dim, bias=False)
        self.pwconv = nn.Conv2d(dim, out_ch, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.bn_out = nn.BatchNorm2d(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        """Spikes ``[T, B, dim, H, W]`` -> current ``[T, B, out_ch, H, W]``."""
        y = self.pwconv(self.dwconv(self.bn_pad(self.conv1x1(_time_fold(x)))))
        return _time_unfold(self.bn_out(self.bn(y)), x.shape[0])


class _DepthwisePointwise(FoldedConv):
    """dwconv k x k then pwconv1x1 (no bias), ``ch -> out_ch``: one k x k conv once folded."""

    def __init__(self, ch: int, out_ch: int, kernel: int):
        super().__init__(ch, out_ch, kernel)
        self.dwconv = nn.Conv2d(ch, ch, kernel, padding=kernel // 2, groups=ch, bias=False)
        self.pwconv = nn.Conv2d(ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pwconv(self.dwconv(x))


class SepConv(nn.Module):
    """LIF-pwconv-BN (dim -> 2 dim)-LIF-dwconv7x7-pwconv (-> dim)-BN: current -> current."""

    def __init__(self, dim: int, neuron: NeuronConfig, expansion: int = 2, kernel: int = 7):
        super().__init__()
        self.lif1, self.pw1 = LIF(dim, neuron), ConvBN(dim, dim * expansion)
        self.lif2 = LIF(dim * expansion, neuron)
        self.dw_pw = _DepthwisePointwise(dim * expansion, dim, kernel)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        s = self.lif2(self.pw1(self.lif1(x)))
        return _time_unfold(self.bn2(self.dw_pw(_time_fold(s))), x.shape[0])

    def spike_edges(self) -> Edges:
        return [(self.lif1, self.pw1.conv), (self.lif2, self.dw_pw)]


class MetaConvBlock(nn.Module):
    """``x = x + SepConv(x)``, ``x = x + BN(conv3x3(LIF(BN(conv3x3(LIF(x))))))`` (dim -> ratio
    dim -> dim, no biases): ``[T, B, dim, H, W]`` currents."""

    def __init__(self, dim: int, mlp_ratio: int, neuron: NeuronConfig):
        super().__init__()
        self.sep = SepConv(dim, neuron)
        self.lif1, self.conv1 = LIF(dim, neuron), ConvBN(dim, dim * mlp_ratio, 3)
        self.lif2, self.conv2 = LIF(dim * mlp_ratio, neuron), ConvBN(dim * mlp_ratio, dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.sep(x)
        return x + self.conv2(self.lif2(self.conv1(self.lif1(x))))

    def spike_edges(self, sources: list[LIF]) -> tuple[Edges, list[LIF]]:
        return self.sep.spike_edges() + [(self.lif1, self.conv1.conv), (self.lif2, self.conv2.conv)], []


class Downsampling(nn.Module):
    """LIF-conv k x k (stride, bias)-BN: current ``[T, B, in_ch, H, W]`` -> ``[T, B, out_ch, H', W']``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, neuron: NeuronConfig):
        super().__init__()
        self.lif, self.conv = LIF(in_ch, neuron), ConvBN(in_ch, out_ch, kernel, stride, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.lif(x))

    def spike_edges(self, sources: list[LIF]) -> tuple[Edges, list[LIF]]:
        return [(self.lif, self.conv.conv)], []


class RepSelfAttention(nn.Module):
    """Meta-SpikeFormer's attention (without its shortcut): current ``[T, B, C, H, W]`` ->
    ``RepConv(LIF_{V_th/2}(Q (K^T V) * scale))``, ``Q, K, V = LIF(RepConv(LIF(x)))``."""

    def __init__(self, dim: int, heads: int, neuron: NeuronConfig, scale: float = 0.125):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads, self.scale = heads, scale
        self.head_lif = LIF(dim, neuron)
        self.q, self.k, self.v = (RepConv(dim, dim) for _ in range(3))
        self.q_lif, self.k_lif, self.v_lif = (LIF(dim, neuron) for _ in range(3))
        self.kv, self.qkv = SpikeMatmul(dim // heads), SpikeMatmul(dim // heads)
        self.attn_lif = LIF(dim, attention_neuron(neuron))
        self.proj = RepConv(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        s = self.head_lif(x)
        q = split_heads(self.q_lif(self.q(s)), self.heads)
        k = split_heads(self.k_lif(self.k(s)), self.heads)
        v = split_heads(self.v_lif(self.v(s)), self.heads)
        attn = self.qkv(q, self.kv(k.transpose(-2, -1), v)) * self.scale
        return self.proj(self.attn_lif(merge_heads(attn, height, width)))

    def spike_edges(self) -> Edges:
        return [(self.head_lif, c) for c in (self.q, self.k, self.v)] + [
            (self.q_lif, self.qkv), (self.k_lif, self.kv), (self.attn_lif, self.proj)]


class MetaTransformerBlock(nn.Module):
    """``x = x + attn(x)``, ``x = x + MLP(x)`` (``MembraneMLP``): ``[T, B, dim, H, W]`` currents."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, neuron: NeuronConfig):
        super().__init__()
        self.attn = RepSelfAttention(dim, heads, neuron)
        self.mlp = MembraneMLP(dim, dim * mlp_ratio, neuron)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x + self.attn(x))

    def spike_edges(self, sources: list[LIF]) -> tuple[Edges, list[LIF]]:
        return self.attn.spike_edges() + self.mlp.spike_edges(), []


class MetaSpikeFormer(_MembraneHead, SpikingTransformer):
    """Meta-SpikeFormer with stage widths ``dims`` (C0..C3): conv stages, then transformer stages.

    Args:
        dims: the four stage widths (the stem has C0 / 2).
        heads: attention heads of every transformer block.
        depths: transformer blocks in stages 3 and 4 (the papers' 6 and 2).
        cifar: the stem and the first downsampling at stride 1 (ours): 32 px images give 8 x 8
            tokens in stage 3, where the paper's layout gives 2 x 2. With few tokens and few
            steps the attention neurons stay silent at init, the BatchNorms after them see a
            constant input and each multiplies the gradient by 1/sqrt(eps): at the stem it
            reaches 1e30 (2 x 2 tokens, T = 1). Measured at init: 8 x 8 tokens at T = 2 or 4,
            and the paper's 14 x 14 at T = 1, keep every gradient below 1.
        mlp_ratio, T, num_classes, in_chans, neuron: as in ``models.spikformer.Spikformer``.
    """

    def __init__(self, dims: Sequence[int], *, heads: int = 8, depths: Sequence[int] = (6, 2), cifar: bool = False,
                 mlp_ratio: int = 4, T: int = 4, num_classes: int = 1000, in_chans: int = 3,
                 neuron: NeuronConfig | Mapping[str, Any] | None = PAPER_NEURON):
        super().__init__(T, num_classes, neuron)
        cfg = self.neuron
        c0, c1, c2, c3 = dims
        stride = 1 if cifar else 2
        self.stem = ConvBN(in_chans, c0 // 2, 7, stride, bias=True)
        self.stage1 = nn.Sequential(MetaConvBlock(c0 // 2, mlp_ratio, cfg), Downsampling(c0 // 2, c0, 3, stride, cfg),
                                    MetaConvBlock(c0, mlp_ratio, cfg))
        self.stage2 = nn.Sequential(Downsampling(c0, c1, 3, 2, cfg), MetaConvBlock(c1, mlp_ratio, cfg),
                                    MetaConvBlock(c1, mlp_ratio, cfg))
        self.stage3 = nn.Sequential(Downsampling(c1, c2, 3, 2, cfg),
                                    *(MetaTransformerBlock(c2, heads, mlp_ratio, cfg) for _ in range(depths[0])))
        self.stage4 = nn.Sequential(Downsampling(c2, c3, 3, 1, cfg),
                                    *(MetaTransformerBlock(c3, heads, mlp_ratio, cfg) for _ in range(depths[1])))
        self.num_features = c3
        self.head_lif = LIF(c3, cfg)
        self.head = nn.Linear(c3, num_classes)
        self._init_linear()

    def parts(self) -> list[nn.Module]:
        return [*self.stage1, *self.stage2, *self.stage3, *self.stage4]


# --- factories -----------------------------------------------------------------------------------


def _sdt(name: str, pretrained: bool, depth: int, dim: int, cifar: bool, **kwargs: Any) -> SpikeDrivenTransformer:
    model_args = dict(depth=depth, dim=dim, pools=CIFAR_POOLS if cifar else IMAGENET_POOLS, T=4,
                      num_classes=10 if cifar else 1000)
    return create_transformer(SpikeDrivenTransformer, name, pretrained, model_args, kwargs)


@register_model
def spike_driven_8_384(pretrained: bool = False, **kwargs: Any) -> SpikeDrivenTransformer:
    """Spike-driven Transformer-8-384, ImageNet (16,816,024 parameters; the paper prints 16.81 M)."""
    return _sdt("spike_driven_8_384", pretrained, 8, 384, False, **kwargs)


@register_model
def spike_driven_6_512(pretrained: bool = False, **kwargs: Any) -> SpikeDrivenTransformer:
    """Spike-driven Transformer-6-512, ImageNet (23,373,352 parameters; the paper prints 23.37 M)."""
    return _sdt("spike_driven_6_512", pretrained, 6, 512, False, **kwargs)


@register_model
def spike_driven_8_512(pretrained: bool = False, **kwargs: Any) -> SpikeDrivenTransformer:
    """Spike-driven Transformer-8-512, ImageNet (29,689,384 parameters; the paper prints 29.68 M)."""
    return _sdt("spike_driven_8_512", pretrained, 8, 512, False, **kwargs)


@register_model
def spike_driven_10_512(pretrained: bool = False, **kwargs: Any) -> SpikeDrivenTransformer:
    """Spike-driven Transformer-10-512, ImageNet (36,005,416 parameters; the paper prints 36.01 M)."""
    return _sdt("spike_driven_10_512", pretrained, 10, 512, False, **kwargs)


@register_model
def spike_driven_8_768(pretrained: bool = False, **kwargs: Any) -> SpikeDrivenTransformer:
    """Spike-driven Transformer-8-768, ImageNet (66,338,632 parameters; the paper prints 66.34 M)."""
    return _sdt("spike_driven_8_768", pretrained, 8, 768, False, **kwargs)


@register_model
def spike_driven_cifar_2_512(pretrained: bool = False, **kwargs: Any) -> SpikeDrivenTransformer:
    """Spike-driven Transformer-2-512, CIFAR-10 (10,233,418 parameters; the paper's 10.28 M is
    the count with CIFAR-100's 100 classes)."""
    return _sdt("spike_driven_cifar_2_512", pretrained, 2, 512, True, **kwargs)


def _meta(name: str, pretrained: bool, dims: tuple[int, int, int, int], cifar: bool = False,
          **kwargs: Any) -> MetaSpikeFormer:
    model_args = dict(dims=dims, cifar=cifar, T=4, num_classes=10 if cifar else 1000)
    return create_transformer(MetaSpikeFormer, name, pretrained, model_args, kwargs)


@register_model
def meta_spikeformer_8_256(pretrained: bool = False, **kwargs: Any) -> MetaSpikeFormer:
    """Meta-SpikeFormer, widths 64-128-256-360, ImageNet (15,112,208 parameters): the paper's
    15.1 M model, which the released code has no factory for; these widths are ours, the
    C-2C-4C-x widths that give it."""
    return _meta("meta_spikeformer_8_256", pretrained, (64, 128, 256, 360), **kwargs)


@register_model
def meta_spikeformer_8_384(pretrained: bool = False, **kwargs: Any) -> MetaSpikeFormer:
    """Meta-SpikeFormer (the code's ``metaspikformer_8_384``), widths 96-192-384-480, ImageNet
    (31,333,864 parameters; the paper prints 31.3 M)."""
    return _meta("meta_spikeformer_8_384", pretrained, (96, 192, 384, 480), **kwargs)


@register_model
def meta_spikeformer_8_512(pretrained: bool = False, **kwargs: Any) -> MetaSpikeFormer:
    """Meta-SpikeFormer (the code's ``metaspikformer_8_512``), widths 128-256-512-640, ImageNet
    (55,350,248 parameters; the paper prints 55.4 M; its 80.0 % model)."""
    return _meta("meta_spikeformer_8_512", pretrained, (128, 256, 512, 640), **kwargs)


@register_model
def meta_spikeformer_cifar_8_256(pretrained: bool = False, **kwargs: Any) -> MetaSpikeFormer:
    """Meta-SpikeFormer for 32 px images (ours: the paper reports no CIFAR model): the widths
    of ``meta_spikeformer_8_256``, stem and first downsampling at stride 1, 10 classes
    (14,754,818 parameters)."""
    return _meta("meta_spikeformer_cifar_8_256", pretrained, (64, 128, 256, 360), cifar=True, **kwargs)
