"""Spiking neuron dynamics, surrogate gradients, tdBN, spiking ResNets and MLPs, and firing
accounting.

Importing this package, or one of its light modules (``models.neuron_config``, ``models.names``),
loads neither torch nor timm nor Triton: the names below load their module on first use
(PEP 562). ``import models.zoo`` registers every network with timm (``timm.create_model``) and the
fused neuron kernels with the neuron dispatch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

#: Each exported name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(("NeuronConfig", "NeuronConfigError", "Leak", "Reset", "Recurrence", "Surrogate"),
                    "models.neuron_config"),
    **dict.fromkeys(("LIF", "lif_multistep", "register_neuron_impl"), "models.neurons"),
    **dict.fromkeys(("TdBN", "fold_tdbn_into_conv"), "models.tdbn"),
    "SpikingMLP": "models.mlp",
    **dict.fromkeys(("fold_model", "load_folded", "to_nir", "simulate_nir", "NIRExportError"), "models.deploy"),
    **dict.fromkeys(("set_firing_recording", "reset_firing_counts", "firing_counts", "firing_report"),
                    "models.firing"),
}


def model_names() -> list[str]:
    """The networks this package registers with timm (every family), sorted, read from timm's
    registry; ``models.names.MODEL_NAMES`` lists the same without importing anything."""
    # Imported here, not at the top: importing the package stays light (no torch, timm, Triton).
    import timm

    import models.zoo  # noqa: F401  (registers them)

    return sorted(name for name in timm.list_models()
                  if timm.models.model_entrypoint(name).__module__.startswith(f"{__name__}."))


def __getattr__(name: str) -> Any:
    """An exported name, or a submodule (``models.resnet``), imported on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The loaded names and the exported ones (``__all__``)."""
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "NeuronConfig",
    "NeuronConfigError",
    "Leak",
    "Reset",
    "Recurrence",
    "Surrogate",
    "LIF",
    "lif_multistep",
    "register_neuron_impl",
    "TdBN",
    "fold_tdbn_into_conv",
    "SpikingMLP",
    "model_names",
    "fold_model",
    "load_folded",
    "to_nir",
    "simulate_nir",
    "NIRExportError",
    "set_firing_recording",
    "reset_firing_counts",
    "firing_counts",
    "firing_report",
]
