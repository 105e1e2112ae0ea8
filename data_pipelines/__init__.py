"""Data sets into FFCV .beton files, and FFCV loaders for the trainer.

Public API: `DataConfig`, `create_loader(cfg, split, *, rank, world_size, seed, device) ->
EpochLoader` (`.meta`, `.batches_per_epoch`, `.samples_per_epoch`, `.iterate(epoch,
start_batch)`), `DataError`; builders: `python -m data_pipelines.build <dataset> --out DIR`
(`data_pipelines.build.main(argv) -> int`).

The loaders (FFCV, numba, torch: seconds to import) load on first use, so that the config schema
imports `data_pipelines.config` and `data_pipelines.common` alone (PEP 562).
"""
from .common import DATASETS, DataError
from .config import DataConfig

__all__ = ["DATASETS", "DataConfig", "DataError", "EpochLoader", "create_loader"]


def __getattr__(name: str):
    if name in ("EpochLoader", "create_loader"):
        from . import loaders
        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
