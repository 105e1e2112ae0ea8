"""Neuron hyper-parameters: ``NeuronConfig``, its enums and its error, in the standard library only.

The config schema (``train.config``) reads these without loading torch, timm or Triton; the
neuron layers themselves are in ``models.neurons``, which re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

__all__ = ["Leak", "Reset", "Recurrence", "Surrogate", "NeuronConfig", "NeuronConfigError", "as_neuron_config"]


class Leak(str, Enum):
    """How much of the membrane survives a step (the functional-roles paper's three levels):
    ``normal`` keeps ``tau_decay`` of it (LIF), ``none`` all of it (decay 1: IF, integrates
    indefinitely), ``complete`` nothing (decay 0: the membrane holds only the current input)."""

    normal = "normal"
    none = "none"
    complete = "complete"

    def __str__(self) -> str:  # the value: OmegaConf stores the str field as str(leak)
        return self.value

    @classmethod
    def parse(cls, value: object) -> Leak:
        """A level from its name, or from the boolean older configs wrote (true = normal, false =
        none) as a bool or as text ("true", "True": OmegaConf turns a YAML bool into "True").

        Raises:
            NeuronConfigError: anything else, in one line naming ``neuron.leak``.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            return cls.normal if value else cls.none
        if isinstance(value, str):
            text = value.lower()
            if text in ("true", "false"):
                return cls.normal if text == "true" else cls.none
            if text in cls.__members__:
                return cls[text]
        choices = ", ".join(e.value for e in cls)
        raise NeuronConfigError(f"neuron.leak: {value!r} is not one of {choices} (or true/false: normal/none)")


class Reset(str, Enum):
    """What a spike does to the membrane: to ``v_reset``, minus ``V_th``, or nothing."""

    hard = "hard"
    soft = "soft"
    none = "none"


class Recurrence(str, Enum):
    """Recurrent input from the layer's own spikes at the previous step: none; ``self`` (each
    neuron its own, ours); ``lateral`` (a [C, C] map over channels at each position, ours);
    ``full`` (the paper's N x N matrix within the layer: the [C, C] matrix on a vector layer, a
    3x3 convolution C -> C on a layer of feature maps; see ``models.neurons``)."""

    none = "none"
    self = "self"
    lateral = "lateral"
    full = "full"


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
        tau_decay: multiplicative membrane decay per step with leak normal, in [0, 1].
        leak: normal (decay ``tau_decay``), none (decay 1: IF) or complete (decay 0: the
            membrane holds only the current input); true / false, as older configs wrote it,
            read as normal / none.
        learnable_decay: learn one decay per channel (stored as a logit, initialised at
            ``tau_decay``, which must then lie strictly inside (0, 1)); leak normal only.
        reset: hard (to ``v_reset``), soft (subtract V_th) or none.
        v_reset: membrane value after a spike with hard reset.
        detach_reset: no gradient through the spike used in the reset.
        recurrence: none, self (per-channel weight on the neuron's own previous spike),
            lateral (a [C, C] map from the layer's previous spikes at the same position) or full
            (the paper's: every neuron of the layer, a [C, C] matrix on vectors, a 3x3
            convolution on feature maps); weights start at 0.
        v_threshold: firing threshold V_th (> 0); also tdBN's V_th.
        learnable_threshold: learn one threshold per channel, initialised at ``v_threshold``.
        surrogate: surrogate gradient shape (see ``models.surrogates``).
        surrogate_width: the surrogate's width: a for rectangular, alpha for sigmoid and atan,
            gamma for triangle; > 0.
    """

    tau_decay: float = 0.25
    # A str field, not a Leak: OmegaConf refuses a bool for an Enum field, and the true/false of
    # older configs, checkpoints and saved run configs must reach __post_init__ (as "True"/"False").
    leak: str = field(default=Leak.normal, metadata={"choices": tuple(e.value for e in Leak)})
    learnable_decay: bool = False
    reset: Reset = Reset.hard
    v_reset: float = 0.0
    detach_reset: bool = False
    recurrence: Recurrence = Recurrence.none
    v_threshold: float = 0.5
    learnable_threshold: bool = False
    surrogate: Surrogate = Surrogate.rectangular
    surrogate_width: float = 1.0

    @property
    def decay(self) -> float:
        """The membrane decay this config fixes: ``tau_decay``, 1 (leak none) or 0 (complete)."""
        return {Leak.normal: self.tau_decay, Leak.none: 1.0, Leak.complete: 0.0}[self.leak]

    def __post_init__(self) -> None:
        self.leak = Leak.parse(self.leak)
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
        for name in ("learnable_decay", "detach_reset", "learnable_threshold"):
            value = getattr(self, name)
            if not isinstance(value, bool):  # a string like "false" would silently be true
                raise NeuronConfigError(f"neuron.{name}: expected true or false, got {value!r}")
        if not 0.0 <= self.tau_decay <= 1.0:
            raise NeuronConfigError(f"neuron.tau_decay: {self.tau_decay} is outside [0, 1]")
        if self.learnable_decay and self.leak is not Leak.normal:
            raise NeuronConfigError(f"neuron.learnable_decay: needs leak normal (leak {self.leak.value} "
                                    "fixes the decay)")
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
