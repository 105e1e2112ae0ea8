"""Spiking neuron dynamics, surrogate gradients, tdBN, spiking ResNets and MLPs, and firing
accounting.

Importing this package registers the spiking models with timm (``models.resnet``,
``models.mlp``).
"""

from models import mlp, resnet  # noqa: F401  (register the timm entry points)
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
from models import kernels  # noqa: F401  (registers the fused Triton LIF neuron when Triton is installed)

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
    "set_firing_recording",
    "reset_firing_counts",
    "firing_counts",
    "firing_report",
]
