"""The choices a config may name for the networks, in the standard library only.

The config schema (``train.config``) checks ``model.name``, ``model.output`` and
``train.checkpointing`` against these without loading torch, timm or Triton. What the modes and
outputs do is in ``models.checkpointing`` and ``models.classifier``.
"""

from __future__ import annotations

__all__ = ["CHECKPOINTING_MODES", "OUTPUTS", "MODEL_NAMES"]

#: Activation checkpointing of a network (``set_checkpointing``; see ``models.checkpointing``).
CHECKPOINTING_MODES = ("none", "blocks", "blocks+time")
#: What a network's forward returns: logits averaged over T, or per step [T, B, classes].
OUTPUTS = ("mean", "per_step")
#: The networks ``models.zoo`` registers with timm, sorted (``models.model_names()`` reads them
#: from timm's registry; a test keeps the two equal).
MODEL_NAMES = (
    "ms_resnet18",
    "ms_resnet34",
    "sew_resnet18",
    "sew_resnet34",
    "sew_resnet50",
    "spiking_mlp",
    "spiking_resnet18",
    "spiking_resnet19",
    "spiking_resnet34",
    "spiking_resnet50",
    "spiking_resnet_tiny",
    "spiking_wide_resnet34",
)
