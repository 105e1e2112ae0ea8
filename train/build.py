"""The network of a run, built from its config and its data set's meta: the one recipe the
trainer (`train.engine`), the evaluation (`train.evaluate`) and the export (`train.export`) share.
"""
from __future__ import annotations

from typing import Any

import timm
from torch import nn

from data_pipelines.meta import Meta
from data_pipelines.registry import spec as data_spec
import models.zoo  # noqa: F401  (registers the spiking networks with timm)
from models.foreign import ForeignModelError, build_foreign, is_factory_path
from train.config import Config, ConfigError


def model_kwargs(cfg: Config, meta: Meta) -> dict[str, Any]:
    """The factory arguments of `cfg.model.name` (`timm.create_model(name, **these)`)."""
    return dict(T=cfg.model.T, neuron=cfg.model.neuron, num_classes=cfg.model.num_classes or meta.num_classes,
                in_chans=cfg.model.in_chans or meta.in_chans, **cfg.model.args)


def build_model(cfg: Config, meta: Meta) -> nn.Module:
    """The run's network with its checkpointing mode and output form set, weights at init: a
    registered one, or a brought one for `model.name=package.module:factory` (`models.foreign`)."""
    if is_factory_path(cfg.model.name):
        return _build_foreign(cfg, meta)
    try:  # load_config checked the name; the factories check their own arguments
        model = timm.create_model(cfg.model.name, **model_kwargs(cfg, meta))
    except (TypeError, ValueError) as e:  # the factories name the argument in one line
        raise ConfigError(f"config key 'model.args': {str(e).splitlines()[0]}") from None
    model.set_checkpointing(cfg.train.checkpointing, cfg.train.time_chunk)
    model.set_output(cfg.model.output)
    model.set_readout(meta.readout_from)  # delayed XOR: loss and accuracy after its second pattern
    return model


def _build_foreign(cfg: Config, meta: Meta) -> nn.Module:
    """The brought network (imported only now: the config named it, this machine must have it),
    called with `model.args` and, where its factory takes them, num_classes, in_chans and T."""
    # One step of one sample: [C, H, W] for images and frames (variable-size images too), [F] else.
    step_dims = 3 if meta.height or data_spec(meta.dataset).resolution is not None else 1
    try:
        model = build_foreign(cfg.model.name, T=cfg.model.T, num_classes=cfg.model.num_classes or meta.num_classes,
                              in_chans=cfg.model.in_chans or meta.in_chans, step_dims=step_dims,
                              args=cfg.model.args)
    except ForeignModelError as e:
        raise ConfigError(f"config key 'model.name': {e}") from None
    try:
        model.set_checkpointing(cfg.train.checkpointing, cfg.train.time_chunk)
    except ForeignModelError as e:
        raise ConfigError(f"config key 'train.checkpointing': {e}") from None
    model.set_output(cfg.model.output)
    model.set_readout(meta.readout_from)
    return model
