"""Data sets into FFCV .beton files, and FFCV loaders for the trainer.

Public API: `DataConfig`, `create_loader(cfg, split, *, rank, world_size, seed, device) ->
EpochLoader` (`.meta`, `.batches_per_epoch`, `.samples_per_epoch`, `.iterate(epoch,
start_batch)`), `DataError`; builders: `python -m data_pipelines.build <dataset> --out DIR`
(`data_pipelines.build.main(argv) -> int`).
"""

from .common import DATASETS, DataError
from .loaders import DataConfig, EpochLoader, create_loader

__all__ = ["DATASETS", "DataConfig", "DataError", "EpochLoader", "create_loader"]
