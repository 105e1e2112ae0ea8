"""Data sets into FFCV .beton files, and FFCV loaders for the trainer.

Public API: `DataConfig`, `create_loader(cfg, split, *, rank, world_size, seed, device) ->
EpochLoader` (`.meta`, `.spec`, `.batches_per_epoch`, `.samples_per_epoch`, `.iterate(epoch,
start_batch)`), `DataError`, `Meta` (a build's meta.json), the data sets' specs
(`registry.SPECS`, `registry.spec(name)`); builders: `python -m data_pipelines.build <dataset>
--out DIR` (`data_pipelines.build.main(argv) -> int`).

The loaders (FFCV, numba, torch: seconds to import) load on first use, so that the config schema
imports `data_pipelines.config` and the registry alone (PEP 562).
"""
from .common import DataError
from .config import DataConfig
from .meta import Meta
from .registry import DATASETS

__all__ = ["DATASETS", "DataConfig", "DataError", "EpochLoader", "Meta", "create_loader"]


def __getattr__(name: str):
    if name in ("EpochLoader", "create_loader"):
        from . import loaders
        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
