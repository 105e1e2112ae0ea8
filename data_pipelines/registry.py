"""The data sets this package builds and loads: one `DatasetSpec` per set, listed in `SPECS`.

How to add a data set (`name`):
 1. Write `data_pipelines/<name>.py` with its builder, its pipelines and
    `SPEC = DatasetSpec(name=..., kind="image" | "sequence" | "events", help=..., build=...,
    train=..., val=..., ...)` (spec.py says what each field means; digits.py is the smallest
    example, delayed_xor.py a generated sequence set with builder options). The builder returns the `Meta` it wrote
    (`Meta(...).write(stage)` last, inside `staged_output`). Import FFCV, tonic and torch inside
    the builder and pipeline functions (`from .stages import ...`), never at the module's top:
    the config schema imports this registry on a login node.
 2. Add `<name>.SPEC` to `SPECS` below.
Nothing else: `data.dataset`'s choices, `python -m data_pipelines.build <name>`, the flip /
translate / mixup checks and the loaders follow from the spec.
"""

from __future__ import annotations

from pathlib import Path

from . import cifar, delayed_xor, digits, dvs, imagenet, mnist1d, seqdigits, shd
from .common import DataError
from .meta import Meta
from .spec import DatasetSpec

SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    digits.SPEC,
    cifar.CIFAR10,
    cifar.CIFAR100,
    imagenet.SPEC,
    dvs.SPEC,
    seqdigits.SPEC,
    shd.SHD,
    shd.SSC,
    delayed_xor.SPEC,
    mnist1d.SPEC,
)}

#: The data sets' names (`DataConfig.dataset`'s choices, the builder's first argument).
DATASETS = tuple(SPECS)


def spec(name: str) -> DatasetSpec:
    """The spec of data set `name`; `DataError` naming the choices when there is none."""
    if name not in SPECS:
        raise DataError(f"data.dataset={name!r} is not one of {', '.join(DATASETS)}")
    return SPECS[name]


def build_command(dataset: str, out: str | Path) -> str:
    """The shell command that builds `dataset` into `out` (quoted in error messages)."""
    if dataset in SPECS:
        return SPECS[dataset].build_command(out)
    return f"python -m data_pipelines.build {dataset} --out {out}"


def read_meta(directory: str | Path, dataset: str = "DATASET") -> Meta:
    """`Meta.read` of a build of `dataset`: its errors name the command that (re)builds it."""
    return Meta.read(directory, build_command(dataset, directory))
