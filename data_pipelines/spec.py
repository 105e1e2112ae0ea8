"""`DatasetSpec`: everything that makes one data set, in one record its own module defines.

A spec names the set, says its kind, points at its builder and its FFCV pipelines, and gives its
augmentation defaults; `registry.py` lists the specs, and the config's choices and checks, the
builder's command line and the loaders all read them from there. Stdlib only (the config schema
imports the registry on a login node): FFCV, tonic and torch are imported inside the builders and
the pipeline functions, never at a data set module's top.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .meta import Meta

KINDS = ("image", "sequence", "events")


@dataclass(frozen=True)
class PipelineArgs:
    """What one loader's pipelines are built from."""

    meta: Meta
    device: Any                 # torch.device the batches land on
    key: Any                    # transforms.AugmentKey: the (seed, epoch) random stages read
    flip: bool                  # random horizontal flip (training only; False in validation)
    translate: int              # random shift up to this many px (training only; 0 in validation)
    resolution: Optional[int]   # output size in px of resizing sets (ImageNet), else None


#: A data set's FFCV pipelines: field name -> list of stages, as ffcv-imagenet writes them.
Pipelines = Callable[[PipelineArgs], dict[str, list]]


def no_options(parser: argparse.ArgumentParser) -> None:
    """A builder with no options beyond --out, --force and --workers (and --src)."""


@dataclass(frozen=True)
class DatasetSpec:
    """One data set: its name, kind, builder, pipelines and augmentation defaults.

    `build(args, workers)` writes the set into `args.out` (the parsed command line of
    `python -m data_pipelines.build <name>`, with the options `options` added) and returns its
    `Meta`. `train` and `val` return the pipelines of the training and validation split; the
    training split read without augmentation (`create_loader(augment=False)`) uses `val`.
    """

    name: str                   # data.dataset, and the builder's first argument
    kind: str                   # image | sequence ([T, B, F]) | events ([T, B, 2, H, W])
    help: str                   # one line for `python -m data_pipelines.build --help`
    build: Callable[[argparse.Namespace, int], Meta]
    train: Pipelines
    val: Pipelines
    options: Callable[[argparse.ArgumentParser], None] = no_options
    needs_src: bool = True      # False: generated or shipped by a package (no --src)
    flip: Optional[bool] = None        # data.flip's default; None: flipping does not apply
    translate: Optional[int] = None    # data.translate's default in px; None: does not apply
    # Sets whose loader resizes (ImageNet): (DataConfig, train, epoch) -> output size in px;
    # data.resolution, val_resolution and min_resolution apply to them only. None: stored size.
    resolution: Optional[Callable[[Any, bool, int], int]] = None
    no_flip_reason: str = ""    # why flipping does not apply (the config error says it)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"DatasetSpec {self.name!r}: kind {self.kind!r} is not one of {KINDS}")

    def build_command(self, out: object) -> str:
        """The shell command that builds this set into `out` (quoted in error messages)."""
        src = " --src SRC" if self.needs_src else ""
        return f"python -m data_pipelines.build {self.name}{src} --out {out}"
