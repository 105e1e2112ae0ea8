"""Leaky integrate-and-fire neurons: one stateless, multi-step family for both papers.

Dynamics, per neuron, for t = 0 .. T-1 (the reference loop in ``_lif_reference`` is the
specification; a fused kernel must reproduce it)::

    h[t] = d * v[t-1] + x[t] + r[t]      charge: leak d, input current x, recurrent input r
    o[t] = H(h[t] - V_th)                fire when strictly above the threshold
    v[t] = h[t] * (1 - o[t]) + v_reset * o[t]    reset = hard
           h[t] - V_th * o[t]                    reset = soft (subtract the threshold)
           h[t]                                  reset = none

- Leak: ``d = tau_decay`` (normal), ``d = 1`` (none: IF), ``d = 0`` (complete: ``h[t] = x[t] +
  r[t]``, the membrane holds only the current input); the resting potential is 0.
- Recurrence, on the layer's own spikes of the previous step: ``r[t] = w * o[t-1]`` (self, ``w``
  per channel); ``W @ o[t-1]`` over the channel axis (lateral: dense for linear layers, a 1x1
  convolution for conv layers, the same ``[C, C]`` matrix at every position); full, the
  functional-roles paper's N x N matrix within the layer: on a layer of vectors ``[B, C]`` it is
  that dense ``[C, C]`` matrix (the same as lateral), on a layer of feature maps ``[B, C, H, W]``
  a 3x3 convolution C -> C with padding 1, ``V * o[t-1]``: every neuron receives from every
  channel at its own and the 8 neighbouring positions (lateral is its 1x1 special case; a dense
  ``C*H*W`` square matrix would hold 10^10 weights at ResNet sizes); 0 for none.
- ``v[-1] = 0`` and ``o[-1] = 0`` unless a ``LIFState`` is passed in.
- With hard reset and ``v_reset = 0`` this is STBP-tdBN's ``u[t] = tau * u[t-1] * (1 - o[t-1]) +
  x[t]`` (their ``u`` is ``h`` here).
- ``detach_reset`` stops the gradient through the ``o`` used in the reset (not through the
  recurrent input).

Shapes: inputs and spikes are ``[T, B, C, ...]`` (time first, channel at dim 2); the membrane
state is ``[B, C, ...]``. The membrane is accumulated in fp32 (fp64 for fp64 inputs) whatever
the input dtype; spikes come back in the input dtype.

The op is called through one dispatch point (``models.dispatch``): a fused kernel registers
itself there with a predicate on (input, spec) (``models.kernels``, imported here so every user
of the op gets the same choice); the first one whose predicate accepts wins, the PyTorch
reference takes everything else, and a variant a kernel leaves to the reference on its own
device (e.g. lateral and full recurrence on CUDA) is logged once. ``neuron_impl_for`` says which
implementation a call would use, and ``impl=`` forces one (errors if it does not accept the call).

What a network tells its layers and what they report (time chunk, firing counts, spike totals)
goes through one ``NeuronContext`` (``models.neuron_context``) the network's layers share.

``NeuronConfig``, its enums and ``NeuronConfigError`` are defined in ``models.neuron_config``
(standard library only, for the config schema) and re-exported here, as are ``LIFSpec``,
``LIFState`` and the registry of ``models.dispatch``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import models.kernels  # noqa: F401  (the fused kernels register with the dispatch)
from models.dispatch import (
    REFERENCE_IMPL,
    LIFSpec,
    LIFState,
    NeuronImplFn,
    neuron_impl_for,
    neuron_impls,
    register_neuron_impl,
    select,
)
from models.neuron_config import (
    Leak,
    NeuronConfig,
    NeuronConfigError,
    Recurrence,
    Reset,
    Surrogate,
    as_neuron_config,
)
from models.neuron_context import NeuronContext
from models.surrogates import spike

__all__ = [
    "Leak",
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
    "NeuronContext",
    "neuron_context",
    "FULL_RECURRENCE_KERNEL",
]

#: Kernel size of full recurrence on feature maps (a k x k convolution C -> C, padding k // 2).
FULL_RECURRENCE_KERNEL = 3


def _impl_fn(x: Tensor, spec: LIFSpec, impl: str | None) -> NeuronImplFn:
    return select(x, spec, impl) or _lif_reference


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
        elif recurrent_weight is not None and recurrent_weight.ndim == 4:  # full, on feature maps
            h = h + F.conv2d(o, recurrent_weight, padding=recurrent_weight.shape[-1] // 2)
        elif recurrent_weight is not None:  # lateral, or full on vectors: the [C, C] matrix
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


def _check_recurrent_weight(x: Tensor, spec: LIFSpec, weight: Tensor | None) -> None:
    """The weight's shape against the recurrence and the input (shapes in ``lif_multistep``)."""
    if (spec.recurrence is not Recurrence.none) != (weight is not None):
        raise ValueError(
            f"recurrent_weight must be given exactly when recurrence is not none "
            f"(recurrence = {spec.recurrence.value})"
        )
    if weight is None:
        return
    c, shape = weight.shape[0], tuple(weight.shape)
    if spec.recurrence is Recurrence.self:
        fits = shape == (c,)
    elif spec.recurrence is Recurrence.lateral or x.ndim == 3:  # lateral, or full on vectors
        fits = shape == (c, c)
    elif x.ndim == 5:  # full on feature maps: a k x k convolution, k odd
        fits = len(shape) == 4 and shape[:2] == (c, c) and shape[2] == shape[3] and shape[2] % 2 == 1
    else:
        raise ValueError(f"recurrence full needs vectors [T, B, C] or feature maps [T, B, C, H, W], "
                         f"got input {tuple(x.shape)}")
    if not fits:
        raise ValueError(f"recurrent_weight {shape} does not fit recurrence {spec.recurrence.value} on "
                         f"input {tuple(x.shape)} (see lif_multistep's recurrent_weight)")


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
        recurrent_weight: ``[C]`` for self recurrence, ``[C, C]`` for lateral and for full
            on vectors ``[T, B, C]``, ``[C, C, k, k]`` (k odd, padding k // 2) for full on
            feature maps ``[T, B, C, H, W]``; required exactly when ``neuron.recurrence`` is
            not none.
        state: state from a previous call to continue the sequence; zeros if None.
        return_state: also return the state after the last step.
        impl: force an implementation by name (``neuron_impls()``); None dispatches.

    Returns:
        spikes ``[T, B, C, ...]`` in ``x.dtype`` (0/1), and the ``LIFState`` if asked.
    """
    cfg = as_neuron_config(neuron)
    spec = LIFSpec.from_config(cfg)
    per_channel = decay is not None or v_threshold is not None or recurrent_weight is not None
    channels = None
    if per_channel:
        channels = next(p.shape[0] for p in (decay, v_threshold, recurrent_weight) if p is not None)
    _check_input(x, channels)
    _check_recurrent_weight(x, spec, recurrent_weight)
    if decay is None:
        decay = cfg.decay
    elif cfg.leak is not Leak.normal:
        raise ValueError(f"decay was given but neuron.leak is {cfg.leak.value} (its decay is fixed)")
    if v_threshold is None:
        v_threshold = cfg.v_threshold
    spikes, final = _impl_fn(x, spec, impl)(x, decay, v_threshold, recurrent_weight, state, spec,
                                            return_state=return_state)
    return (spikes, final) if return_state else spikes


class LIF(nn.Module):
    """A layer of LIF neurons: ``[T, B, C, ...] -> [T, B, C, ...]`` spikes.

    Holds only parameters (learnable decay, threshold, recurrent weights) and the
    ``NeuronContext`` it shares with the other layers of its network (``neuron_context``); the
    membrane lives inside each call.

    Args:
        num_features: channels C (dim 2 of the input).
        neuron: ``NeuronConfig``, a mapping of its fields, or None for the defaults.
        spatial: the neurons form feature maps ``[C, H, W]`` (the layer follows a convolution):
            full recurrence is then a 3x3 convolution of the previous spike map; else they are
            a vector ``[C]`` and full recurrence the dense ``[C, C]`` matrix. Only full
            recurrence depends on it, and its input must then be of that kind.
    """

    def __init__(self, num_features: int, neuron: NeuronConfig | Mapping[str, Any] | None = None, *,
                 spatial: bool = False):
        super().__init__()
        cfg = as_neuron_config(neuron)
        self.num_features = num_features
        self.neuron = cfg
        self.spec = LIFSpec.from_config(cfg)
        self.spatial = spatial
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
        shape = {
            Recurrence.none: None,
            Recurrence.self: (num_features,),
            Recurrence.lateral: (num_features, num_features),
            Recurrence.full: (num_features, num_features, *(
                (FULL_RECURRENCE_KERNEL, FULL_RECURRENCE_KERNEL) if spatial else ())),
        }[cfg.recurrence]
        self.recurrent_weight = nn.Parameter(torch.zeros(shape)) if shape is not None else None
        # A plain attribute, not a buffer or a submodule: DDP does not broadcast it, and the
        # state dict does not hold it. Its own until a network shares one (neuron_context).
        self.context = NeuronContext()

    def decay(self) -> Tensor | float:
        """Membrane decay: ``[C]`` tensor if learnable, else the config's (``tau_decay``, 1 for
        leak none, 0 for leak complete)."""
        if self.decay_logit is not None:
            return torch.sigmoid(self.decay_logit)
        return self.neuron.decay

    def threshold(self) -> Tensor | float:
        """Firing threshold: ``[C]`` tensor if learnable, else ``v_threshold``."""
        return self.v_threshold if self.v_threshold is not None else self.neuron.v_threshold

    def forward(
        self, x: Tensor, state: LIFState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, LIFState]:
        """Spikes ``[T, B, C, ...]`` in ``x.dtype`` for input current ``x [T, B, C, ...]``;
        ``state``/``return_state`` as in ``lif_multistep``."""
        _check_input(x, self.num_features)
        if self.spec.recurrence is Recurrence.full and x.ndim != (5 if self.spatial else 3):
            built = "feature maps [T, B, C, H, W]" if self.spatial else "vectors [T, B, C]"
            raise ValueError(f"LIF with full recurrence was built for {built} (spatial={self.spatial}), "
                             f"got input {tuple(x.shape)}")
        fn = _impl_fn(x, self.spec, None)
        chunk = self.context.time_chunk
        # Only the reference loop keeps per-step intermediates worth chunking; a fused kernel
        # saves its input and its own chunk states already.
        if (chunk is not None and fn is _lif_reference and x.shape[0] > chunk and self.training
                and torch.is_grad_enabled()):
            spikes, final = self._run_in_time_chunks(fn, x, state, chunk, return_state)
        else:
            spikes, final = fn(x, self.decay(), self.threshold(), self.recurrent_weight, state,
                               self.spec, return_state=return_state)
        if self.context.recording:
            self.context.record(self, spikes)
        return (spikes, final) if return_state else spikes

    @property
    def time_chunk(self) -> int | None:
        """Steps per checkpointed chunk of the time loop (``set_time_chunk``), None for all T."""
        return self.context.time_chunk

    def set_time_chunk(self, steps: int | None) -> None:
        """Checkpoint the time loop in chunks of ``steps`` steps while training with gradients
        (the reference implementation; fused kernels save only their input already), for every
        layer sharing this layer's context (a network's, once ``neuron_context`` shared it).

        Each chunk is recomputed in backward from its input and the membrane state carried in
        from the previous chunk, so the neuron keeps the per-step intermediates of one chunk
        instead of all T (exact: the same arithmetic runs again). None turns it off."""
        if steps is not None and steps < 1:
            raise ValueError(f"time chunk must be >= 1 step, got {steps}")
        self.context.time_chunk = steps

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

    def extra_repr(self) -> str:
        cfg = self.neuron
        decay = "learnable" if cfg.learnable_decay else {
            Leak.normal: cfg.tau_decay, Leak.none: "1 (leak none: IF)", Leak.complete: "0 (leak complete)"}[cfg.leak]
        return (
            f"{self.num_features}, decay={decay}, v_threshold={cfg.v_threshold}"
            f"{' (learnable)' if cfg.learnable_threshold else ''}, reset={cfg.reset.value}, "
            f"recurrence={cfg.recurrence.value}{' (3x3 conv)' if self.recurrent_weight is not None and self.recurrent_weight.ndim == 4 else ''}, "
            f"surrogate={cfg.surrogate.value}({cfg.surrogate_width})"
        )


def neuron_context(model: nn.Module) -> NeuronContext:
    """The one ``NeuronContext`` every LIF layer of ``model`` shares, made shared on first use
    (a fresh one when the layers hold different ones; its settings start at their defaults).
    A model without LIF layers gets a fresh context nothing reports to; a brought network
    (``models.foreign.ForeignModel``: it declares ``neuron_layers()``) has its own, which its
    neuron modules report to from hooks."""
    for module in model.modules():
        if hasattr(type(module), "neuron_layers"):
            return module.context
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    if not lifs:
        return NeuronContext()
    contexts = {id(lif.context): lif.context for lif in lifs}
    if len(contexts) == 1:
        return lifs[0].context
    shared = NeuronContext()
    for lif in lifs:
        lif.context = shared
    return shared
