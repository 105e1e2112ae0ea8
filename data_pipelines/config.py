"""The `data:` section of a run config and its checks: stdlib only, so that the config schema
(and `launch.submit` on a login node) reads it without importing FFCV, numba or torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .common import DATASETS, DataError


@dataclass
class DataConfig:
    """What to load and how (`data:` in the run config).

    Fields that only some data sets use say so; setting them for another data set is an error,
    except `flip`/`translate` whose `None` means "the data set's default".
    """

    dataset: str = "digits"       # digits | cifar10 | cifar100 | imagenet | dvs | seqdigits
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
    flip: Optional[bool] = None   # random horizontal flip in training (None: images yes, else no)
    translate: Optional[int] = None  # random shift up to N px in training, cifar/dvs
    #                                  (None: cifar 4 = the usual pad-4 random crop, else 0)


def default_flip(dataset: str) -> bool:
    """Flip natural images; never digits or event data (gesture classes are left/right pairs)."""
    return dataset in ("cifar10", "cifar100", "imagenet")


def default_translate(dataset: str) -> int:
    """CIFAR's standard augmentation is a 32 px crop of the 4-px padded image."""
    return 4 if dataset in ("cifar10", "cifar100") else 0


def check_data_config(cfg: DataConfig) -> None:
    """Raises DataError (one line naming the key) for a value no data set accepts."""
    if cfg.dataset not in DATASETS:
        raise DataError(f"data.dataset={cfg.dataset!r} is not one of {', '.join(DATASETS)}")
    if not cfg.path.strip():
        raise DataError("data.path is empty: give the directory `python -m data_pipelines.build` wrote")
    if cfg.batch_size < 1 or cfg.val_batch_size < 0:
        raise DataError(f"data.batch_size={cfg.batch_size}, data.val_batch_size="
                        f"{cfg.val_batch_size}: need batch_size >= 1 and val_batch_size >= 0")
    imagenet_only = {"resolution": cfg.resolution, "val_resolution": cfg.val_resolution,
                     "min_resolution": cfg.min_resolution}
    for key, value in imagenet_only.items():
        if value < 0 or (value and cfg.dataset != "imagenet"):
            raise DataError(f"data.{key}={value}: only imagenet images are resized "
                            f"(leave it 0 for {cfg.dataset})")
    if cfg.min_resolution and cfg.ramp_end_epoch < cfg.ramp_start_epoch:
        raise DataError(f"data.ramp_end_epoch={cfg.ramp_end_epoch} is before "
                        f"data.ramp_start_epoch={cfg.ramp_start_epoch}")
    if cfg.flip and cfg.dataset in ("digits", "seqdigits"):
        raise DataError(f"data.flip=true: handwritten digits ({cfg.dataset}) are not "
                        f"mirror-symmetric; flip applies to cifar10, cifar100, imagenet and dvs")
    if cfg.translate is not None and (cfg.translate < 0 or (
            cfg.translate and cfg.dataset not in ("cifar10", "cifar100", "dvs"))):
        raise DataError(f"data.translate={cfg.translate}: random translation applies to "
                        f"cifar10, cifar100 and dvs only")
