"""The choices a config may name for the networks, in the standard library only.

The config schema (``train.config``) checks ``model.name``, ``model.output`` and
``train.checkpointing`` against these without loading torch, timm or Triton. What the modes and
outputs do is in ``models.checkpointing`` and ``models.classifier``.
"""

from __future__ import annotations

__all__ = ["CHECKPOINTING_MODES", "OUTPUTS", "MODEL_NAMES", "FACTORY_FORM", "is_factory_path"]

#: Activation checkpointing of a network (``set_checkpointing``; see ``models.checkpointing``).
CHECKPOINTING_MODES = ("none", "blocks", "blocks+time")
#: What a network's forward returns: logits averaged over T, or per step [T, B, classes].
OUTPUTS = ("mean", "per_step")
#: The networks ``models.zoo`` registers with timm, sorted (``models.model_names()`` reads them
#: from timm's registry; a test keeps the two equal).
MODEL_NAMES = (
    "meta_spikeformer_8_256",
    "meta_spikeformer_8_384",
    "meta_spikeformer_8_512",
    "meta_spikeformer_cifar_8_256",
    "ms_resnet18",
    "ms_resnet34",
    "qkformer_10_384",
    "qkformer_10_512",
    "qkformer_10_768",
    "qkformer_cifar_4_384",
    "sew_resnet18",
    "sew_resnet34",
    "sew_resnet50",
    "spike_driven_10_512",
    "spike_driven_6_512",
    "spike_driven_8_384",
    "spike_driven_8_512",
    "spike_driven_8_768",
    "spike_driven_cifar_2_512",
    "spikformer_10_512",
    "spikformer_8_384",
    "spikformer_8_512",
    "spikformer_8_768",
    "spikformer_cifar_2_384",
    "spikformer_cifar_4_256",
    "spikformer_cifar_4_384",
    "spiking_mlp",
    "spiking_resnet18",
    "spiking_resnet19",
    "spiking_resnet34",
    "spiking_resnet50",
    "spiking_resnet_tiny",
    "spiking_wide_resnet34",
)

#: ``model.name`` may also name a brought network's factory in this form (``models.foreign``).
FACTORY_FORM = "package.module:factory"


def is_factory_path(name: str) -> bool:
    """Whether ``name`` has the ``package.module:factory`` form (a brought network, not a
    registered name); whether the module imports is checked when the model is built."""
    module, sep, attr = name.partition(":")
    return bool(sep) and all(part.isidentifier() for part in module.split(".")) and attr.isidentifier()
