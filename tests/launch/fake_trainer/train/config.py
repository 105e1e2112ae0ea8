"""The few config keys launch/ reads, with the real schema's error type and messages."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    name: str = "fake"
    root: str = "runs"


@dataclass
class TrackingConfig:
    uri: Optional[str] = None
    experiment: str = "fake"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    steps: int = 20          # training steps in total
    step_s: float = 0.2      # seconds per step
    finish_s: float = 0.0    # seconds after the last step (final eval, uploads): a stop signal then changes nothing
    tags: dict = field(default_factory=dict)


def load_config(paths, overrides=()) -> Config:
    """One path or a list, like the real schema's load_config (the launcher passes a list)."""
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
    cfg = Config()
    for item in overrides:
        key, _, value = item.partition("=")
        if key in ("run.name", "run.root"):
            setattr(cfg.run, key.split(".")[1], value)
        elif key in ("steps", "step_s", "finish_s"):
            setattr(cfg, key, type(getattr(cfg, key))(value))
        elif key.startswith("tracking.tags."):
            cfg.tags[key.split(".", 2)[2]] = value
        else:
            raise ConfigError(f"unknown config key '{key}'")
    return cfg
