"""The LIF op's static description and the registry of its implementations.

``LIFSpec`` is what selects a code path (reset, recurrence, surrogate: not the learned values),
``LIFState`` the state one call hands to the next, ``NeuronImplFn`` the signature every
implementation has. ``models.neurons`` owns the PyTorch reference (the specification) and calls
``select``; a fused kernel (``models.kernels``) registers itself here with a predicate on
(input, spec). Both import this module and neither imports the other's internals, so the graph
is ``neurons -> {dispatch, kernels}``, ``kernels -> dispatch``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from models.neuron_config import NeuronConfig, Recurrence, Reset, Surrogate

__all__ = ["LIFSpec", "LIFState", "NeuronImplFn", "REFERENCE_IMPL", "register_neuron_impl", "neuron_impls",
           "neuron_impl_for", "select"]

log = logging.getLogger(__name__)

REFERENCE_IMPL = "reference"


@dataclass(frozen=True)
class LIFSpec:
    """The static part of a neuron configuration: what selects the code path, not the values
    that are learned. Hashable, so implementations can cache compiled variants on it."""

    reset: Reset
    v_reset: float
    detach_reset: bool
    recurrence: Recurrence
    surrogate: Surrogate
    surrogate_width: float

    @classmethod
    def from_config(cls, cfg: NeuronConfig) -> LIFSpec:
        return cls(
            reset=cfg.reset,
            v_reset=cfg.v_reset,
            detach_reset=cfg.detach_reset,
            recurrence=cfg.recurrence,
            surrogate=cfg.surrogate,
            surrogate_width=cfg.surrogate_width,
        )


class LIFState(NamedTuple):
    """Neuron state after the last step of a call, to continue a sequence in the next call.

    Attributes:
        v: membrane after reset, ``[B, C, ...]``, fp32 (fp64 for fp64 inputs).
        spike: spikes of the last step, ``[B, C, ...]``, same dtype as ``v`` (needed by
            recurrence).
    """

    v: Tensor
    spike: Tensor


# (x, decay, v_threshold, recurrent_weight, state, spec, *, return_state) -> (spikes [T, B, ...],
# final state, or None when return_state is False and the implementation skipped it). decay /
# v_threshold are Python floats or per-channel [C] tensors; recurrent_weight is None, [C] (self),
# [C, C] (lateral; full on vectors) or [C, C, k, k] (full on feature maps).
NeuronImplFn = Callable[..., "tuple[Tensor, LIFState | None]"]
NeuronImplPredicate = Callable[[Tensor, LIFSpec], bool]
NeuronImplDeclines = Callable[[Tensor, LIFSpec], "str | None"]


@dataclass(frozen=True)
class _NeuronImpl:
    name: str
    predicate: NeuronImplPredicate
    fn: NeuronImplFn
    declines: NeuronImplDeclines | None


_NEURON_IMPLS: list[_NeuronImpl] = []
_NOTED: set[str] = set()  # the reasons logged already: each once per process


def register_neuron_impl(name: str, predicate: NeuronImplPredicate, fn: NeuronImplFn,
                         declines: NeuronImplDeclines | None = None) -> None:
    """Add an implementation of the LIF op (e.g. a fused CUDA kernel) to the dispatch.

    Args:
        name: unique name, reported by ``neuron_impl_for`` and accepted by ``impl=``.
        predicate: ``(x [T, B, C, ...], spec) -> bool``, whether ``fn`` handles this call; must
            depend only on static properties (device, dtype, shape, spec) so the choice is
            deterministic.
        fn: the implementation, with the ``NeuronImplFn`` signature; it must match the
            reference (spikes, final state and gradients).
        declines: ``(x, spec) -> reason or None``: for a call the implementation would take on
            its device but leaves to the reference (a variant it does not cover), one line
            saying so; the dispatch logs each reason once.

    Implementations are tried in registration order; the reference takes what none accepts.
    """
    if name == REFERENCE_IMPL or any(impl.name == name for impl in _NEURON_IMPLS):
        raise ValueError(f"a neuron implementation named {name!r} is already registered")
    _NEURON_IMPLS.append(_NeuronImpl(name, predicate, fn, declines))


def neuron_impls() -> list[str]:
    """Names of the implementations in dispatch order; the reference is always last."""
    return [impl.name for impl in _NEURON_IMPLS] + [REFERENCE_IMPL]


def neuron_impl_for(x: Tensor, spec: LIFSpec) -> str:
    """Name of the implementation ``lif_multistep`` uses for input ``x`` and ``spec``."""
    for impl in _NEURON_IMPLS:
        if impl.predicate(x, spec):
            return impl.name
    return REFERENCE_IMPL


def _note_reference(x: Tensor, spec: LIFSpec) -> None:
    """Log, once per reason, that a registered implementation left this variant to the reference."""
    if torch.compiler.is_compiling():  # logging would break the graph; the eager calls say it
        return
    for impl in _NEURON_IMPLS:
        reason = impl.declines(x, spec) if impl.declines is not None else None
        if reason is not None and reason not in _NOTED:
            _NOTED.add(reason)
            log.warning("neuron dispatch: %s", reason)


def select(x: Tensor, spec: LIFSpec, impl: str | None) -> NeuronImplFn | None:
    """The registered implementation for this call, or None for the reference.

    Args:
        impl: None dispatches (first accepting implementation); ``REFERENCE_IMPL`` or a
            registered name forces one.

    Raises:
        ValueError: a forced implementation that does not accept the call, or an unknown name.
    """
    if impl is None:
        for candidate in _NEURON_IMPLS:
            if candidate.predicate(x, spec):
                return candidate.fn
        _note_reference(x, spec)
        return None
    if impl == REFERENCE_IMPL:
        return None
    for candidate in _NEURON_IMPLS:
        if candidate.name == impl:
            if not candidate.predicate(x, spec):
                raise ValueError(
                    f"neuron implementation {impl!r} does not accept input "
                    f"{tuple(x.shape)} {x.dtype} on {x.device} with {spec}"
                )
            return candidate.fn
    raise ValueError(f"unknown neuron implementation {impl!r}; registered: {neuron_impls()}")
