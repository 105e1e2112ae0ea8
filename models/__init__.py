"""Spiking neuron dynamics, surrogate gradients, tdBN, spiking ResNets and MLPs, and firing
accounting.

Importing this package registers the spiking models with timm (``models.resnet``,
``models.sew_resnet``, ``models.ms_resnet``, ``models.mlp``).
"""

from models import mlp, ms_resnet, resnet, sew_resnet  # noqa: F401  (register the timm entry points)
from models.firing import firing_counts, firing_report, reset_firing_counts, set_firing_recording
from models.mlp import SpikingMLP
from models.neurons import (
    LIF,
    NeuronConfig,
    NeuronConfigError,
    Recurrence,
    Reset,
    Surrogate,
    lif_multistep,
    register_neuron_impl,
)
from models.tdbn import TdBN, fold_tdbn_into_conv
from models.deploy import NIRExportError, fold_model, load_folded, simulate_nir, to_nir
from models import kernels  # noqa: F401  (registers the fused Triton LIF neuron when Triton is installed)


def model_names() -> list[str]:
    """The networks this package registers with timm (every family), sorted."""
    import timm

    return sorted(name for name in timm.list_models()
                  if timm.models.model_entrypoint(name).__module__.startswith(f"{__name__}."))

__all__ = [
    "NeuronConfig",
    "NeuronConfigError",
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
