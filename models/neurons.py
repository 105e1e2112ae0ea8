"""Leaky integrate-and-fire neurons: one stateless, multi-step family for both papers.

Dynamics, per neuron, for t = 0 .. T-1 (the reference loop in ``_lif_reference`` is the
specification; a fused kernel must reproduce it)::

    h[t] = d * v[t-1] + x[t] + r[t]      charge: leak d, input current x, recurrent input r
    o[t] = H(h[t] - V_th)                fire when strictly above the threshold
    v[t] = h[t] * (1 - o[t]) + v_reset * o[t]    reset = hard
           h[t] - V_th * o[t]                    reset = soft (subtract the threshold)
           h[t]                                  reset = none

- ``d = tau_decay`` with leak, ``d = 1`` without (IF); the resting potential is 0.
- ``r[t] = w * o[t-1]`` (recurrence = self, ``w`` per channel), ``W @ o[t-1]`` over the channel
  axis (recurrence = lateral: dense for linear layers, a 1x1 convolution for conv layers; it is
  the same ``[C, C]`` matrix applied at every position), 0 for none.
- ``v[-1] = 0`` and ``o[-1] = 0`` unless a ``LIFState`` is passed in.
- With hard reset and ``v_reset = 0`` this is STBP-tdBN's ``u[t] = tau * u[t-1] * (1 - o[t-1]) +
  x[t]`` (their ``u`` is ``h`` here).
- ``detach_reset`` stops the gradient through the ``o`` used in the reset (not through the
  recurrent input).

Shapes: inputs and spikes are ``[T, B, C, ...]`` (time first, channel at dim 2); the membrane
state is ``[B, C, ...]``. The membrane is accumulated in fp32 (fp64 for fp64 inputs) whatever
the input dtype; spikes come back in the input dtype.

The op is called through one dispatch point: ``register_neuron_impl`` adds an implementation
(e.g. a fused CUDA kernel) with a predicate on (input, spec); the first registered one whose
predicate accepts wins, the PyTorch reference takes everything else. ``neuron_impl_for`` says
which one a call would use, and ``impl=`` forces one (errors if it does not accept the call).

``NeuronConfig``, its enums and ``NeuronConfigError`` are defined in ``models.neuron_config``
(standard library only, for the config schema) and re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.neuron_config import NeuronConfig, NeuronConfigError, Recurrence, Reset, Surrogate, as_neuron_config
from models.surrogates import spike

__all__ = [
    "Reset",
    "Recurrence",
    "Surrogate",
    "NeuronConfig",
    "NeuronConfigError",
    "as_neuron_config",
    "LIFSpec",
    "LIFState",
    "lif_multistep",
    "register_neuron_impl",
    "neuron_impl_for",
    "neuron_impls",
    "REFERENCE_IMPL",
    "LIF",
]


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


# (x, decay, v_threshold, recurrent_weight, state, spec) -> (spikes [T, B, ...], final state).
# decay / v_threshold are Python floats or per-channel [C] tensors; recurrent_weight is None,
# [C] (self) or [C, C] (lateral).
# (x, decay, v_threshold, recurrent_weight, state, spec, *, return_state) -> (spikes, final
# state, or None when return_state is False and the implementation skipped it)
NeuronImplFn = Callable[..., "tuple[Tensor, LIFState | None]"]
NeuronImplPredicate = Callable[[Tensor, LIFSpec], bool]

REFERENCE_IMPL = "reference"


@dataclass(frozen=True)
class _NeuronImpl:
    name: str
    predicate: NeuronImplPredicate
    fn: NeuronImplFn


_NEURON_IMPLS: list[_NeuronImpl] = []


def register_neuron_impl(name: str, predicate: NeuronImplPredicate, fn: NeuronImplFn) -> None:
    """Add an implementation of the LIF op (e.g. a fused CUDA kernel) to the dispatch.

    Args:
        name: unique name, reported by ``neuron_impl_for`` and accepted by ``impl=``.
        predicate: ``(x [T, B, C, ...], spec) -> bool``, whether ``fn`` handles this call; must
            depend only on static properties (device, dtype, shape, spec) so the choice is
            deterministic.
        fn: the implementation, with the ``NeuronImplFn`` signature; it must match the
            reference (spikes, final state and gradients).

    Implementations are tried in registration order; the reference takes what none accepts.
    """
    if name == REFERENCE_IMPL or any(impl.name == name for impl in _NEURON_IMPLS):
        raise ValueError(f"a neuron implementation named {name!r} is already registered")
    _NEURON_IMPLS.append(_NeuronImpl(name, predicate, fn))


def neuron_impls() -> list[str]:
    """Names of the implementations in dispatch order; the reference is always last."""
    return [impl.name for impl in _NEURON_IMPLS] + [REFERENCE_IMPL]


def neuron_impl_for(x: Tensor, spec: LIFSpec) -> str:
    """Name of the implementation ``lif_multistep`` uses for input ``x`` and ``spec``."""
    for impl in _NEURON_IMPLS:
        if impl.predicate(x, spec):
            return impl.name
    return REFERENCE_IMPL


def _impl_fn(x: Tensor, spec: LIFSpec, impl: str | None) -> NeuronImplFn:
    if impl is None:
        for candidate in _NEURON_IMPLS:
            if candidate.predicate(x, spec):
                return candidate.fn
        return _lif_reference
    if impl == REFERENCE_IMPL:
        return _lif_reference
    for candidate in _NEURON_IMPLS:
        if candidate.name == impl:
            if not candidate.predicate(x, spec):
                raise ValueError(
                    f"neuron implementation {impl!r} does not accept input "
                    f"{tuple(x.shape)} {x.dtype} on {x.device} with {spec}"
                )
            return candidate.fn
    raise ValueError(f"unknown neuron implementation {impl!r}; registered: {neuron_impls()}")


def _per_channel(p: Tensor | float, step_ndim: int) -> Tensor | float:
    """View a per-channel ``[C]`` tensor so it broadcasts against one step ``[B, C, ...]``."""
    if isinstance(p, Tensor) and p.ndim == 1:
        return p.view(p.shape[0], *([1] * (step_ndim - 2)))
    return p


def _lif_reference(
    x: Tensor,
    decay: Tensor | float,
    v_threshold: Tensor | float,
    recurrent_weight: Tensor | None,
    state: LIFState | None,
    spec: LIFSpec,
    *,
    return_state: bool = True,
) -> tuple[Tensor, LIFState]:
    """The specification: a plain loop over T (dynamics in the module docstring).

    ``return_state`` is part of the implementation signature so fused kernels can skip writing a
    final state nobody reads; the loop has that state anyway and always returns it."""
    acc = torch.promote_types(x.dtype, torch.float32)
    step_ndim = x.ndim - 1
    decay = _per_channel(decay, step_ndim)
    v_threshold = _per_channel(v_threshold, step_ndim)
    if spec.recurrence is Recurrence.self:
        recurrent_weight = _per_channel(recurrent_weight, step_ndim)
    if state is None:
        v = x.new_zeros(x.shape[1:], dtype=acc)
        o = x.new_zeros(x.shape[1:], dtype=acc)
    else:
        v, o = state.v.to(acc), state.spike.to(acc)

    spikes = []
    # unbind: its backward stacks the T step gradients once, where indexing x[t] would add T
    # full-size [T, ...] gradient buffers.
    for x_t in x.unbind(0):
        h = decay * v + x_t.to(acc)
        if spec.recurrence is Recurrence.self:
            h = h + recurrent_weight * o
        elif spec.recurrence is Recurrence.lateral:
            h = h + torch.einsum("ij,bj...->bi...", recurrent_weight, o)
        o = spike(h - v_threshold, spec.surrogate, spec.surrogate_width)
        o_reset = o.detach() if spec.detach_reset else o
        if spec.reset is Reset.hard:
            v = h * (1 - o_reset)
            if spec.v_reset != 0.0:
                v = v + spec.v_reset * o_reset
        elif spec.reset is Reset.soft:
            v = h - v_threshold * o_reset
        else:
            v = h
        spikes.append(o)
    return torch.stack(spikes).to(x.dtype), LIFState(v, o)


def _check_input(x: Tensor, num_features: int | None) -> None:
    if not x.is_floating_point() or x.ndim < 2:
        raise ValueError(
            f"neuron input must be a float tensor [T, B, ...], got {tuple(x.shape)} {x.dtype}"
        )
    if num_features is not None and (x.ndim < 3 or x.shape[2] != num_features):
        raise ValueError(
            f"neuron input {tuple(x.shape)} must be [T, B, C, ...] with C = {num_features}"
        )


def lif_multistep(
    x: Tensor,
    neuron: NeuronConfig | Mapping[str, Any] | None = None,
    *,
    decay: Tensor | None = None,
    v_threshold: Tensor | None = None,
    recurrent_weight: Tensor | None = None,
    state: LIFState | None = None,
    return_state: bool = False,
    impl: str | None = None,
) -> Tensor | tuple[Tensor, LIFState]:
    """Run a LIF neuron over a whole sequence (dynamics in the module docstring).

    Args:
        x: input current ``[T, B, C, ...]`` (fp32, bf16, fp16 or fp64).
        neuron: configuration (defaults if None); its static parts select the code path.
        decay: per-channel decay ``[C]`` in [0, 1] replacing ``tau_decay`` (learnable decay).
        v_threshold: per-channel threshold ``[C]`` replacing ``neuron.v_threshold``.
        recurrent_weight: ``[C]`` for self recurrence, ``[C, C]`` for lateral; required
            exactly when ``neuron.recurrence`` is not none.
        state: state from a previous call to continue the sequence; zeros if None.
        return_state: also return the state after the last step.
        impl: force an implementation by name (``neuron_impls()``); None dispatches.

    Returns:
        spikes ``[T, B, C, ...]`` in ``x.dtype`` (0/1), and the ``LIFState`` if asked.
    """
    cfg = as_neuron_config(neuron)
    spec = LIFSpec.from_config(cfg)
    needs_weight = spec.recurrence is not Recurrence.none
    if needs_weight != (recurrent_weight is not None):
        raise ValueError(
            f"recurrent_weight must be given exactly when recurrence is not none "
            f"(recurrence = {spec.recurrence.value})"
        )
    per_channel = decay is not None or v_threshold is not None or recurrent_weight is not None
    channels = None
    if per_channel:
        channels = next(p.shape[0] for p in (decay, v_threshold, recurrent_weight) if p is not None)
    _check_input(x, channels)
    if decay is None:
        decay = cfg.tau_decay if cfg.leak else 1.0
    elif not cfg.leak:
        raise ValueError("decay was given but neuron.leak is false (IF has no decay)")
    if v_threshold is None:
        v_threshold = cfg.v_threshold
    spikes, final = _impl_fn(x, spec, impl)(x, decay, v_threshold, recurrent_weight, state, spec,
                                            return_state=return_state)
    return (spikes, final) if return_state else spikes


class LIF(nn.Module):
    """A layer of LIF neurons: ``[T, B, C, ...] -> [T, B, C, ...]`` spikes.

    Holds only parameters (learnable decay, threshold, recurrent weights, per channel) and the
    firing-statistics switch used by ``models.firing``; the membrane lives inside each call.

    Args:
        num_features: channels C (dim 2 of the input).
        neuron: ``NeuronConfig``, a mapping of its fields, or None for the defaults.
    """

    def __init__(self, num_features: int, neuron: NeuronConfig | Mapping[str, Any] | None = None):
        super().__init__()
        cfg = as_neuron_config(neuron)
        self.num_features = num_features
        self.neuron = cfg
        self.spec = LIFSpec.from_config(cfg)
        self.decay_logit = (
            nn.Parameter(torch.full((num_features,), math.log(cfg.tau_decay / (1 - cfg.tau_decay))))
            if cfg.learnable_decay
            else None
        )
        self.v_threshold = (
            nn.Parameter(torch.full((num_features,), cfg.v_threshold))
            if cfg.learnable_threshold
            else None
        )
        # Zero recurrent weights: training starts from the plain neuron and learns the loop.
        if cfg.recurrence is Recurrence.self:
            self.recurrent_weight = nn.Parameter(torch.zeros(num_features))
        elif cfg.recurrence is Recurrence.lateral:
            self.recurrent_weight = nn.Parameter(torch.zeros(num_features, num_features))
        else:
            self.recurrent_weight = None
        # Firing statistics (models.firing): off by default, and then never touched in forward.
        # The counts are a plain attribute, not a buffer, so DDP does not broadcast them.
        self.record_firing = False
        # Firing-rate regularisation (models.firing.capture_spike_totals): while a list is set,
        # each call appends (spike sum with its gradient, neuron-timestep slots).
        self.spike_totals: list[tuple[Tensor, int]] | None = None
        # Activation checkpointing over time (``set_time_chunk``): None runs all T steps at once.
        self.time_chunk: int | None = None
        self.spike_count: Tensor | None = None  # float64 [spikes, neuron slots]
        self.neuron_shape: tuple[int, ...] | None = None  # [C, ...] of the last recorded call

    def decay(self) -> Tensor | float:
        """Membrane decay: ``[C]`` tensor if learnable, else ``tau_decay`` (1 without leak)."""
        if self.decay_logit is not None:
            return torch.sigmoid(self.decay_logit)
        return self.neuron.tau_decay if self.neuron.leak else 1.0

    def threshold(self) -> Tensor | float:
        """Firing threshold: ``[C]`` tensor if learnable, else ``v_threshold``."""
        return self.v_threshold if self.v_threshold is not None else self.neuron.v_threshold

    def forward(
        self, x: Tensor, state: LIFState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, LIFState]:
        """Spikes ``[T, B, C, ...]`` in ``x.dtype`` for input current ``x [T, B, C, ...]``;
        ``state``/``return_state`` as in ``lif_multistep``."""
        _check_input(x, self.num_features)
        fn = _impl_fn(x, self.spec, None)
        chunk = self.time_chunk
        # Only the reference loop keeps per-step intermediates worth chunking; a fused kernel
        # saves its input and its own chunk states already.
        if (chunk is not None and fn is _lif_reference and x.shape[0] > chunk and self.training
                and torch.is_grad_enabled()):
            spikes, final = self._run_in_time_chunks(fn, x, state, chunk, return_state)
        else:
            spikes, final = fn(x, self.decay(), self.threshold(), self.recurrent_weight, state,
                               self.spec, return_state=return_state)
        if self.spike_totals is not None:
            self.spike_totals.append((spikes.sum(dtype=torch.float32), spikes.numel()))
        if self.record_firing:
            self._record_firing(spikes)
        return (spikes, final) if return_state else spikes

    def set_time_chunk(self, steps: int | None) -> None:
        """Checkpoint the time loop in chunks of ``steps`` steps while training with gradients
        (the reference implementation; fused kernels save only their input already).

        Each chunk is recomputed in backward from its input and the membrane state carried in
        from the previous chunk, so the neuron keeps the per-step intermediates of one chunk
        instead of all T (exact: the same arithmetic runs again). None turns it off."""
        if steps is not None and steps < 1:
            raise ValueError(f"time chunk must be >= 1 step, got {steps}")
        self.time_chunk = steps

    def _run_in_time_chunks(
        self, fn: NeuronImplFn, x: Tensor, state: LIFState | None, chunk: int, return_state: bool
    ) -> tuple[Tensor, LIFState | None]:
        decay, threshold, weight = self.decay(), self.threshold(), self.recurrent_weight

        def run(x_c: Tensor, v: Tensor | None, o: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
            spikes_c, final = fn(x_c, decay, threshold, weight, None if v is None else LIFState(v, o),
                                 self.spec, return_state=True)
            return spikes_c, final.v, final.spike

        out = []
        v, o = (None, None) if state is None else state
        for x_c in x.split(chunk):
            spikes_c, v, o = checkpoint(run, x_c, v, o, use_reentrant=False)
            out.append(spikes_c)
        return torch.cat(out), (LIFState(v, o) if return_state else None)

    def _record_firing(self, spikes: Tensor) -> None:
        # In-place adds on a device tensor: no host synchronisation per step.
        if self.spike_count is None:
            self.spike_count = torch.zeros(2, dtype=torch.float64, device=spikes.device)
        elif self.spike_count.device != spikes.device:  # the model moved since the last reset
            self.spike_count = self.spike_count.to(spikes.device)
        self.spike_count[0] += spikes.detach().sum(dtype=torch.float64)
        self.spike_count[1] += spikes.numel()
        self.neuron_shape = tuple(spikes.shape[2:])

    def extra_repr(self) -> str:
        cfg = self.neuron
        decay = "learnable" if cfg.learnable_decay else (cfg.tau_decay if cfg.leak else "none (IF)")
        return (
            f"{self.num_features}, decay={decay}, v_threshold={cfg.v_threshold}"
            f"{' (learnable)' if cfg.learnable_threshold else ''}, reset={cfg.reset.value}, "
            f"recurrence={cfg.recurrence.value}, surrogate={cfg.surrogate.value}({cfg.surrogate_width})"
        )


# The fused kernels register themselves with the dispatch above (Triton's LIF, when Triton is
# installed): imported here, every user of the neuron op gets the same choice of implementation.
import models.kernels  # noqa: E402,F401
