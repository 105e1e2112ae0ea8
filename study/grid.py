"""The study's runs: every variant of the config's grid x every seed, and the one name of a variant.

A variant is one point of the grid (`study.preset`, or `study.grid` with preset custom; see
`train.config.StudyConfig`): a level per factor, the factor being the last part of the config key
(`model.neuron.leak` -> `leak`). Its name lists them in grid order, `leak=normal,reset=hard,
recurrence=none`; `variant_name` writes it and `parse_variant` reads it, nothing else does. A
variant x seed is one run, named `<run.name>-<variant>-seed<seed>`, with `run.seed` set to the seed
(so the seed drives initialisation, data order, augmentation and the attacks' random starts of that
run; a generated data set is fixed per split, built once from its builder's own seed, so that every
seed is measured on the same samples) and MLflow tags `variant`, `seed` and `sweep_id`.

Standard library and the config schema only: `launch.submit` and `study.report` import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from train.config import ConfigError, StudyConfig, grid_points

_RESERVED = ",="  # a level holding one of these could not be parsed back


def factor(key: str) -> str:
    """'model.neuron.leak' -> 'leak'."""
    return key.rpartition(".")[2]


def variant_name(levels: Mapping[str, str]) -> str:
    """{'model.neuron.leak': 'normal', 'model.neuron.reset': 'hard'} (config keys or factors, in
    grid order) -> 'leak=normal,reset=hard'."""
    parts = []
    for key, value in levels.items():
        value = str(value)
        if any(c in value for c in _RESERVED) or not value:
            raise ConfigError(f"config key 'study.grid.{key}': level {value!r} may not be empty or hold ',' or '='")
        parts.append(f"{factor(key)}={value}")
    return ",".join(parts)


def parse_variant(name: str) -> dict[str, str]:
    """'leak=normal,reset=hard' -> {'leak': 'normal', 'reset': 'hard'}; ValueError if not a name
    `variant_name` writes."""
    levels = {}
    for part in name.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key or not value or key in levels:
            raise ValueError(f"{name!r} is not a study variant name (factor=level,factor=level,...)")
        levels[key] = value
    return levels


@dataclass(frozen=True)
class StudyRun:
    """One variant x seed: its run name and the overrides that make it from the base config."""
    variant: str
    seed: int
    name: str
    overrides: list[str] = field(hash=False)
    levels: dict[str, str] = field(hash=False)  # factor -> level


def variants(study: StudyConfig) -> list[tuple[str, dict[str, str]]]:
    """(name, {config key: level}) of every variant of the grid, the first key varying slowest."""
    out = []
    for point in grid_points(study.axes()):
        levels = dict(p.partition("=")[::2] for p in point)
        out.append((variant_name(levels), levels))
    return out


def study_runs(study: StudyConfig, base_name: str, sweep_id: str) -> list[StudyRun]:
    """Every variant x seed, seed by seed (a study stopped half-way has whole grids of the first
    seeds); each run's overrides set its grid point, `run.seed`, `run.name` and its tags."""
    runs = []
    for seed in study.seed_list():
        for name, levels in variants(study):
            run_name = f"{base_name}-{name}-seed{seed}"
            overrides = [*(f"{k}={v}" for k, v in levels.items()), f"run.seed={seed}", f"run.name={run_name}",
                         f"tracking.tags.sweep_id={sweep_id}", f"tracking.tags.variant='{name}'",
                         f"tracking.tags.seed='{seed}'"]
            runs.append(StudyRun(name, seed, run_name, overrides, {factor(k): v for k, v in levels.items()}))
    return runs
