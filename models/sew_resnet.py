"""SEW-ResNet (Fang et al., "Deep Residual Learning in Spiking Neural Networks", NeurIPS 2021),
registered with timm beside the tdBN ResNets of ``models.resnet``.

A spike-element-wise block ends its residual branch in a neuron and joins the branch's spikes
``a`` to the shortcut's spikes ``s`` with a connect function ``g`` (``connect``):

    ADD   g(a, s) = a + s          (the paper's default: identity when the branch is silent)
    IAND  g(a, s) = (1 - a) * s    (identity when silent too, and the output stays 0/1)
    AND   g(a, s) = a * s

``s`` is the block input, or conv1x1-tdBN-LIF of it where the block changes shape (the shortcut
stays spiking). The network is ``models.resnet.SpikingResNet`` with these blocks: the same
stems, stages, head, encodings, checkpointing modes and ``compile``. Choices:

- tdBN with alpha = 1 everywhere: nothing is summed in front of a neuron (the connect acts on
  spikes), so tdBN's 1/sqrt(2) rule applies nowhere; lambda, beta start at 1, 0.
- The ImageNet stem is conv7x7(stride 2)-tdBN-maxpool-LIF, the order of ``models.resnet``;
  SpikingJelly's pools the stem's spikes (conv-BN-LIF-maxpool). Pooling the current instead
  keeps every neuron layer feeding a conv directly (so firing counts give SOPs) and, for direct
  encoding, pools once instead of T times. The parameters are the same.
- Parameter counts equal torchvision's ResNet-18/34/50 (tdBN's lambda and beta per channel are
  BatchNorm's affine parameters; the neurons have none by default).
- ADD outputs small integers (the spikes of several layers added up), so under ``blocks+time``
  only the stem's spikes are kept bit-packed among the block inputs; with IAND and AND every
  block input is 0/1 and all are packed.
- SOP accounting (``spike_consumers``): a block input is the connect output, which no neuron
  layer emits. For ADD it is the sum of the spikes of the layers that reach it along the
  shortcut (the branch neurons of the blocks before it in the stage, and the stage's first
  shortcut neuron), so crediting each of them with the convolutions it reaches is exact. For
  IAND (out <= s) and AND (out <= a) the convolutions reading the output are credited to the
  shortcut's or the branch's neurons: an upper bound on the SOPs.

    timm.create_model("sew_resnet34", T=4, num_classes=1000, connect="ADD")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from timm.models import register_model
from torch import Tensor, nn

from models.checkpointing import checkpointed
from models.classifier import create_checked, spike_consumer_names
from models.neurons import LIF, NeuronConfig
from models.resnet import SpikingResNet, SpikingResNetArgumentError, _conv, _time_fold, _time_unfold
from models.tdbn import TdBN

__all__ = ["CONNECTS", "sew_connect", "SEWDownsample", "SEWBasicBlock", "SEWBottleneck", "SEWResNet"]

CONNECTS = ("ADD", "IAND", "AND")


def _check_connect(connect: str) -> str:
    if connect not in CONNECTS:
        raise ValueError(f"connect must be one of {', '.join(CONNECTS)}; got {connect!r}")
    return connect


def sew_connect(a: Tensor, s: Tensor, connect: str) -> Tensor:
    """``g(a, s)`` for branch spikes ``a`` and shortcut spikes ``s`` (same shape ``[T, B, C, H, W]``)."""
    if connect == "ADD":
        return a + s
    if connect == "IAND":
        return (1 - a) * s
    return a * s


class SEWDownsample(nn.Module):
    """Spiking projection shortcut: conv1x1 (stride)-tdBN-LIF, spikes in, spikes out."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, neuron: NeuronConfig):
        super().__init__()
        self.conv = _conv(in_ch, out_ch, 1, stride)
        self.bn = TdBN(out_ch, 1.0, neuron.v_threshold)
        self.lif = LIF(out_ch, neuron, spatial=True)

    def forward(self, s: Tensor, steps: int) -> Tensor:
        """Folded spikes ``[T*B, in_ch, H, W]`` -> spikes ``[T, B, out_ch, H/stride, W/stride]``."""
        return self.lif(_time_unfold(self.bn(self.conv(s)), steps))


class SEWBasicBlock(nn.Module):
    """conv3x3-tdBN-LIF-conv3x3-tdBN-LIF, joined to the shortcut by ``connect``.

    ``[T, B, in_ch, H, W] -> [T, B, ch, H/stride, W/stride]``: 0/1 for IAND and AND; for ADD,
    the spikes of the branch plus the input (or the projection shortcut's spikes).
    """

    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int, neuron: NeuronConfig, connect: str = "ADD"):
        super().__init__()
        self.connect = _check_connect(connect)
        v_th = neuron.v_threshold
        self.conv1 = _conv(in_ch, ch, 3, stride)
        self.bn1 = TdBN(ch, 1.0, v_th)
        self.lif1 = LIF(ch, neuron, spatial=True)
        self.conv2 = _conv(ch, ch, 3)
        self.bn2 = TdBN(ch, 1.0, v_th)
        self.lif2 = LIF(ch, neuron, spatial=True)
        self.downsample = SEWDownsample(in_ch, ch, stride, neuron) if stride != 1 or in_ch != ch else None

    def forward(self, x: Tensor) -> Tensor:
        steps, s = x.shape[0], _time_fold(x)
        out = self.lif1(_time_unfold(self.bn1(self.conv1(s)), steps))
        out = self.lif2(_time_unfold(self.bn2(self.conv2(_time_fold(out))), steps))
        shortcut = x if self.downsample is None else self.downsample(s, steps)
        return sew_connect(out, shortcut, self.connect)

    @property
    def output_lif(self) -> LIF:
        """The neuron layer at the end of the residual branch (``a`` of the connect)."""
        return self.lif2

    def input_consumers(self) -> list[nn.Module]:
        """Layers that the block's input feeds (for SOP accounting)."""
        return [self.conv1] + ([self.downsample.conv] if self.downsample is not None else [])

    def spike_edges(self) -> list[tuple[LIF, nn.Module]]:
        """(neuron layer, layer its spikes feed) pairs inside the block."""
        return [(self.lif1, self.conv2)]

    def extra_repr(self) -> str:
        return f"connect={self.connect}"


class SEWBottleneck(nn.Module):
    """conv1x1-tdBN-LIF-conv3x3(stride)-tdBN-LIF-conv1x1-tdBN-LIF, joined to the shortcut by
    ``connect``: ``[T, B, in_ch, H, W] -> [T, B, 4*ch, H/stride, W/stride]``."""

    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int, neuron: NeuronConfig, connect: str = "ADD"):
        super().__init__()
        self.connect = _check_connect(connect)
        v_th = neuron.v_threshold
        out_ch = ch * self.expansion
        self.conv1 = _conv(in_ch, ch, 1)
        self.bn1 = TdBN(ch, 1.0, v_th)
        self.lif1 = LIF(ch, neuron, spatial=True)
        self.conv2 = _conv(ch, ch, 3, stride)
        self.bn2 = TdBN(ch, 1.0, v_th)
        self.lif2 = LIF(ch, neuron, spatial=True)
        self.conv3 = _conv(ch, out_ch, 1)
        self.bn3 = TdBN(out_ch, 1.0, v_th)
        self.lif3 = LIF(out_ch, neuron, spatial=True)
        self.downsample = (
            SEWDownsample(in_ch, out_ch, stride, neuron) if stride != 1 or in_ch != out_ch else None
        )

    def forward(self, x: Tensor) -> Tensor:
        steps, s = x.shape[0], _time_fold(x)
        out = self.lif1(_time_unfold(self.bn1(self.conv1(s)), steps))
        out = self.lif2(_time_unfold(self.bn2(self.conv2(_time_fold(out))), steps))
        out = self.lif3(_time_unfold(self.bn3(self.conv3(_time_fold(out))), steps))
        shortcut = x if self.downsample is None else self.downsample(s, steps)
        return sew_connect(out, shortcut, self.connect)

    @property
    def output_lif(self) -> LIF:
        """The neuron layer at the end of the residual branch (``a`` of the connect)."""
        return self.lif3

    def input_consumers(self) -> list[nn.Module]:
        """Layers that the block's input feeds (for SOP accounting)."""
        return [self.conv1] + ([self.downsample.conv] if self.downsample is not None else [])

    def spike_edges(self) -> list[tuple[LIF, nn.Module]]:
        """(neuron layer, layer its spikes feed) pairs inside the block."""
        return [(self.lif1, self.conv2), (self.lif2, self.conv3)]

    def extra_repr(self) -> str:
        return f"connect={self.connect}"


class SEWResNet(SpikingResNet):
    """SEW-ResNet: ``SpikingResNet`` with spike-element-wise blocks joined by ``connect``.

    Args:
        block: ``SEWBasicBlock`` or ``SEWBottleneck``.
        layers, widths, stem, stem_width, T, num_classes, in_chans, neuron: as in
            ``SpikingResNet`` (avgpool-FC head).
        connect: ``"ADD"``, ``"IAND"`` or ``"AND"``, for every block.
    """

    def __init__(
        self,
        block: type[SEWBasicBlock] | type[SEWBottleneck],
        layers: Sequence[int],
        widths: Sequence[int],
        *,
        connect: str = "ADD",
        stem: str,
        stem_width: int,
        T: int = 4,
        num_classes: int = 10,
        in_chans: int = 3,
        neuron: NeuronConfig | Mapping[str, Any] | None = None,
    ):
        _check_connect(connect)
        make_block = partial(block, connect=connect)
        make_block.expansion = block.expansion  # SpikingResNet reads the stage widths off it
        super().__init__(make_block, layers, widths, stem=stem, stem_width=stem_width, T=T,
                         num_classes=num_classes, in_chans=in_chans, neuron=neuron)
        self.connect = connect

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` or sequences ``[T', B, C, H, W]`` -> the last block's output
        ``[T, B, num_features, H_out, W_out]`` (0/1, or small integers for ADD)."""
        s = checkpointed(self, self.lif1, self.stem_current(x, recorded_by=self.lif1))
        for i, block in enumerate(self.blocks()):
            # Only 0/1 inputs may be stored at 1 bit: after an ADD block they are sums.
            s = checkpointed(self, block, s, spikes=i == 0 or self.connect != "ADD")
        return s

    def spike_consumers(self) -> dict[str, list[str]]:
        """Neuron layer name -> names of the conv/linear layers whose SOPs its spikes are credited
        with (exact for ADD, an upper bound for IAND/AND; see the module docstring)."""
        edges: list[tuple[LIF, nn.Module]] = []
        # Neuron layers whose spikes add up to (ADD) or bound (IAND, AND) the current block input.
        sources = [self.lif1]
        for block in self.blocks():
            edges += [(source, consumer) for source in sources for consumer in block.input_consumers()]
            edges += block.spike_edges()
            shortcut = sources if block.downsample is None else [block.downsample.lif]
            branch = [block.output_lif]
            sources = {"ADD": branch + shortcut, "IAND": shortcut, "AND": branch}[self.connect]
        edges += [(source, self.fc) for source in sources]
        # Every neuron layer is listed, also one credited with nothing (IAND, AND).
        return spike_consumer_names(self, edges, {name: [] for name, module in self.named_modules()
                                                  if isinstance(module, LIF)})


def _create(name: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any) -> SEWResNet:
    return create_checked(SEWResNet, name, pretrained, model_args, kwargs,
                          ("T", "num_classes", "in_chans", "neuron", "connect"), SpikingResNetArgumentError)


@register_model
def sew_resnet18(pretrained: bool = False, **kwargs: Any) -> SEWResNet:
    """SEW-ResNet-18, ImageNet stem: 2-2-2-2 basic blocks, widths 64-128-256-512
    (11.69 M parameters with 1000 classes, as torchvision's ResNet-18)."""
    model_args = dict(block=SEWBasicBlock, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem="imagenet",
                      stem_width=64, connect="ADD", T=4, num_classes=1000)
    return _create("sew_resnet18", pretrained, model_args, **kwargs)


@register_model
def sew_resnet34(pretrained: bool = False, **kwargs: Any) -> SEWResNet:
    """SEW-ResNet-34, ImageNet stem: 3-4-6-3 basic blocks, widths 64-128-256-512 (21.80 M)."""
    model_args = dict(block=SEWBasicBlock, layers=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem="imagenet",
                      stem_width=64, connect="ADD", T=4, num_classes=1000)
    return _create("sew_resnet34", pretrained, model_args, **kwargs)


@register_model
def sew_resnet50(pretrained: bool = False, **kwargs: Any) -> SEWResNet:
    """SEW-ResNet-50, ImageNet stem: 3-4-6-3 bottleneck blocks (expansion 4), widths
    64-128-256-512 (25.56 M)."""
    model_args = dict(block=SEWBottleneck, layers=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem="imagenet",
                      stem_width=64, connect="ADD", T=4, num_classes=1000)
    return _create("sew_resnet50", pretrained, model_args, **kwargs)
