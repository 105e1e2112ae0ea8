"""Writing samples into one FFCV .beton file (the only on-disk format the loaders read)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol, Sequence

import numpy as np
from ffcv.fields import Field
from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

from .common import eprint


class IndexedSamples(Protocol):
    """What the FFCV writer's worker processes index: sample i -> one value per field."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple: ...


class ArraySamples:
    """Samples held in memory as arrays: `images[i]` (any shape) with integer label `labels[i]`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def write_beton(path: Path, fields: Mapping[str, Field], samples: IndexedSamples, workers: int,
                chunksize: int = 100, indices: Sequence[int] | None = None,
                page_size: int = 4 * MIN_PAGE_SIZE) -> None:
    """Write `samples` (in `indices` order, default all) to the FFCV file `path`.

    FFCV forks `workers` processes that each call `samples[i]` and encode the fields, and shows
    a tqdm progress bar. Each worker fills whole pages of `page_size` bytes (a power of two,
    >= 2 MiB, larger than any one sample), so small sets want the minimum. Every sample must be readable: the builders drop unreadable inputs
    before calling this, because FFCV waits forever for a sample whose worker died.
    """
    n = len(samples) if indices is None else len(indices)
    eprint(f"writing {path.name}: {n} samples with {workers} worker processes")
    writer = DatasetWriter(str(path), dict(fields), page_size=page_size, num_workers=workers)
    # Small chunks keep all workers busy on small sets (the digits have ~1400 samples).
    chunksize = max(1, min(chunksize, -(-n // workers)))
    writer.from_indexed_dataset(samples, indices=None if indices is None else list(indices),
                                chunksize=chunksize)
