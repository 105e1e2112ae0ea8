"""Firing statistics: per-layer firing rate, sparsity, synaptic operations and energy.

Recording is off by default. The counts live in the network's ``NeuronContext``
(``models.neuron_context``), the one object its LIF layers report to: when off, a layer's
forward checks two plain attributes and does nothing else; when on, it adds two numbers per call
to a float64 tensor on the spikes' device (no host synchronisation): the spikes it emitted and
its neuron-timestep slots (T*B*C*H*W). A part recomputed in backward (activation checkpointing)
records nothing.

Typical use (the trainer, at eval)::

    set_firing_recording(model, True); reset_firing_counts(model)
    ... forward passes over `images` images ...
    counts = firing_counts(model)          # all-reduce (sum) these across ranks if distributed
    report = firing_report(counts, model, images)   # images: the global count
    set_firing_recording(model, False)

Energy (45 nm CMOS, Horowitz 2014, as in the SNN literature)::

    E_image [pJ] = 4.6 * MACs_first + 0.9 * SOPs_image
    SOPs_image   = sum over neuron layers l of spikes_l * (fanout_l + recurrent_l) / images

MACs_first is the dense multiply-accumulate count of the first layer (the stem convolution, or
the first linear layer of an MLP: the only one whose input is not spikes) per image:
C_out * H_out * W_out * C_in/groups * k_h * k_w for a convolution, in * out for a linear layer;
once per image for direct encoding (the first layer sees the static input once) and T times for
sequence (DVS) inputs. ``fanout_l`` is the mean number of synapses per neuron of layer l into
the layer(s) its spikes feed: ``out_features`` for a linear layer (also after global average
pooling, which commutes with it), and for a convolution ``C_out/groups * taps_h * taps_w /
(H * W)``, where taps count the (output position, kernel offset) pairs that land inside the
input (padding taps are not synapses). Identity shortcuts and pooling add no SOPs.
``recurrent_l`` counts the synapses of the layer's own recurrence, which carry each spike into
the next step: 0 without recurrence, 1 for ``self`` (the neuron's own weight), C for ``lateral``
(the ``[C, C]`` map; in a conv layer it is a 1x1 convolution over channels, so also C per spike)
and for ``full`` on a vector layer (the dense ``[C, C]`` matrix), and for ``full`` on feature
maps the fan-out of its k x k convolution C -> C by the rule above, ``C * taps_h * taps_w /
(H * W)`` (padding taps are not synapses). Every spike counts, the last step's too (its
recurrent input feeds the step after, in a stream).

Networks declare their wiring through the ``SpikingNetwork`` protocol (``models.resnet`` and
``models.mlp`` implement it; the spiking transformers also name the spike products of their
attention, whose counting rule is in ``models.spikformer``); the recurrent synapses are read off the LIF layers themselves, and
each layer's per-sample shape off the context that recorded it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor, nn

from models.neurons import LIF, Recurrence, neuron_context

__all__ = [
    "E_MAC_PJ",
    "E_SOP_PJ",
    "SpikingNetwork",
    "neuron_layers",
    "capture_spike_totals",
    "mean_firing_rate",
    "set_firing_recording",
    "reset_firing_counts",
    "firing_counts",
    "firing_report",
    "synapses_per_neuron",
    "recurrent_synapses_per_neuron",
    "conv_macs",
]

E_MAC_PJ = 4.6  # pJ per 32-bit multiply-accumulate, 45 nm
E_SOP_PJ = 0.9  # pJ per 32-bit accumulate (one synaptic operation), 45 nm


class SpikingNetwork(Protocol):
    """What ``firing_report`` needs from a network besides its LIF layers."""

    def spike_consumers(self) -> dict[str, list[str]]:
        """LIF module name -> names of the conv/linear modules its spikes feed (names relative
        to the network)."""
        ...

    def first_layer_macs_per_image(self) -> float:
        """Dense MACs of the first layer per image, for the input of the last recorded forward."""
        ...


@contextmanager
def capture_spike_totals(model: nn.Module) -> Iterator[list[tuple[Tensor, int]]]:
    """Inside the block, every LIF call of ``model`` appends ``(spike sum, neuron-timestep slots)``
    to the yielded list, the sum keeping its gradient (surrogate): what a firing-rate penalty
    needs. Recomputations in backward (activation checkpointing) add nothing."""
    context = neuron_context(model)
    context.totals = totals = []
    try:
        yield totals
    finally:
        context.totals = None


def mean_firing_rate(totals: list[tuple[Tensor, int]]) -> Tensor:
    """All spikes over all neuron-timestep slots of ``capture_spike_totals``' list (differentiable)."""
    if not totals:
        raise ValueError("mean_firing_rate: no neuron layer ran inside capture_spike_totals")
    return torch.stack([s for s, _ in totals]).sum() / sum(n for _, n in totals)


def set_firing_recording(model: nn.Module, on: bool) -> None:
    """Switch firing-count recording on or off for every LIF layer in ``model``."""
    neuron_context(model).counting = on


def reset_firing_counts(model: nn.Module) -> None:
    """Zero the accumulated counts of every LIF layer in ``model``."""
    context = neuron_context(model)
    context.counts.clear()
    context.shapes.clear()


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def firing_counts(model: nn.Module) -> dict[str, Tensor]:
    """Counts accumulated since the last reset, per LIF layer.

    Returns:
        ``{qualified module name: float64 tensor [spikes, neuron slots]}`` on the model's device;
        copies, so reducing them in place across ranks leaves the accumulators alone.
    """
    device = _model_device(model)
    recorded = neuron_context(model).counts
    counts = {}
    for name, module in neuron_layers(model):
        count = recorded.get(module)
        counts[name] = (torch.zeros(2, dtype=torch.float64, device=device) if count is None
                        else count.detach().clone().to(device))
    return counts


def neuron_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The spiking layers of ``model`` by qualified name: its LIF layers, and the neuron modules
    a brought network declares (``neuron_layers()``, ``models.foreign``)."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, LIF):
            layers.append((name, module))
        elif hasattr(type(module), "neuron_layers"):
            layers += [(f"{name}.{inner}" if name else inner, m) for inner, m in module.neuron_layers()]
    return layers


def _valid_taps(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """(output position, kernel offset) pairs that read inside an input of length ``size``."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return sum(
        1
        for o in range(out)
        for j in range(kernel)
        if 0 <= o * stride - padding + j * dilation < size
    )


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        # Symmetric part of PyTorch's 'same' padding; the odd extra goes to the far side.
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return conv.padding


def synapses_per_neuron(consumer: nn.Module, neuron_shape: tuple[int, ...]) -> float:
    """Mean fan-out of a presynaptic neuron into ``consumer`` (definition in the module doc).

    Args:
        consumer: the ``nn.Conv2d`` or ``nn.Linear`` its spikes feed, or a module that states
            its own fan-out with a ``synapses_per_neuron(neuron_shape)`` method (the spike
            products of attention, folded convolutions: ``models.spikformer``).
        neuron_shape: per-sample shape of the presynaptic layer, ``[C, H, W]`` or ``[C]``.
    """
    if hasattr(type(consumer), "synapses_per_neuron"):
        return float(consumer.synapses_per_neuron(neuron_shape))
    if isinstance(consumer, nn.Linear):
        return float(consumer.out_features)
    if isinstance(consumer, nn.Conv2d):
        _, height, width = neuron_shape
        pad_h, pad_w = _conv_padding(consumer)
        (k_h, k_w), (s_h, s_w), (d_h, d_w) = consumer.kernel_size, consumer.stride, consumer.dilation
        taps = _valid_taps(height, k_h, s_h, pad_h, d_h) * _valid_taps(width, k_w, s_w, pad_w, d_w)
        return consumer.out_channels / consumer.groups * taps / (height * width)
    raise TypeError(f"no fan-out rule for {type(consumer).__name__}; expected Conv2d or Linear")


def recurrent_synapses_per_neuron(lif: LIF, neuron_shape: tuple[int, ...]) -> float:
    """Mean number of synapses from one neuron of ``lif`` back into its own layer: 0 without
    recurrence, 1 for self, C (``num_features``) for lateral and for full on vectors, and for
    full on feature maps the mean fan-out of its k x k convolution (taps inside the map only).

    Args:
        neuron_shape: per-sample shape of the layer, ``[C, H, W]`` or ``[C]``.
    """
    recurrence = lif.spec.recurrence
    if recurrence is Recurrence.none:
        return 0
    if recurrence is Recurrence.self:
        return 1
    weight = lif.recurrent_weight
    if weight.ndim == 2:  # lateral, or full on vectors: the [C, C] matrix
        return lif.num_features
    channels, height, width = neuron_shape
    k = weight.shape[-1]
    taps = _valid_taps(height, k, 1, k // 2, 1) * _valid_taps(width, k, 1, k // 2, 1)
    return channels * taps / (height * width)


def conv_macs(conv: nn.Conv2d, in_shape: tuple[int, int, int]) -> int:
    """Dense multiply-accumulates of one ``conv`` call on one sample of shape ``[C, H, W]``."""
    _, height, width = in_shape
    pad_h, pad_w = _conv_padding(conv)
    (k_h, k_w), (s_h, s_w), (d_h, d_w) = conv.kernel_size, conv.stride, conv.dilation
    out_h = (height + 2 * pad_h - d_h * (k_h - 1) - 1) // s_h + 1
    out_w = (width + 2 * pad_w - d_w * (k_w - 1) - 1) // s_w + 1
    return conv.out_channels * out_h * out_w * (conv.in_channels // conv.groups) * k_h * k_w


def _find_network(model: nn.Module) -> tuple[str, SpikingNetwork]:
    # The outermost module that declares its wiring; wrappers (DDP, torch.compile) sit above it.
    # Checked on the type: torch.compile's wrapper forwards attribute lookups to the network.
    for name, module in model.named_modules():
        if all(hasattr(type(module), m) for m in ("spike_consumers", "first_layer_macs_per_image")):
            return name, module
    raise TypeError(
        f"firing_report: {type(model).__name__} does not declare spike_consumers() and "
        "first_layer_macs_per_image(); build it with models.resnet or models.mlp"
    )


def firing_report(counts: dict[str, Tensor], model: nn.Module, images: int) -> dict[str, float]:
    """Firing rates, sparsity, SOPs and energy per image from ``firing_counts`` output.

    Args:
        counts: ``firing_counts(model)``, possibly summed across ranks.
        model: the network the counts came from (may be wrapped, e.g. by DDP).
        images: number of images the counts cover (the global count if summed across ranks).

    Returns:
        ``firing_rate/<layer>`` (spikes per neuron per step) for every neuron layer,
        ``firing_rate_mean`` (all spikes / all neuron-timestep slots), ``sparsity_mean``
        (1 - firing_rate_mean), ``sops_per_image`` and ``energy_uj_per_image`` (microjoules;
        formula in the module docstring).
    """
    if images <= 0:
        raise ValueError(f"firing_report: images must be > 0, got {images}")
    prefix, network = _find_network(model)
    consumers = network.spike_consumers()
    shapes = neuron_context(model).shapes
    report: dict[str, float] = {}
    total_spikes = total_slots = sops = 0.0
    for name, count in counts.items():
        spikes, slots = (float(v) for v in count.detach().cpu().tolist())
        report[f"firing_rate/{name}"] = spikes / slots if slots else 0.0
        total_spikes += spikes
        total_slots += slots
        relative = name[len(prefix) + 1 :] if prefix else name
        if relative not in consumers:
            raise KeyError(f"firing_report: {name} is not a neuron layer of {type(network).__name__}")
        if spikes:
            lif = model.get_submodule(name)
            shape = shapes.get(lif)
            if shape is None:
                raise ValueError(f"firing_report: {name} has spikes but never recorded its shape")
            for consumer in consumers[relative]:
                sops += spikes * synapses_per_neuron(network.get_submodule(consumer), shape)
            if isinstance(lif, LIF):  # a brought network's neurons declare no recurrence
                sops += spikes * recurrent_synapses_per_neuron(lif, shape)
    rate = total_spikes / total_slots if total_slots else 0.0
    report["firing_rate_mean"] = rate
    report["sparsity_mean"] = 1.0 - rate
    report["sops_per_image"] = sops / images
    energy_pj = E_MAC_PJ * network.first_layer_macs_per_image() + E_SOP_PJ * sops / images
    report["energy_uj_per_image"] = energy_pj * 1e-6
    return report
