"""What every spiking network here shares around its own layers: the checkpointing mode, compile,
the ``forward`` / ``forward_steps`` / ``set_output`` / ``set_readout`` quartet, the first layer's
MACs for the firing report, and the check of a timm factory's arguments.

A network subclasses ``SpikingClassifier`` and provides
- ``forward_features(x)``: input -> spikes of the last layer ``[T, B, ...]``, running each part
  through ``models.checkpointing.checkpointed`` and calling ``_record_first_layer``;
- ``forward_head(s, per_step)``: those spikes -> logits ``[B, classes]`` (``[T, B, classes]``);
- ``checkpointed_parts()``: the parts recomputed in backward (residual blocks, hidden layers),
  which ``compile`` compiles one by one under activation checkpointing;
- ``_first_layer_macs(shape)``: dense MACs of one first-layer call on a sample of that shape;
- ``spike_consumers()`` for the firing report (``models.firing.SpikingNetwork``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from models.checkpointing import OUTPUTS, compile_parts, set_checkpointing_mode
from models.neurons import LIF, NeuronConfig, as_neuron_config

__all__ = ["SpikingClassifier", "spike_consumer_names", "create_checked"]


class SpikingClassifier(nn.Module):
    """Base of the spiking networks: ``T``, ``num_classes`` and ``neuron`` as built;
    ``checkpointing`` (the mode, ``models.checkpointing``), ``output`` (what ``forward``
    returns, ``"mean"`` or ``"per_step"``) and ``readout_from`` (the first step ``forward``'s
    readout counts) are its only settings."""

    #: Set by a forward pass while firing is recorded: (first-layer calls per sample, the input's
    #: per-step shape), read by ``first_layer_macs_per_image``.
    _recorded_input: tuple[int, tuple[int, ...]] | None = None

    def __init__(self, T: int, num_classes: int, neuron: NeuronConfig | Mapping[str, Any] | None) -> None:
        """``T``: time steps for direct encoding (>= 1); ``neuron``: the ``NeuronConfig`` of every
        LIF, a mapping of its fields, or None (defaults), checked into ``self.neuron``."""
        super().__init__()
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        self.neuron = as_neuron_config(neuron)
        self.T = T
        self.num_classes = num_classes
        self.checkpointing = "none"
        self.output = "mean"
        self.readout_from = 0

    @property
    def grad_checkpointing(self) -> bool:
        """timm's flag: whether any part is recomputed in backward (``checkpointing != "none"``)."""
        return self.checkpointing != "none"

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm convention: ``set_checkpointing("blocks" if enable else "none")``."""
        self.set_checkpointing("blocks" if enable else "none")

    def set_checkpointing(self, mode: str, time_chunk: int = 2) -> None:
        """Activation checkpointing: ``none``, ``blocks`` or ``blocks+time`` (see
        ``models.checkpointing``); ``time_chunk`` is the steps per chunk of ``blocks+time``.
        Recomputed in training only, with gradients on; neuron state is local to each call, and
        BatchNorm statistics and firing counts are not updated by a recomputation. Gradients are
        the same in every mode."""
        set_checkpointing_mode(self, mode, time_chunk)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """torch.compile (Inductor) in place; parameter names and state dicts stay as they are.

        Without activation checkpointing the whole model is one compiled region
        (``nn.Module.compile``). With it, each of ``checkpointed_parts`` is compiled on its own and
        the checkpoint stays outside the compiled code, in eager mode: a recomputation in backward
        then runs the part's own graph again, its BatchNorm updates are taken back and its neurons
        report nothing, as in eager mode (inside one compiled graph both would happen twice), while
        ``blocks+time`` keeps storing spike inputs at 1 bit each. Parts of one shape share their
        compiled graphs; shapes are static, so a recomputation finds the graph its forward pass
        ran. ``args``/``kwargs`` go to ``torch.compile``."""
        if self.checkpointing == "none":
            super().compile(*args, **kwargs)
            return
        compile_parts(list(self.checkpointed_parts()), *args, **kwargs)

    def forward_steps(self, x: Tensor) -> Tensor:
        """Input as in ``forward`` -> logits at every step ``[T, B, num_classes]``; ``forward``
        is their mean over T. Neuron state runs through the whole input, so a sequence made of
        two samples concatenated in time carries the state across the boundary (a stream)."""
        return self.forward_head(self.forward_features(x), per_step=True)

    def forward(self, x: Tensor) -> Tensor:
        """Input as in ``forward_steps`` -> the readout: logits ``[B, num_classes]`` averaged over
        the steps ``readout_from ..`` (all of them by default), or those steps' logits
        ``[T - readout_from, B, num_classes]`` when ``output`` is ``"per_step"`` (TET training).
        Loss and accuracy therefore count only those steps (delayed XOR: from its second pattern)."""
        logits = self.forward_head(self.forward_features(x), per_step=True)
        if self.readout_from >= logits.shape[0]:
            raise ValueError(f"readout_from={self.readout_from} leaves no step of a "
                             f"{logits.shape[0]}-step input to read out")
        logits = logits[self.readout_from:]
        return logits if self.output == "per_step" else logits.mean(0)

    def set_output(self, output: str) -> None:
        """What ``forward`` returns: ``"mean"`` logits over time or ``"per_step"`` logits."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
        self.output = output

    def set_readout(self, readout_from: int) -> None:
        """The first time step (0-based) whose logits ``forward`` reads out; 0 = every step.
        ``forward_steps`` keeps returning every step (a stream reads its own windows)."""
        if readout_from < 0:
            raise ValueError(f"readout_from must be >= 0, got {readout_from}")
        self.readout_from = int(readout_from)

    def _record_first_layer(self, neuron: LIF, calls: int, shape: tuple[int, ...]) -> None:
        """The firing side channel: while ``neuron`` records firing, remember that the first layer
        ran ``calls`` times per sample on inputs of per-step ``shape``."""
        if neuron.context.counting:
            self._recorded_input = (calls, shape)

    def first_layer_macs_per_image(self) -> float:
        """Dense MACs of the first layer (the only one whose input is not spikes) per sample, for
        the last recorded input: once for a static input (computed once, broadcast over T), T'
        times for a sequence of T' steps."""
        if self._recorded_input is None:
            raise ValueError("no forward pass was recorded; call set_firing_recording(model, True) first")
        calls, shape = self._recorded_input
        return float(calls * self._first_layer_macs(shape))


def spike_consumer_names(model: nn.Module, edges: Iterable[tuple[LIF, nn.Module]],
                         consumers: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """``spike_consumers`` of ``model`` from (neuron layer, layer its spikes feed) pairs: neuron
    layer name -> names of the layers, in the order of ``edges``, appended to ``consumers``."""
    names = {module: name for name, module in model.named_modules()}
    consumers = {} if consumers is None else consumers
    for lif, consumer in edges:
        consumers.setdefault(names[lif], []).append(names[consumer])
    return consumers


_TIMM_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def create_checked(cls: type[nn.Module], name: str, pretrained: bool, model_args: dict[str, Any],
                   kwargs: dict[str, Any], accepted: Sequence[str], error: type[TypeError]) -> nn.Module:
    """``cls(**model_args)`` with the caller's ``kwargs`` over it, for the timm entry point ``name``.

    Only the names in ``accepted`` may come from the caller; timm adds its own bookkeeping
    arguments (``_TIMM_KWARGS``) to every call, and any other key is a typo, named in one line
    with the accepted ones (``error``)."""
    unknown = sorted(k for k in kwargs if k not in accepted and k not in _TIMM_KWARGS)
    if unknown:
        raise error(f"{name}: unknown argument(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    if pretrained:
        raise error(f"{name}: no pretrained weights exist; use pretrained=False")
    return cls(**dict(model_args, **{k: v for k, v in kwargs.items() if k in accepted}))
