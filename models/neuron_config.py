"""Neuron hyper-parameters: ``NeuronConfig``, its enums and its error, in the standard library only.

The config schema (``train.config``) reads these without loading torch, timm or Triton; the
neuron layers themselves are in ``models.neurons``, which re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

__all__ = ["Reset", "Recurrence", "Surrogate", "NeuronConfig", "NeuronConfigError", "as_neuron_config"]


class Reset(str, Enum):
    """What a spike does to the membrane: to ``v_reset``, minus ``V_th``, or nothing."""

    hard = "hard"
    soft = "soft"
    none = "none"


class Recurrence(str, Enum):
    """Recurrent input from the layer's own spikes at the previous step."""

    none = "none"
    self = "self"
    lateral = "lateral"


class Surrogate(str, Enum):
    """Shape of the surrogate derivative used in the backward pass of the spike."""

    rectangular = "rectangular"
    sigmoid = "sigmoid"
    atan = "atan"
    triangle = "triangle"


class NeuronConfigError(ValueError):
    """A neuron setting a user wrote is invalid; the message names the key."""


@dataclass
class NeuronConfig:
    """Neuron hyper-parameters (OmegaConf structured config, ``model.neuron``).

    Defaults follow STBP-tdBN's code: V_th = 0.5, decay 0.25, hard reset to 0, rectangular
    surrogate with a = 1.

    Attributes:
        tau_decay: multiplicative membrane decay per step, in [0, 1] (0 = no memory).
        leak: false gives IF (decay 1).
        learnable_decay: learn one decay per channel (stored as a logit, initialised at
            ``tau_decay``, which must then lie strictly inside (0, 1)).
        reset: hard (to ``v_reset``), soft (subtract V_th) or none.
        v_reset: membrane value after a spike with hard reset.
        detach_reset: no gradient through the spike used in the reset.
        recurrence: none, self (per-channel weight on the neuron's own previous spike) or
            lateral (a [C, C] map from the layer's previous spikes); weights start at 0.
        v_threshold: firing threshold V_th (> 0); also tdBN's V_th.
        learnable_threshold: learn one threshold per channel, initialised at ``v_threshold``.
        surrogate: surrogate gradient shape (see ``models.surrogates``).
        surrogate_width: the surrogate's width: a for rectangular, alpha for sigmoid and atan,
            gamma for triangle; > 0.
    """

    tau_decay: float = 0.25
    leak: bool = True
    learnable_decay: bool = False
    reset: Reset = Reset.hard
    v_reset: float = 0.0
    detach_reset: bool = False
    recurrence: Recurrence = Recurrence.none
    v_threshold: float = 0.5
    learnable_threshold: bool = False
    surrogate: Surrogate = Surrogate.rectangular
    surrogate_width: float = 1.0

    def __post_init__(self) -> None:
        # Strings are accepted for enums so plain dicts and YAML work without OmegaConf.
        for name, enum in (("reset", Reset), ("recurrence", Recurrence), ("surrogate", Surrogate)):
            value = getattr(self, name)
            if not isinstance(value, enum):
                try:
                    setattr(self, name, enum(value))
                except ValueError:
                    choices = ", ".join(e.value for e in enum)
                    raise NeuronConfigError(
                        f"neuron.{name}: {value!r} is not one of {choices}"
                    ) from None
        for name in ("tau_decay", "v_reset", "v_threshold", "surrogate_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise NeuronConfigError(f"neuron.{name}: expected a number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("leak", "learnable_decay", "detach_reset", "learnable_threshold"):
            value = getattr(self, name)
            if not isinstance(value, bool):  # a string like "false" would silently be true
                raise NeuronConfigError(f"neuron.{name}: expected true or false, got {value!r}")
        if not 0.0 <= self.tau_decay <= 1.0:
            raise NeuronConfigError(f"neuron.tau_decay: {self.tau_decay} is outside [0, 1]")
        if self.learnable_decay and not self.leak:
            raise NeuronConfigError("neuron.learnable_decay: needs leak: true (IF has no decay)")
        if self.learnable_decay and not 0.0 < self.tau_decay < 1.0:
            raise NeuronConfigError(
                f"neuron.tau_decay: {self.tau_decay} must lie strictly inside (0, 1) "
                "when learnable_decay is on"
            )
        if self.v_threshold <= 0:
            raise NeuronConfigError(f"neuron.v_threshold: {self.v_threshold} must be > 0")
        if self.surrogate_width <= 0:
            raise NeuronConfigError(f"neuron.surrogate_width: {self.surrogate_width} must be > 0")


def as_neuron_config(neuron: NeuronConfig | Mapping[str, Any] | None) -> NeuronConfig:
    """A validated ``NeuronConfig`` from a config, a mapping (dict, OmegaConf DictConfig) or None.

    Raises:
        NeuronConfigError: unknown key or invalid value (one line naming the key).
    """
    if neuron is None:
        return NeuronConfig()
    if isinstance(neuron, NeuronConfig):
        return neuron
    if isinstance(neuron, Mapping):
        known = {f.name for f in fields(NeuronConfig)}
        unknown = sorted(str(k) for k in neuron if k not in known)
        if unknown:
            raise NeuronConfigError(
                f"neuron: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
            )
        return NeuronConfig(**{str(k): v for k, v in neuron.items()})
    raise NeuronConfigError(
        f"neuron: expected a NeuronConfig, a mapping or None, got {type(neuron).__name__}"
    )
