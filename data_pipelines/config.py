"""The `data:` section of a run config and its checks: stdlib only, so that the config schema
(and `launch.submit` on a login node) reads it without importing FFCV, numba or torch. Which
keys apply to which data set, and their defaults, come from the data set's spec (registry.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .common import DataError
from .registry import DATASETS, spec
from .spec import DatasetSpec


@dataclass
class DataConfig:
    """What to load and how (`data:` in the run config).

    Fields that only some data sets use say so; setting them for another data set is an error,
    except `flip`/`translate` whose `None` means "the data set's default".
    """

    dataset: str = field(default="digits", metadata={"choices": DATASETS})  # registry.py's names
    path: str = "data/digits"     # directory with train.beton, val.beton, meta.json
    batch_size: int = 64          # per rank
    val_batch_size: int = 0       # per rank; 0 = batch_size
    num_workers: int = -1         # FFCV decode threads (torch's own threads are the trainer's);
    #                               -1 = all cores available to this rank
    resolution: int = 0           # imagenet: train crop size in px (0 = 224); others must be 0
    val_resolution: int = 0       # imagenet: val centre-crop output size (0 = 224)
    min_resolution: int = 0       # imagenet progressive resizing: start size (0 = off)
    ramp_start_epoch: int = 0     # progressive resizing: last epoch at min_resolution
    ramp_end_epoch: int = 0       # progressive resizing: first epoch at resolution
    flip: Optional[bool] = None   # random horizontal flip in training (None: the data set's
    #                               default: cifar, imagenet yes; dvs no; others do not flip)
    translate: Optional[int] = None  # random shift up to N px in training, cifar/dvs
    #                                  (None: the data set's default: cifar 4 = the usual
    #                                  pad-4 random crop, dvs 0)


def check_data_config(cfg: DataConfig) -> None:
    """Raises DataError (one line naming the key) for a value no data set accepts."""
    data_set = spec(cfg.dataset)  # DataError naming the choices for an unknown name
    if not cfg.path.strip():
        raise DataError("data.path is empty: give the directory `python -m data_pipelines.build` wrote")
    if cfg.batch_size < 1 or cfg.val_batch_size < 0:
        raise DataError(f"data.batch_size={cfg.batch_size}, data.val_batch_size="
                        f"{cfg.val_batch_size}: need batch_size >= 1 and val_batch_size >= 0")
    imagenet_only = {"resolution": cfg.resolution, "val_resolution": cfg.val_resolution,
                     "min_resolution": cfg.min_resolution}
    for key, value in imagenet_only.items():
        if value < 0 or (value and data_set.resolution is None):
            raise DataError(f"data.{key}={value}: only {_sets(lambda s: s.resolution is not None)} images are resized "
                            f"(leave it 0 for {cfg.dataset})")
    if cfg.min_resolution and cfg.ramp_end_epoch < cfg.ramp_start_epoch:
        raise DataError(f"data.ramp_end_epoch={cfg.ramp_end_epoch} is before "
                        f"data.ramp_start_epoch={cfg.ramp_start_epoch}")
    if cfg.flip and data_set.flip is None:
        raise DataError(f"data.flip=true: {data_set.no_flip_reason or cfg.dataset + ' is not flipped'}; "
                        f"flip applies to {_sets(lambda s: s.flip is not None)}")
    if cfg.translate is not None and (cfg.translate < 0 or (
            cfg.translate and data_set.translate is None)):
        raise DataError(f"data.translate={cfg.translate}: random translation applies to "
                        f"{_sets(lambda s: s.translate is not None)} only")


def _sets(applies: Callable[[DatasetSpec], bool]) -> str:
    """The data sets whose spec `applies` to, for error messages: "cifar10, cifar100, dvs"."""
    return ", ".join(name for name in DATASETS if applies(spec(name)))
