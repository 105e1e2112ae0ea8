"""One typed schema for every experiment: YAML + dotted overrides, validated, resolved, saved.

`load_config(path, overrides)` is the only place a config is parsed. Each room owns the dataclass
of its section (the neuron in `models`, the data in `data_pipelines`, tracking here in `train`);
this module composes them. A mistake a user can make (unknown key, wrong type, invalid choice,
missing file) raises `ConfigError` with one line naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipelines.loaders import DataConfig
from models.neurons import NeuronConfig
from train.tracking import TrackingConfig


class ConfigError(ValueError):
    """A user-fixable problem with the config: the message names the key and the remedy."""


def choice(default: str, *allowed: str) -> Any:
    """A str field restricted to `allowed` (checked after merging, message lists the values)."""
    return field(default=default, metadata={"choices": (default, *allowed)})


def at_least(default: int, minimum: int = 1) -> Any:
    """An int field with a lower bound (checked after merging)."""
    return field(default=default, metadata={"minimum": minimum})


@dataclass
class RunConfig:
    name: str = "default"          # run directory = <root>/<name>; reruns of a name resume it
    root: str = "runs"             # also holds the embedded MLflow store (mlflow.db)
    seed: int = 0                  # model init, data order (with the epoch), augmentation
    deterministic: bool = False    # torch.use_deterministic_algorithms, for bit-exact resume tests


@dataclass
class ModelConfig:
    name: str = "spiking_resnet_tiny"   # any model registered with timm by `models`
    T: int = at_least(4)                # timesteps; DVS data brings its own T, which must match
    num_classes: int = 0                # 0: take it from the dataset's meta.json
    in_chans: int = 0                   # 0: take it from the dataset's meta.json
    neuron: NeuronConfig = field(default_factory=NeuronConfig)


@dataclass
class OptimConfig:
    name: str = choice("sgd", "adamw")
    lr: float = 0.1                     # peak learning rate, for the global batch
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_decay_norm_bias: bool = True     # no weight decay on tdBN parameters and biases
    betas_1: float = 0.9
    betas_2: float = 0.999
    epochs: int = at_least(10)
    warmup_epochs: float = 0.0          # linear warmup, then cosine to min_lr
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float = 0.0              # max global grad norm; 0 disables clipping
    accumulate: int = at_least(1)       # micro-batches per optimizer step
    ema_decay: float = 0.0              # EMA of weights (e.g. 0.9998), evaluated beside the model; 0 = off
    mixup_alpha: float = 0.0            # timm Mixup on image batches; 0 = off
    cutmix_alpha: float = 0.0           # timm CutMix on image batches; 0 = off


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1                 # 0..3


@dataclass
class TrainConfig:
    strategy: str = choice("single", "ddp", "deepspeed")
    precision: str = choice("fp32", "bf16", "fp16")
    checkpointing: str = choice("none", "blocks", "blocks+time")  # activation checkpointing
    time_chunk: int = at_least(2)       # steps per recomputed chunk under blocks+time
    device: str = choice("auto", "cpu", "cuda")
    compile: bool = False               # torch.compile the model (Inductor); blocks alone when checkpointing
    checkpoint_every_steps: int = 0     # 0: only at epoch ends and on SIGTERM/SIGUSR2
    keep_checkpoints: int = at_least(3)
    resume: str = choice("auto", "never")
    max_nonfinite_steps: int = at_least(5)  # consecutive non-finite losses before the run stops
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_config(paths: str | Path | list[str | Path] | None, overrides: list[str] = ()) -> Config:
    """Schema defaults <- YAML file(s), later ones winning <- `key=value` overrides, validated.

    Several files compose an experiment from blocks, e.g. a paper config plus
    `configs/blocks/deepspeed_zero2.yaml`.
    """
    layers = [OmegaConf.structured(Config)]
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in map(Path, paths or []):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # YAML syntax errors from several libraries
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.05)")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from None
    _check_choices(cfg)
    return cfg


def _explain(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    if type(e).__name__ == "ConfigKeyError" or "not in" in msg:
        return f"unknown config key '{key}' ({msg}); see train/config.py for the schema"
    return f"config key '{key}': {msg}"


def _check_choices(node: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_choices(value, key + ".")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            allowed = ", ".join(f.metadata["choices"])
            raise ConfigError(f"config key '{key}': {value!r} is not one of: {allowed}")
        elif "minimum" in f.metadata and value < f.metadata["minimum"]:
            raise ConfigError(f"config key '{key}': must be >= {f.metadata['minimum']}, got {value}")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (enums as their values) — what is saved, logged and hashed."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def flat_items(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_items(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs. A key the saved config
    lacks (added to the schema after that run started) counts as unchanged while the current
    value is its default: the run behaved that way."""
    a, b = flat_items(saved), flat_items(current)
    defaults = flat_items(to_dict(Config()))
    for k in b.keys() - a.keys():
        if k in defaults:
            a[k] = defaults[k]
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
