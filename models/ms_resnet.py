"""MS-ResNet (Hu et al., "Advancing Spiking Neural Networks towards Deep Residual Learning",
arXiv 2112.08954): the membrane shortcut, registered with timm beside ``models.resnet``.

Blocks are pre-activation: a block reads a real-valued membrane current ``x``, its residual
branch is LIF-conv3x3-tdBN-LIF-conv3x3-tdBN, and the shortcut adds currents, not spikes:

    out = x + F(x)              (identity shortcut)
    out = D(LIF(x)) + F(x)      (where the block changes shape; D = conv1x1 (stride)-tdBN)

so the stem (conv7x7 stride 2-tdBN-maxpool, no neuron) hands its current to the first block, and
one LIF after the last block turns the final current into spikes for avgpool-FC. The network is
``models.resnet.SpikingResNet`` with these blocks: the same stem convolution, stages, head,
encodings, checkpointing modes and ``compile``. Choices:

- The projection shortcut reads the spikes of the block's first LIF, the ones its first conv
  reads (the reference code applies it to the real-valued current): every convolution after the
  stem then reads spikes, so the firing counts give all the synaptic operations.
- tdBN as in ``models.resnet``: alpha = 1/sqrt(2) on the branch's last tdBN and the projection's
  (two currents are summed there), 1 elsewhere. The branch's last tdBN starts with lambda = 0, as
  in the reference code ("tdBN zero init"): every block starts as the identity on the membrane
  path, whatever the depth.
- The torchvision layout (maxpool in the stem, first stage at stride 1 without a projection):
  the parameter counts equal torchvision's ResNet-18/34 (11.69 M, 21.80 M with 1000 classes).
  The reference code leaves its maxpool unused and gives the first stage stride 2 and a
  projection: 4,224 parameters more, the same 11.69 M and 21.80 M the paper reports.
- Block inputs are currents, not spikes: under ``blocks+time`` they are stored as they are
  (nothing is bit-packed); the LIFs still run in time chunks and the final LIF is recomputed.

    timm.create_model("ms_resnet18", T=6, num_classes=1000)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from timm.models import register_model
from torch import Tensor, nn

from models.checkpointing import checkpointed
from models.classifier import create_checked, spike_consumer_names
from models.neurons import LIF, NeuronConfig
from models.resnet import (RESIDUAL_ALPHA, Downsample, SpikingResNet, SpikingResNetArgumentError, _conv,
                           _time_fold, _time_unfold)
from models.tdbn import TdBN

__all__ = ["MSBasicBlock", "MSResNet"]


class MSBasicBlock(nn.Module):
    """LIF-conv3x3(stride)-tdBN-LIF-conv3x3-tdBN(1/sqrt 2, lambda 0) + membrane shortcut.

    Currents ``[T, B, in_ch, H, W] -> [T, B, ch, H/stride, W/stride]``.
    """

    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int, neuron: NeuronConfig):
        super().__init__()
        v_th = neuron.v_threshold
        self.lif1 = LIF(in_ch, neuron, spatial=True)
        self.conv1 = _conv(in_ch, ch, 3, stride)
        self.bn1 = TdBN(ch, 1.0, v_th)
        self.lif2 = LIF(ch, neuron, spatial=True)
        self.conv2 = _conv(ch, ch, 3)
        self.bn2 = TdBN(ch, RESIDUAL_ALPHA, v_th)
        nn.init.zeros_(self.bn2.weight)  # the block starts as the identity on the membrane path
        self.downsample = Downsample(in_ch, ch, stride, v_th) if stride != 1 or in_ch != ch else None

    def forward(self, x: Tensor) -> Tensor:
        steps = x.shape[0]
        s = _time_fold(self.lif1(x))
        out = self.lif2(_time_unfold(self.bn1(self.conv1(s)), steps))
        out = self.bn2(self.conv2(_time_fold(out)))
        shortcut = _time_fold(x) if self.downsample is None else self.downsample(s)
        return _time_unfold(out + shortcut, steps)

    def spike_edges(self) -> list[tuple[LIF, nn.Module]]:
        """(neuron layer, layer its spikes feed) pairs inside the block."""
        edges = [(self.lif1, self.conv1), (self.lif2, self.conv2)]
        return edges + ([(self.lif1, self.downsample.conv)] if self.downsample is not None else [])


class MSResNet(SpikingResNet):
    """MS-ResNet: ``SpikingResNet`` with membrane-shortcut blocks, no stem neuron, and a LIF
    (``lif_out``) between the last block and the avgpool-FC head.

    Args:
        layers, widths, stem, stem_width, T, num_classes, in_chans, neuron: as in
            ``SpikingResNet`` (basic blocks, avgpool-FC head).
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int],
        *,
        stem: str,
        stem_width: int,
        T: int = 6,
        num_classes: int = 10,
        in_chans: int = 3,
        neuron: NeuronConfig | Mapping[str, Any] | None = None,
    ):
        super().__init__(MSBasicBlock, layers, widths, stem=stem, stem_width=stem_width, T=T,
                         num_classes=num_classes, in_chans=in_chans, neuron=neuron)
        # The stem's current goes on along the membrane path; the first block's LIF reads it.
        del self.lif1
        self.lif_out = LIF(self.num_features, self.neuron, spatial=True)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` or sequences ``[T', B, C, H, W]`` -> spikes of ``lif_out``
        ``[T, B, num_features, H_out, W_out]``."""
        y = self.stem_current(x, recorded_by=self.lif_out)
        for block in self.blocks():
            y = checkpointed(self, block, y)  # the block input is a current: never bit-packed
        return checkpointed(self, self.lif_out, y)

    def spike_consumers(self) -> dict[str, list[str]]:
        """Neuron layer name -> names of the conv/linear layers its spikes feed."""
        edges = [edge for block in self.blocks() for edge in block.spike_edges()]
        edges.append((self.lif_out, self.fc))
        return spike_consumer_names(self, edges)


def _create(name: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any) -> MSResNet:
    return create_checked(MSResNet, name, pretrained, model_args, kwargs,
                          ("T", "num_classes", "in_chans", "neuron"), SpikingResNetArgumentError)


@register_model
def ms_resnet18(pretrained: bool = False, **kwargs: Any) -> MSResNet:
    """MS-ResNet-18, ImageNet stem: 2-2-2-2 basic blocks, widths 64-128-256-512
    (11.69 M parameters with 1000 classes, as torchvision's ResNet-18)."""
    model_args = dict(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem="imagenet", stem_width=64,
                      T=6, num_classes=1000)
    return _create("ms_resnet18", pretrained, model_args, **kwargs)


@register_model
def ms_resnet34(pretrained: bool = False, **kwargs: Any) -> MSResNet:
    """MS-ResNet-34, ImageNet stem: 3-4-6-3 basic blocks, widths 64-128-256-512 (21.80 M)."""
    model_args = dict(layers=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem="imagenet", stem_width=64,
                      T=6, num_classes=1000)
    return _create("ms_resnet34", pretrained, model_args, **kwargs)
