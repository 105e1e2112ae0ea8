"""Every network family, registered with timm, and the fused neuron kernels, registered with the
neuron dispatch: ``import models.zoo`` before ``timm.create_model(name, ...)``.

The families are ``models.resnet`` (tdBN ResNets), ``models.sew_resnet``, ``models.ms_resnet``,
``models.mlp`` and the spiking transformers ``models.spikformer``, ``models.spike_driven``
(Spike-driven Transformer v1 and Meta-SpikeFormer) and ``models.qkformer``; ``models.kernels``
registers the Triton LIF when Triton is installed.
"""

from models import kernels, mlp, ms_resnet, resnet, sew_resnet  # noqa: F401  (registers them)
from models import qkformer, spike_driven, spikformer  # noqa: F401  (registers them)
