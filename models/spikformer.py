"""Spikformer (Zhou et al., "Spikformer: When Spiking Neural Network Meets Transformer", ICLR 2023),
registered with timm, and the parts every spiking transformer here shares (``SpikingTransformer``,
``ConvBN``, the spike products of attention, the papers' neuron).

Layout is ``[T, B, C, H, W]`` everywhere: tokens stay on the ``H x W`` grid, so a linear layer
over tokens is a 1x1 convolution and BatchNorm over the folded ``T*B`` batch has the statistics
of the papers' ``BatchNorm1d`` over ``[T*B, C, N]``. A network is a stem (the first conv-BN,
run once per image for direct encoding and broadcast over ``T``), then parts run in order and
recomputed under activation checkpointing (patch embedding, encoder blocks), then a head.

Spikformer (``ZK-Zhou/spikformer``, ``imagenet/model.py`` and ``cifar10/model.py``):

- SPS (spiking patch splitting): conv3x3-BN-LIF at widths C/8, C/4, C/2, C, with maxpool 3x3/2
  after each on ImageNet (224 px -> 14 x 14 tokens) and after the last two on CIFAR (32 px ->
  8 x 8); then a relative position embedding ``s + LIF(BN(conv3x3(s)))``.
- Encoder block: ``x = x + SSA(x); x = x + MLP(x)`` on spikes (the sums are small integers).
  SSA: ``Q, K, V = LIF(BN(conv1x1(x)))`` (no bias on ImageNet, bias on CIFAR), per head
  ``LIF_{V_th/2}(Q (K^T V) * 0.125)``, then conv1x1-BN-LIF. MLP: conv1x1-BN-LIF twice (ratio 4).
- Head: mean over tokens and time, linear.

Choices, the same in every family here:

- The neurons are the papers' SpikingJelly ``MultiStepLIFNode(tau=2, detach_reset=True)``
  (``h = v + (x - v) / tau``, V_th = 1, hard reset to 0, sigmoid surrogate alpha = 4), written in
  our LIF as ``PAPER_NEURON``: decay 0.5, V_th = 2, sigmoid alpha = 2. With ``v`` scaled by tau
  the two are the same neuron, forward and backward (``v' = 2v``: ``h' = 0.5 v' + x = 2h``, the
  surrogate ``2 s(2 (h' - 2))`` is SpikingJelly's ``4 s(4 (h - 1))`` times ``dh/dh' = 1/2``).
  The attention neurons have half the threshold (the papers' ``v_threshold=0.5``).
- Maxpool acts on the BN output, before the LIF (conv-BN-maxpool-LIF), as in QKFormer; the
  reference Spikformer and Spike-driven Transformer pool the spikes after the LIF. Pooling the
  current keeps every neuron layer feeding a layer directly (so firing counts give SOPs) and
  the parameters are the same.
- ``K^T V`` is computed before ``Q (K^T V)`` (linear in the tokens), as the ImageNet code does;
  the CIFAR code computes ``(Q K^T) V``, the same product in another order.
- The reference models build LayerNorms and DropPath they never call; those are left out (the
  parameter counts are the papers' to their 0.01 M; each test names the source).

Synaptic operations (``models.firing``) of attention: a product of a spike tensor with another
tensor is a layer of synapses whose weights are the other operand. Counting rule: one spike of
the spike operand performs one SOP per element of the other operand it is multiplied with and
summed into (its fan-out in the product), whatever that element's value, as a convolution's
synapses count whatever their weights. So a K spike in ``K^T V`` and a Q spike in
``Q (K^T V)`` each do ``head_dim`` SOPs (``SpikeMatmul``; V is the other operand of the first
product, and ``K^T V`` of the second, so neither is counted again); a spike summed into a count
(Spike-driven Transformer's ``sum_N(K * V)``, QKFormer's ``sum_d Q``) does 1
(``SpikeSum``); a mask (``Q * kv``) multiplies by 0 or 1 and is no SOP, and the layer after a
mask is credited to the masked operand's neurons (an upper bound: the mask only removes
spikes). A residual sum of spikes is the sum of its sources' spikes, so each source is credited
with the layers reading the sum (exact, as SEW's ADD).

Activation checkpointing (``models.checkpointing``): every part is recomputed under ``blocks``
and ``blocks+time``; part inputs are sums of spikes or currents, never stored bit-packed.

    timm.create_model("spikformer_8_768", T=4, num_classes=1000)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from timm.layers import trunc_normal_
from timm.models import register_model
from torch import Tensor, nn

from models.checkpointing import checkpointed
from models.classifier import SpikingClassifier, create_checked, spike_consumer_names
from models.firing import conv_macs
from models.neurons import LIF, NeuronConfig, as_neuron_config
from models.resnet import _time_fold, _time_unfold

__all__ = ["PAPER_NEURON", "attention_neuron", "SpikingTransformerArgumentError", "ConvBN", "SpikeMatmul",
           "SpikeSum", "SpikingTransformer", "SpikingSelfAttention", "SpikformerMLP", "SpikformerBlock", "sps_stem",
           "SPS", "Spikformer", "IMAGENET_POOLS", "CIFAR_POOLS", "split_heads", "merge_heads", "create_transformer"]

#: SpikingJelly's MultiStepLIFNode(tau=2, v_threshold=1, detach_reset=True), sigmoid(alpha=4)
#: surrogate, rescaled to our LIF (see the module docstring).
PAPER_NEURON = NeuronConfig(tau_decay=0.5, v_threshold=2.0, reset="hard", detach_reset=True,
                            surrogate="sigmoid", surrogate_width=2.0)
ATTENTION_THRESHOLD_RATIO = 0.5  # the attention neurons' V_th: 0.5 where the others have 1


class SpikingTransformerArgumentError(TypeError):
    """A model factory got an argument it does not know."""


def attention_neuron(neuron: NeuronConfig) -> NeuronConfig:
    """The neuron of an attention map: ``neuron`` with half its threshold, as in the papers."""
    return replace(neuron, v_threshold=neuron.v_threshold * ATTENTION_THRESHOLD_RATIO)


class ConvBN(nn.Module):
    """conv (k x k, stride, padding k // 2) -> BatchNorm over the folded ``T*B`` batch ->
    optional maxpool 3x3 stride 2: ``[T, B, in_ch, H, W] -> [T, B, out_ch, H', W']`` current."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, *, bias: bool = False,
                 pool: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=bias)
        self.bn = nn.BatchNorm2d(out_ch)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1) if pool else None

    def folded(self, x: Tensor) -> Tensor:
        """The same on folded time: ``[N, in_ch, H, W] -> [N, out_ch, H', W']``."""
        y = self.bn(self.conv(x))
        return y if self.pool is None else self.pool(y)

    def forward(self, x: Tensor) -> Tensor:
        return _time_unfold(self.folded(_time_fold(x)), x.shape[0])


class SpikeMatmul(nn.Module):
    """``a @ b`` where ``a`` holds spikes: each spike of ``a`` meets one row of ``b`` (``fanout``
    elements, the head width), so it does ``fanout`` SOPs (module docstring)."""

    def __init__(self, fanout: int):
        super().__init__()
        self.fanout = fanout

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b

    def synapses_per_neuron(self, neuron_shape: tuple[int, ...]) -> float:
        """SOPs per spike of the ``a`` operand (``models.firing``'s rule for a declared layer)."""
        return float(self.fanout)

    def extra_repr(self) -> str:
        return f"fanout={self.fanout}"


class SpikeSum(nn.Module):
    """``(a * b).sum(dims)`` (``b`` = 1 when omitted) where ``a`` holds spikes: each spike of
    ``a`` adds at most one 1 into the sum, 1 SOP (module docstring)."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, a: Tensor, b: Tensor | None = None) -> Tensor:
        return (a if b is None else a * b).sum(self.dims, keepdim=True)

    def synapses_per_neuron(self, neuron_shape: tuple[int, ...]) -> float:
        """SOPs per spike of ``a``."""
        return 1.0

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[T, B, C, H, W] -> [T, B, heads, N, C / heads]`` (channel ``c = head * d + j``)."""
    steps, batch, channels = x.shape[:3]
    return x.reshape(steps, batch, heads, channels // heads, -1).transpose(-1, -2)


def merge_heads(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of ``split_heads``: ``[T, B, heads, N, d] -> [T, B, heads * d, H, W]``."""
    steps, batch, heads, _, dim = x.shape
    return x.transpose(-1, -2).reshape(steps, batch, heads * dim, height, width)


class SpikingTransformer(SpikingClassifier):
    """Base of the spiking transformers: a stem, ``parts()`` in order, a head.

    A subclass sets ``self.stem`` (the ``ConvBN`` that reads the input, outside every part: a
    part's BatchNorm statistics are restored after its recomputation, and the stem's must not
    be; the first part takes its output), ``self.head`` (linear) and ``self.num_features``, and
    implements ``parts()`` (and ``forward_head``, ``head_edges`` for another head). Each part
    maps ``[T, B, ...] -> [T, B, ...]`` and declares its wiring with ``spike_edges(sources) ->
    (edges, sources)``: ``sources`` are the neuron layers whose spikes add up to the part's
    input (empty where the input is a membrane current), ``edges`` the (neuron layer, layer its
    spikes feed) pairs in the part.
    """

    stem: ConvBN
    head: nn.Linear

    def parts(self) -> list[nn.Module]:
        """Patch embeddings and blocks in forward order (recomputed under checkpointing)."""
        raise NotImplementedError

    def checkpointed_parts(self) -> list[nn.Module]:
        return self.parts()

    def forward_head(self, s: Tensor, per_step: bool = False) -> Tensor:
        """The last part's sums of spikes ``[T, B, C, H, W]`` -> mean over tokens -> linear:
        logits ``[B, classes]`` (mean over T), or per step ``[T, B, classes]`` with ``per_step``."""
        logits = self.head(s.mean(dim=(-2, -1)))
        return logits if per_step else logits.mean(0)

    def head_edges(self, sources: list[LIF]) -> list[tuple[LIF, nn.Module]]:
        """Edges into the head from the last part's output ``sources`` (spikes summed, averaged
        over tokens, into the linear head; global average pooling commutes with it)."""
        return [(source, self.head) for source in sources]

    def encode(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` or sequences ``[T', B, C, H, W]`` -> the stem's current
        ``[T, B, C', H', W']``. An image goes through the stem once, broadcast over ``T`` (BN's
        batch mean and biased variance are those of the repeated image); a sequence at each of
        its ``T'`` steps. While firing is recorded, the input is noted for the first layer's MACs."""
        if x.ndim not in (4, 5):
            raise ValueError(
                f"{type(self).__name__} input must be [B, C, H, W] or [T, B, C, H, W], got shape {tuple(x.shape)}"
            )
        y = self.stem.folded(x if x.ndim == 4 else _time_fold(x))
        self._record_first_layer(self._first_lif, 1 if x.ndim == 4 else x.shape[0], tuple(x.shape[-3:]))
        if x.ndim == 4:
            return y.unsqueeze(0).expand(self.T, *y.shape)
        return _time_unfold(y, x.shape[0])

    @property
    def _first_lif(self) -> LIF:
        return next(m for m in self.modules() if isinstance(m, LIF))

    def forward_features(self, x: Tensor) -> Tensor:
        """Input as in ``encode`` -> the last part's output ``[T, B, num_features, H', W']``."""
        y = self.encode(x)
        for part in self.parts():
            y = checkpointed(self, part, y)  # sums of spikes or currents: never bit-packed
        return y

    def spike_consumers(self) -> dict[str, list[str]]:
        """Neuron layer name -> names of the layers its spikes feed (convolutions, the linear
        head and the attention's spike products; every neuron layer is listed)."""
        edges: list[tuple[LIF, nn.Module]] = []
        sources: list[LIF] = []
        for part in self.parts():
            part_edges, sources = part.spike_edges(sources)
            edges += part_edges
        edges += self.head_edges(sources)
        return spike_consumer_names(self, edges, {name: [] for name, module in self.named_modules()
                                                  if isinstance(module, LIF)})

    def _first_layer_macs(self, shape: tuple[int, ...]) -> int:
        """Dense MACs of the stem convolution on one input of ``shape`` ``(C, H, W)``."""
        return conv_macs(self.stem.conv, shape)

    def _init_linear(self) -> None:
        """The reference codes' init of linear layers: truncated normal (std 0.02), bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)


class SpikingSelfAttention(nn.Module):
    """Spikformer's SSA: ``[T, B, C, H, W]`` (spikes, or sums of them) -> spikes of ``proj_lif``.

    ``Q, K, V = LIF(BN(conv1x1(x)))``; per head ``A = LIF_{V_th/2}(Q (K^T V) * scale)``; out
    ``LIF(BN(conv1x1(A)))``. QKFormer's later blocks are the same.
    """

    def __init__(self, dim: int, heads: int, neuron: NeuronConfig, *, qkv_bias: bool = False, scale: float = 0.125):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads, self.scale = heads, scale
        self.q, self.k, self.v = (ConvBN(dim, dim, bias=qkv_bias) for _ in range(3))
        self.q_lif, self.k_lif, self.v_lif = (LIF(dim, neuron) for _ in range(3))
        self.kv = SpikeMatmul(dim // heads)   # K^T V: a K spike meets a row of V
        self.qkv = SpikeMatmul(dim // heads)  # Q (K^T V): a Q spike meets a row of K^T V
        self.attn_lif = LIF(dim, attention_neuron(neuron))
        self.proj = ConvBN(dim, dim, bias=True)
        self.proj_lif = LIF(dim, neuron)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        q = split_heads(self.q_lif(self.q(x)), self.heads)
        k = split_heads(self.k_lif(self.k(x)), self.heads)
        v = split_heads(self.v_lif(self.v(x)), self.heads)
        attn = self.qkv(q, self.kv(k.transpose(-2, -1), v)) * self.scale
        return self.proj_lif(self.proj(self.attn_lif(merge_heads(attn, height, width))))

    def input_consumers(self) -> list[nn.Module]:
        return [self.q.conv, self.k.conv, self.v.conv]

    def spike_edges(self) -> list[tuple[LIF, nn.Module]]:
        """Edges inside: Q and K into their products (V is the other operand), A into proj."""
        return [(self.q_lif, self.qkv), (self.k_lif, self.kv), (self.attn_lif, self.proj.conv)]


class SpikformerMLP(nn.Module):
    """conv1x1-BN-LIF (dim -> hidden) -> conv1x1-BN-LIF (hidden -> dim), biases on."""

    def __init__(self, dim: int, hidden: int, neuron: NeuronConfig):
        super().__init__()
        self.fc1, self.fc1_lif = ConvBN(dim, hidden, bias=True), LIF(hidden, neuron)
        self.fc2, self.fc2_lif = ConvBN(hidden, dim, bias=True), LIF(dim, neuron)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2_lif(self.fc2(self.fc1_lif(self.fc1(x))))


class SpikformerBlock(nn.Module):
    """``x = x + attn(x); x = x + mlp(x)`` with ``attn`` an ``nn.Module`` from spikes to spikes
    (SSA here, QKFormer's token attention there): ``[T, B, dim, H, W]`` sums of spikes."""

    def __init__(self, attn: nn.Module, dim: int, mlp_ratio: int, neuron: NeuronConfig):
        super().__init__()
        self.attn = attn
        self.mlp = SpikformerMLP(dim, dim * mlp_ratio, neuron)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)

    def spike_edges(self, sources: list[LIF]) -> tuple[list[tuple[LIF, nn.Module]], list[LIF]]:
        edges = [(s, c) for s in sources for c in self.attn.input_consumers()] + self.attn.spike_edges()
        sources = sources + [self.attn.proj_lif]
        edges += [(s, self.mlp.fc1.conv) for s in sources] + [(self.mlp.fc1_lif, self.mlp.fc2.conv)]
        return edges, sources + [self.mlp.fc2_lif]


def sps_stem(in_chans: int, dim: int, pools: Sequence[bool]) -> ConvBN:
    """SPS's first conv3x3-BN(-maxpool), ``in_chans -> dim / 8``: the network's stem."""
    return ConvBN(in_chans, dim // 8, 3, pool=pools[0])


class SPS(nn.Module):
    """Spiking patch splitting after its first conv (``sps_stem``, which the network runs, see
    ``SpikingTransformer.encode``): that conv's current -> ``[T, B, dim, H', W']`` sums of spikes.

    LIF, then conv3x3-BN(-maxpool)-LIF at widths dim/4, dim/2, dim (``pools``: after each of the
    four convolutions, the stem's first); then ``s + LIF(BN(conv3x3(s)))`` (the position embedding).
    """

    def __init__(self, dim: int, pools: Sequence[bool], neuron: NeuronConfig):
        super().__init__()
        widths = [dim // 8, dim // 4, dim // 2, dim]
        self.convs = nn.ModuleList(ConvBN(i, o, 3, pool=p) for i, o, p in zip(widths, widths[1:], pools[1:]))
        self.lifs = nn.ModuleList(LIF(o, neuron) for o in widths)
        self.rpe, self.rpe_lif = ConvBN(dim, dim, 3), LIF(dim, neuron)

    def forward(self, current: Tensor) -> Tensor:
        """The stem's output ``[T, B, dim/8, H', W']`` -> the first block's input."""
        s = self.lifs[0](current)
        for conv, lif in zip(self.convs, self.lifs[1:]):
            s = lif(conv(s))
        return s + self.rpe_lif(self.rpe(s))

    def spike_edges(self, sources: list[LIF]) -> tuple[list[tuple[LIF, nn.Module]], list[LIF]]:
        edges = [(lif, conv.conv) for lif, conv in zip(self.lifs, self.convs)]
        edges.append((self.lifs[-1], self.rpe.conv))
        return edges, [self.lifs[-1], self.rpe_lif]


class Spikformer(SpikingTransformer):
    """Spikformer-``depth``-``dim``: SPS, ``depth`` encoder blocks, mean over tokens, linear head.

    Args:
        depth, dim, heads: encoder blocks, embedding width, attention heads.
        pools: maxpool after each of SPS's four convolutions (4 on ImageNet, the last 2 on CIFAR).
        qkv_bias: bias on the Q, K, V convolutions (the CIFAR code has it, the ImageNet code not).
        mlp_ratio: MLP hidden width / dim.
        T, num_classes, in_chans: time steps for direct encoding, classes, input channels.
        neuron: every LIF's ``NeuronConfig`` (the attention LIF at half its threshold).
    """

    def __init__(self, depth: int, dim: int, heads: int, *, pools: Sequence[bool] = (True,) * 4,
                 qkv_bias: bool = False, mlp_ratio: int = 4, T: int = 4, num_classes: int = 1000, in_chans: int = 3,
                 neuron: NeuronConfig | Mapping[str, Any] | None = PAPER_NEURON):
        super().__init__(T, num_classes, neuron)
        cfg = self.neuron
        self.stem = sps_stem(in_chans, dim, pools)
        self.patch_embed = SPS(dim, pools, cfg)
        self.blocks = nn.Sequential(*(
            SpikformerBlock(SpikingSelfAttention(dim, heads, cfg, qkv_bias=qkv_bias), dim, mlp_ratio, cfg)
            for _ in range(depth)))
        self.num_features = dim
        self.head = nn.Linear(dim, num_classes)
        self._init_linear()

    def parts(self) -> list[nn.Module]:
        return [self.patch_embed, *self.blocks]


def as_model_neuron(neuron: NeuronConfig | Mapping[str, Any] | None) -> NeuronConfig:
    """``neuron`` checked; None is the papers' neuron (``PAPER_NEURON``), not our LIF default."""
    return PAPER_NEURON if neuron is None else as_neuron_config(neuron)


def create_transformer(cls: type[SpikingTransformer], name: str, pretrained: bool, model_args: dict[str, Any],
                       kwargs: dict[str, Any]) -> SpikingTransformer:
    """``cls(**model_args)`` with the caller's T, num_classes, in_chans and neuron over it."""
    if "neuron" in kwargs:
        kwargs = dict(kwargs, neuron=as_model_neuron(kwargs["neuron"]))
    return create_checked(cls, name, pretrained, model_args, kwargs, ("T", "num_classes", "in_chans", "neuron"),
                          SpikingTransformerArgumentError)


IMAGENET_POOLS = (True, True, True, True)  # 224 px -> 14 x 14 tokens
CIFAR_POOLS = (False, False, True, True)   # 32 px -> 8 x 8 tokens


def _spikformer(name: str, pretrained: bool, depth: int, dim: int, heads: int, cifar: bool,
                **kwargs: Any) -> Spikformer:
    model_args = dict(depth=depth, dim=dim, heads=heads, pools=CIFAR_POOLS if cifar else IMAGENET_POOLS,
                      qkv_bias=cifar, T=4, num_classes=10 if cifar else 1000)
    return create_transformer(Spikformer, name, pretrained, model_args, kwargs)


@register_model
def spikformer_8_384(pretrained: bool = False, **kwargs: Any) -> Spikformer:
    """Spikformer-8-384, ImageNet: 8 blocks, dim 384, 12 heads
    (16,816,024 parameters; the paper prints 16.81 M)."""
    return _spikformer("spikformer_8_384", pretrained, 8, 384, 12, False, **kwargs)


@register_model
def spikformer_8_512(pretrained: bool = False, **kwargs: Any) -> Spikformer:
    """Spikformer-8-512, ImageNet: 8 blocks, dim 512, 8 heads
    (29,689,384 parameters; the paper prints 29.68 M)."""
    return _spikformer("spikformer_8_512", pretrained, 8, 512, 8, False, **kwargs)


@register_model
def spikformer_10_512(pretrained: bool = False, **kwargs: Any) -> Spikformer:
    """Spikformer-10-512, ImageNet: 10 blocks, dim 512, 8 heads
    (36,005,416 parameters; the paper prints 36.01 M)."""
    return _spikformer("spikformer_10_512", pretrained, 10, 512, 8, False, **kwargs)


@register_model
def spikformer_8_768(pretrained: bool = False, **kwargs: Any) -> Spikformer:
    """Spikformer-8-768, ImageNet: 8 blocks, dim 768, 12 heads
    (66,338,632 parameters; the paper prints 66.34 M)."""
    return _spikformer("spikformer_8_768", pretrained, 8, 768, 12, False, **kwargs)


@register_model
def spikformer_cifar_4_256(pretrained: bool = False, **kwargs: Any) -> Spikformer:
    """Spikformer-4-256, CIFAR: 4 blocks, dim 256, 8 heads, 10 classes
    (4,155,178 parameters; the paper prints 4.15 M)."""
    return _spikformer("spikformer_cifar_4_256", pretrained, 4, 256, 8, True, **kwargs)


@register_model
def spikformer_cifar_2_384(pretrained: bool = False, **kwargs: Any) -> Spikformer:
    """Spikformer-2-384, CIFAR: 2 blocks, dim 384, 12 heads, 10 classes
    (5,765,050 parameters; the paper prints 5.76 M)."""
    return _spikformer("spikformer_cifar_2_384", pretrained, 2, 384, 12, True, **kwargs)


@register_model
def spikformer_cifar_4_384(pretrained: bool = False, **kwargs: Any) -> Spikformer:
    """Spikformer-4-384, CIFAR: 4 blocks, dim 384, 12 heads, 10 classes
    (9,324,730 parameters; the paper prints 9.32 M)."""
    return _spikformer("spikformer_cifar_4_384", pretrained, 4, 384, 12, True, **kwargs)
