"""What a network tells its neuron layers beyond their config, and what they report back: one
``NeuronContext`` object that every LIF layer of a network shares (``models.neurons.neuron_context``).

It holds the time chunk of activation checkpointing over time, the firing counts and per-step
shapes of every layer (``models.firing``: firing rates, SOPs) and, while captured, the
differentiable spike totals of a firing-rate penalty. A layer reports its spikes through
``NeuronContext.record`` only; while a checkpointed part is recomputed in backward
(``recomputation()``, entered by ``models.checkpointing``), ``record`` takes nothing, so no
counter, present or future, is counted twice.

``record`` runs outside compiled graphs (``torch.compiler.disable``): a compiled part recomputed
in backward runs its own graph again, and the switch above lives in eager code, so it needs no
second graph. The cost is a graph break at each neuron layer while something is recorded
(evaluation, a firing-rate penalty), none otherwise: the layer checks two plain attributes first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

__all__ = ["NeuronContext", "recomputation"]

_RECOMPUTING: ContextVar[bool] = ContextVar("neuron_recomputing", default=False)


@contextmanager
def recomputation() -> Iterator[None]:
    """While active (in this thread: the backward pass recomputing a checkpointed part), no
    neuron layer records anything."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


class NeuronContext:
    """Shared by the LIF layers of one network.

    Attributes:
        time_chunk: steps per checkpointed chunk of each layer's time loop while training with
            gradients (``models.checkpointing``, ``blocks+time``); None runs all T at once.
        counting: accumulate firing counts (``models.firing.set_firing_recording``).
        counts: layer -> float64 ``[spikes, neuron-timestep slots]`` since the last reset, on
            the spikes' device (in-place adds: no host synchronisation).
        shapes: layer -> per-sample shape ``[C, ...]`` of its last counted call (SOP fan-out).
        totals: while ``models.firing.capture_spike_totals`` is active, every call appends
            (spike sum with its gradient, neuron-timestep slots); else None.
    """

    def __init__(self) -> None:
        self.time_chunk: int | None = None
        self.counting = False
        self.counts: dict[nn.Module, Tensor] = {}
        self.shapes: dict[nn.Module, tuple[int, ...]] = {}
        self.totals: list[tuple[Tensor, int]] | None = None

    @property
    def recording(self) -> bool:
        """Whether a layer's spikes go to ``record`` (plain attributes: cheap to guard on)."""
        return self.counting or self.totals is not None

    @torch.compiler.disable
    def record(self, layer: nn.Module, spikes: Tensor) -> None:
        """Take one call's spikes ``[T, B, C, ...]`` of ``layer``; nothing under ``recomputation``."""
        if _RECOMPUTING.get():
            return
        if self.totals is not None:
            self.totals.append((spikes.sum(dtype=torch.float32), spikes.numel()))
        if self.counting:
            count = self.counts.get(layer)
            if count is None:
                count = self.counts[layer] = torch.zeros(2, dtype=torch.float64, device=spikes.device)
            elif count.device != spikes.device:  # the model moved since the last reset
                count = self.counts[layer] = count.to(spikes.device)
            count[0] += spikes.detach().sum(dtype=torch.float64)
            count[1] += spikes.numel()
            self.shapes[layer] = tuple(spikes.shape[2:])
