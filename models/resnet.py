"""Spiking ResNets with tdBN (STBP-tdBN, Zheng et al., AAAI 2021), registered with timm.

Layout inside the network is ``[T, B, C, H, W]``; convolutions, tdBN and pooling fold time into
the batch, LIF layers consume the whole sequence. Blocks follow the paper: tdBN with
alpha = 1/sqrt(2) on the last BN of the residual branch and on the downsample shortcut's BN,
and the LIF after the residual add.

Input is either an image batch ``[B, C, H, W]`` (direct encoding: the same image at each of
``model.T`` steps) or a sequence ``[T', B, C, H, W]`` (e.g. DVS frames), which is run for its own
``T'`` steps. Output: logits ``[B, num_classes]`` averaged over time (``forward``), or per step
``[T, B, num_classes]`` (``forward_steps``).

    timm.create_model("spiking_resnet19", T=4, num_classes=10, neuron=dict(reset="soft"))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from timm.models import register_model
from torch import Tensor, nn

from models.checkpointing import checkpointed
from models.classifier import SpikingClassifier, create_checked, spike_consumer_names
from models.firing import conv_macs
from models.neurons import LIF, NeuronConfig
from models.tdbn import TdBN

__all__ = ["BasicBlock", "Bottleneck", "SpikingResNet", "SpikingResNetArgumentError"]

RESIDUAL_ALPHA = 1 / math.sqrt(2)  # two pre-activations of unit scale are summed


class SpikingResNetArgumentError(TypeError):
    """A model factory got an argument it does not know."""


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)


def _time_fold(x: Tensor) -> Tensor:
    return x.flatten(0, 1)


def _time_unfold(x: Tensor, steps: int) -> Tensor:
    return x.unflatten(0, (steps, -1))


class Downsample(nn.Module):
    """Projection shortcut: conv1x1 (stride) + tdBN(alpha = 1/sqrt(2)), on folded time."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, v_threshold: float):
        super().__init__()
        self.conv = _conv(in_ch, out_ch, 1, stride)
        self.bn = TdBN(out_ch, RESIDUAL_ALPHA, v_threshold)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """conv3x3-tdBN-LIF-conv3x3-tdBN(1/sqrt 2) + shortcut, then LIF.

    Spikes ``[T, B, in_ch, H, W] -> [T, B, ch, H/stride, W/stride]``.
    """

    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int, neuron: NeuronConfig):
        super().__init__()
        v_th = neuron.v_threshold
        out_ch = ch * self.expansion
        self.conv1 = _conv(in_ch, ch, 3, stride)
        self.bn1 = TdBN(ch, 1.0, v_th)
        self.lif1 = LIF(ch, neuron, spatial=True)
        self.conv2 = _conv(ch, out_ch, 3)
        self.bn2 = TdBN(out_ch, RESIDUAL_ALPHA, v_th)
        self.downsample = (
            Downsample(in_ch, out_ch, stride, v_th) if stride != 1 or in_ch != out_ch else None
        )
        self.lif2 = LIF(out_ch, neuron, spatial=True)

    def forward(self, x: Tensor) -> Tensor:
        steps, s = x.shape[0], _time_fold(x)
        out = self.lif1(_time_unfold(self.bn1(self.conv1(s)), steps))
        out = self.bn2(self.conv2(_time_fold(out)))
        shortcut = s if self.downsample is None else self.downsample(s)
        return self.lif2(_time_unfold(out + shortcut, steps))

    @property
    def output_lif(self) -> LIF:
        return self.lif2

    def input_consumers(self) -> list[nn.Module]:
        """Layers that the block's input spikes feed (for SOP accounting)."""
        return [self.conv1] + ([self.downsample.conv] if self.downsample is not None else [])

    def spike_edges(self) -> list[tuple[LIF, nn.Module]]:
        """(neuron layer, layer its spikes feed) pairs inside the block."""
        return [(self.lif1, self.conv2)]


class Bottleneck(nn.Module):
    """conv1x1-tdBN-LIF-conv3x3(stride)-tdBN-LIF-conv1x1-tdBN(1/sqrt 2) + shortcut, then LIF.

    Spikes ``[T, B, in_ch, H, W] -> [T, B, 4*ch, H/stride, W/stride]``.
    """

    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int, neuron: NeuronConfig):
        super().__init__()
        v_th = neuron.v_threshold
        out_ch = ch * self.expansion
        self.conv1 = _conv(in_ch, ch, 1)
        self.bn1 = TdBN(ch, 1.0, v_th)
        self.lif1 = LIF(ch, neuron, spatial=True)
        self.conv2 = _conv(ch, ch, 3, stride)
        self.bn2 = TdBN(ch, 1.0, v_th)
        self.lif2 = LIF(ch, neuron, spatial=True)
        self.conv3 = _conv(ch, out_ch, 1)
        self.bn3 = TdBN(out_ch, RESIDUAL_ALPHA, v_th)
        self.downsample = (
            Downsample(in_ch, out_ch, stride, v_th) if stride != 1 or in_ch != out_ch else None
        )
        self.lif3 = LIF(out_ch, neuron, spatial=True)

    def forward(self, x: Tensor) -> Tensor:
        steps, s = x.shape[0], _time_fold(x)
        out = self.lif1(_time_unfold(self.bn1(self.conv1(s)), steps))
        out = self.lif2(_time_unfold(self.bn2(self.conv2(_time_fold(out))), steps))
        out = self.bn3(self.conv3(_time_fold(out)))
        shortcut = s if self.downsample is None else self.downsample(s)
        return self.lif3(_time_unfold(out + shortcut, steps))

    @property
    def output_lif(self) -> LIF:
        return self.lif3

    def input_consumers(self) -> list[nn.Module]:
        """Layers that the block's input spikes feed (for SOP accounting)."""
        return [self.conv1] + ([self.downsample.conv] if self.downsample is not None else [])

    def spike_edges(self) -> list[tuple[LIF, nn.Module]]:
        """(neuron layer, layer its spikes feed) pairs inside the block."""
        return [(self.lif1, self.conv2), (self.lif2, self.conv3)]


class SpikingResNet(SpikingClassifier):
    """Spiking ResNet with tdBN; built by the factories at the bottom of this module.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage.
        widths: base channels per stage (times ``block.expansion`` at the stage output); the
            first stage keeps the resolution, the others halve it.
        stem: ``"cifar"`` (conv3x3 stride 1) or ``"imagenet"`` (conv7x7 stride 2 + maxpool 3x3
            stride 2, pooled before the stem LIF so every neuron layer feeds a conv directly).
        stem_width: stem output channels.
        head_hidden: 0 for avgpool-FC, else avgpool-FC(head_hidden)-LIF-FC (ResNet-19).
        T: time steps for direct encoding.
        num_classes, in_chans: classifier outputs and input channels.
        neuron: ``NeuronConfig``, a mapping of its fields, or None (defaults) for every LIF.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        widths: Sequence[int],
        *,
        stem: str,
        stem_width: int,
        head_hidden: int = 0,
        T: int = 4,
        num_classes: int = 10,
        in_chans: int = 3,
        neuron: NeuronConfig | Mapping[str, Any] | None = None,
    ):
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        super().__init__(T, num_classes, neuron)
        cfg = self.neuron

        if stem == "cifar":
            self.conv1 = _conv(in_chans, stem_width, 3)
            self.maxpool = None
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = TdBN(stem_width, 1.0, cfg.v_threshold)
        self.lif1 = LIF(stem_width, cfg, spatial=True)

        in_ch = stem_width
        stages = []
        for i, (depth, width) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_ch, width, stride, cfg))
                in_ch = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = len(stages)
        for i, stage in enumerate(stages):
            self.add_module(f"layer{i + 1}", stage)
        self.num_features = in_ch

        if head_hidden:
            self.fc1 = nn.Linear(in_ch, head_hidden)
            self.lif_fc1 = LIF(head_hidden, cfg)
            in_ch = head_hidden
        else:
            self.fc1 = None
            self.lif_fc1 = None
        self.fc = nn.Linear(in_ch, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def blocks(self) -> list[nn.Module]:
        """Residual blocks in order."""
        return [b for i in range(self.stages) for b in getattr(self, f"layer{i + 1}")]

    def checkpointed_parts(self) -> list[nn.Module]:
        """The residual blocks: recomputed in backward under activation checkpointing."""
        return self.blocks()

    def stem_current(self, x: Tensor, recorded_by: LIF) -> Tensor:
        """Images ``[B, C, H, W]`` or sequences ``[T', B, C, H, W]`` -> the stem's output current
        ``[T, B, stem_width, H', W']`` (conv1-bn1, then maxpool for the ImageNet stem).

        Direct encoding: the stem sees the same image at every step, so it runs once and its
        output is broadcast over ``T`` (tdBN's mean and biased variance are unchanged); a sequence
        goes through it at each of its own ``T'`` steps. While ``recorded_by`` records firing,
        the input is noted for ``first_layer_macs_per_image``."""
        if x.ndim not in (4, 5):
            raise ValueError(
                f"{type(self).__name__} input must be [B, C, H, W] or [T, B, C, H, W], got shape {tuple(x.shape)}"
            )
        y = self.bn1(self.conv1(x if x.ndim == 4 else _time_fold(x)))
        if self.maxpool is not None:
            y = self.maxpool(y)
        self._record_first_layer(recorded_by, 1 if x.ndim == 4 else x.shape[0], tuple(x.shape[-3:]))
        if x.ndim == 4:
            return y.unsqueeze(0).expand(self.T, *y.shape)
        return _time_unfold(y, x.shape[0])

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` or sequences ``[T', B, C, H, W]`` -> spikes of the last stage
        ``[T, B, num_features, H_out, W_out]``."""
        s = checkpointed(self, self.lif1, self.stem_current(x, recorded_by=self.lif1))
        for block in self.blocks():
            # The block input is the previous LIF's spikes.
            s = checkpointed(self, block, s, spikes=True)
        return s

    def forward_head(self, s: Tensor, per_step: bool = False) -> Tensor:
        """Spikes ``[T, B, C, H, W]`` -> logits ``[B, num_classes]`` averaged over T, or the
        per-step logits ``[T, B, num_classes]`` with ``per_step``."""
        y = s.mean(dim=(-2, -1))
        if self.fc1 is not None:
            y = self.lif_fc1(self.fc1(y))
        logits = self.fc(y)
        return logits if per_step else logits.mean(0)

    def spike_consumers(self) -> dict[str, list[str]]:
        """Neuron layer name -> names of the conv/linear layers its spikes feed."""
        edges: list[tuple[LIF, nn.Module]] = []
        source = self.lif1
        for block in self.blocks():
            edges += [(source, consumer) for consumer in block.input_consumers()]
            edges += block.spike_edges()
            source = block.output_lif
        if self.fc1 is not None:
            edges += [(source, self.fc1), (self.lif_fc1, self.fc)]
        else:
            edges.append((source, self.fc))
        return spike_consumer_names(self, edges)

    def _first_layer_macs(self, shape: tuple[int, ...]) -> int:
        """Dense MACs of the stem convolution on one image of ``shape`` ``(C, H, W)``."""
        return conv_macs(self.conv1, shape)


def _create(name: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any) -> SpikingResNet:
    return create_checked(SpikingResNet, name, pretrained, model_args, kwargs,
                          ("T", "num_classes", "in_chans", "neuron"), SpikingResNetArgumentError)


@register_model
def spiking_resnet19(pretrained: bool = False, **kwargs: Any) -> SpikingResNet:
    """ResNet-19 for CIFAR (STBP-tdBN): stem conv3x3-128, 3x128, 3x256, 2x512 basic blocks,
    avgpool, FC-256 + LIF, FC-classes (12.70 M parameters with 10 classes)."""
    model_args = dict(block=BasicBlock, layers=(3, 3, 2), widths=(128, 256, 512), stem="cifar", stem_width=128,
                      head_hidden=256, T=4, num_classes=10)
    return _create("spiking_resnet19", pretrained, model_args, **kwargs)


@register_model
def spiking_resnet18(pretrained: bool = False, **kwargs: Any) -> SpikingResNet:
    """ResNet-18, ImageNet stem: 2-2-2-2 basic blocks, widths 64-128-256-512."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem="imagenet",
                      stem_width=64, T=6, num_classes=1000)
    return _create("spiking_resnet18", pretrained, model_args, **kwargs)


@register_model
def spiking_resnet34(pretrained: bool = False, **kwargs: Any) -> SpikingResNet:
    """ResNet-34, ImageNet stem: 3-4-6-3 basic blocks, widths 64-128-256-512 (STBP-tdBN)."""
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem="imagenet",
                      stem_width=64, T=6, num_classes=1000)
    return _create("spiking_resnet34", pretrained, model_args, **kwargs)


@register_model
def spiking_wide_resnet34(pretrained: bool = False, **kwargs: Any) -> SpikingResNet:
    """Wide ResNet-34: ResNet-34 with every width doubled (stem 128, stages 128-256-512-1024)."""
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3), widths=(128, 256, 512, 1024), stem="imagenet",
                      stem_width=128, T=6, num_classes=1000)
    return _create("spiking_wide_resnet34", pretrained, model_args, **kwargs)


@register_model
def spiking_resnet50(pretrained: bool = False, **kwargs: Any) -> SpikingResNet:
    """ResNet-50, ImageNet stem: 3-4-6-3 bottleneck blocks (expansion 4), widths 64-128-256-512."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem="imagenet",
                      stem_width=64, T=6, num_classes=1000)
    return _create("spiking_resnet50", pretrained, model_args, **kwargs)


@register_model
def spiking_resnet_tiny(pretrained: bool = False, **kwargs: Any) -> SpikingResNet:
    """Demo net for 8x8 digits: stem conv3x3-32, one basic block at 32 and one at 64 (stride 2),
    avgpool, FC (about 77 k parameters)."""
    model_args = dict(block=BasicBlock, layers=(1, 1), widths=(32, 64), stem="cifar", stem_width=32,
                      T=4, num_classes=10, in_chans=1)
    return _create("spiking_resnet_tiny", pretrained, model_args, **kwargs)
