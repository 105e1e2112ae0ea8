"""FFCV loaders for every data set, built from one typed config by `create_loader`.

The order in which samples are seen is planned here, not by FFCV: it is a pure function of
(seed, epoch, rank, world_size), each rank reads a disjoint shard, and a resumed run can start
mid-epoch by skipping planned batches without decoding them. FFCV then decodes exactly that
order. Every augmentation (crop, flip, translation) of a sample is a function of (seed, epoch,
the sample's index in the data set) (transforms.py), so a sample looks the same whichever rank,
batch size or resumed batch reads it. One FFCV `Loader` (whose numba pipeline costs seconds to
compile) is built per split and resolution and reused every epoch and seed, so an epoch starts in
milliseconds. What a loader decodes, and how, is the data set's spec (registry.py): its train or
val pipelines, its augmentation defaults, its resizing schedule.
"""

from __future__ import annotations

import dataclasses
import math
import queue
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator
from ffcv.traversal_order.base import TraversalOrder

from .common import TRAIN_FILE, VAL_FILE, DataError, resolve_workers
from .config import DataConfig, check_data_config
from .meta import Meta
from .registry import build_command, read_meta, spec
from .spec import PipelineArgs
from .transforms import AugmentKey

SPLIT_FILES = {"train": TRAIN_FILE, "val": VAL_FILE}


def train_order(num_samples: int, batch_size: int, seed: int, epoch: int, rank: int,
                world_size: int) -> np.ndarray:
    """Sample indices rank `rank` trains on in `epoch`, in order; length = batches * batch_size.

    One permutation of all samples per (seed, epoch), shared by every rank; rank r takes every
    world_size-th entry starting at r, after dropping the tail that would not fill a batch on
    every rank (drop_last). Shards are therefore disjoint and equal in size.
    """
    batches = num_samples // (batch_size * world_size)
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    return perm[:batches * batch_size * world_size][rank::world_size]


def val_shard(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Sample indices rank `rank` evaluates: a contiguous block; the blocks of all ranks cover
    every sample exactly once (sizes differ by at most one, no padding duplicates)."""
    bounds = [num_samples * r // world_size for r in range(world_size + 1)]
    return np.arange(bounds[rank], bounds[rank + 1])


#: Compiled FFCV loaders of this process (see `EpochLoader._ffcv_loader`). Keeping them alive
#: also keeps numba from finalising pipeline functions it compiled several times, which logs
#: spurious KeyErrors.
_FFCV_LOADERS: dict[tuple, Loader] = {}


class _PlannedOrder(TraversalOrder):
    """FFCV traversal order that replays what `EpochLoader.iterate` planned for an epoch: the
    sample indices, and the (seed, epoch) `augment_key` the loader's random stages read.

    FFCV's own orders shard with torch's DistributedSampler, which pads shards with duplicates
    and cannot start mid-epoch; handing FFCV the exact list avoids both.
    """

    def __init__(self, loader: Loader, augment_key: AugmentKey):
        super().__init__(loader)
        self.planned = np.asarray(loader.indices)
        self.augment_key = augment_key

    def plan(self, indices: np.ndarray, seed: int, epoch: int) -> None:
        """Read `indices` next, augmented as epoch `epoch` of run seed `seed`."""
        self.planned = indices
        self.augment_key.set(seed, epoch)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.planned


class EpochLoader:
    """Batches of one split for one rank; `iterate(epoch, start_batch)` is the whole interface.

    Attributes: `meta` (the build's `Meta`; for an extra evaluation split, with that split's T
    and frame_ms), `spec` (the data set's `DatasetSpec`: its kind, pipelines, defaults),
    `split`, `batch_size`, `batches_per_epoch` and `samples_per_epoch` (this rank's).
    """

    def __init__(self, cfg: DataConfig, split: str, meta: Meta, beton: Path, *, rank: int,
                 world_size: int, seed: int, device: torch.device, augment: bool = True):
        self.cfg = cfg
        self.split = split
        self.meta = meta
        self.spec = spec(meta.dataset)
        self.beton = beton
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device = device
        self.num_workers = resolve_workers(cfg.num_workers)
        self.num_samples = int(meta.counts[split])
        # Training order and augmentation; the training split read with augment=False is
        # planned and decoded like validation (every sample once, centre crops, no flips).
        self.train = split == "train" and augment
        if self.train:
            self.batch_size = cfg.batch_size
            self.batches_per_epoch = self.num_samples // (self.batch_size * world_size)
            if self.batches_per_epoch == 0:
                raise DataError(f"data.batch_size={cfg.batch_size} x {world_size} ranks exceeds the "
                                f"{self.num_samples} training samples in {beton}; lower data.batch_size")
            self.samples_per_epoch = self.batches_per_epoch * self.batch_size
        else:
            self.batch_size = cfg.val_batch_size or cfg.batch_size
            self.samples_per_epoch = len(val_shard(self.num_samples, rank, world_size))
            self.batches_per_epoch = math.ceil(self.samples_per_epoch / self.batch_size)
        self.flip = bool(self.spec.flip) if cfg.flip is None else cfg.flip
        self.translate = (self.spec.translate or 0) if cfg.translate is None else cfg.translate
        # Where the random stages of the pipelines this loader builds read (seed, epoch) from;
        # a loader reusing another's compiled pipelines keys them through its traversal order.
        self._augment_key = AugmentKey()

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, in the order `iterate` yields them."""
        if self.train:
            return train_order(self.num_samples, self.batch_size, self.seed, epoch, self.rank,
                               self.world_size)
        return val_shard(self.num_samples, self.rank, self.world_size)

    def resolution(self, epoch: int) -> int | None:
        """Output image size in px at `epoch` (resizing sets, ImageNet; None = the stored size)."""
        if self.spec.resolution is None:
            return None
        return self.spec.resolution(self.cfg, self.train, epoch)

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield `(x, y)` on the device for batches `start_batch ..` of `epoch` on this rank.

        x: by the spec's kind: "image", float32 `[B, C, H, W]` (RGB ones with channels-last
        strides), normalised with meta's mean/std; "events", `[T, B, 2, H, W]` event counts per
        frame; "sequence", contiguous `[T, B, F]` (seqdigits: `[8, B, 8]` image rows).
        y: int64 `[B]` labels.
        The tensors live in FFCV's reusable buffers: they stay valid until the next batch is
        requested (clone to keep them longer). Run one epoch at a time per process: loaders
        with the same pipeline share one compiled FFCV loader.
        """
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch={start_batch} outside 0..{self.batches_per_epoch}")
        order = self.order(epoch)[start_batch * self.batch_size:]
        if len(order) == 0:
            return
        loader = self._ffcv_loader(self.resolution(epoch))
        loader.traversal_order.plan(order, self.seed, epoch)
        with _torch_threads_kept():
            batches = iter(loader)
        try:
            yield from _checked(batches)
        finally:
            batches.close()  # stops FFCV's decoding thread when the consumer leaves early

    def _ffcv_loader(self, resolution: int | None) -> Loader:
        """The FFCV loader for `resolution`, compiled once per process and configuration.

        Loaders that differ only in seed, rank or order share one (order, seed and epoch are
        handed over per epoch), so a test or a restarted trainer in the same process does not
        recompile; a subclass with other pipelines gets its own.
        """
        stat = self.beton.stat()
        key = (type(self), str(self.beton.resolve()), stat.st_ino, stat.st_mtime_ns, self.split,
               self.train, self.batch_size, self.num_workers, str(self.device), resolution, self.flip,
               self.translate)
        if key not in _FFCV_LOADERS:
            with _torch_threads_kept():
                loader = Loader(str(self.beton), batch_size=self.batch_size,
                                num_workers=self.num_workers, order=OrderOption.SEQUENTIAL,
                                drop_last=False, pipelines=self._pipelines(resolution))
            loader.traversal_order = _PlannedOrder(loader, self._augment_key)
            _FFCV_LOADERS[key] = loader
        return _FFCV_LOADERS[key]

    def _pipelines(self, resolution: int | None) -> dict[str, list]:
        """The FFCV pipeline of each field: the spec's train pipelines when training, else its
        val pipelines; their random stages read (seed, epoch) from `self._augment_key`."""
        build = self.spec.train if self.train else self.spec.val
        return build(PipelineArgs(self.meta, self.device, self._augment_key,
                                  flip=self.train and self.flip,
                                  translate=self.translate if self.train else 0,
                                  resolution=resolution))


@contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """FFCV sets torch's intra-op threads to its decode workers (at construction and at every
    epoch); the model's arithmetic must not follow `data.num_workers`, or its reduction order, hence
    its bits, would change with it. The decode threads (numba's) stay FFCV's."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _checked(batches: EpochIterator) -> Iterator[tuple[torch.Tensor, ...]]:
    """FFCV's `EpochIterator.__next__`, except that it raises when the decoding thread died.

    FFCV's own waits forever on its queue if a pipeline stage raises in the thread.
    """
    while True:
        try:
            item = batches.output_queue.get(timeout=1.0)
        except queue.Empty:
            if batches.is_alive():
                continue
            raise RuntimeError("FFCV's decoding thread died before the end of the epoch "
                               "(its traceback is printed above)") from None
        if item is None:
            return
        slot, result = item
        if IS_CUDA:  # the batch was produced on a side stream
            batches.current_stream.wait_stream(batches.cuda_streams[slot])
        yield result


def _check_call(cfg: DataConfig, rank: int, world_size: int) -> None:
    check_data_config(cfg)  # load_config ran it already; direct callers (tests, tools) get it too
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")


def create_loader(cfg: DataConfig, split: str, *, rank: int = 0, world_size: int = 1,
                  seed: int = 0, device: torch.device = torch.device("cpu"),
                  augment: bool = True) -> EpochLoader:
    """Loader of `split` ("train", "val", or an extra evaluation split the build lists in
    `Meta.eval_splits`, read as val is) of the data set in `cfg.path` for one rank.

    `augment=False` reads the training split as validation is read (every sample once in file
    order, sharded in blocks, no random crop, flip or translation): what measures how well a
    model fits its training data (the generalisation gap).

    Raises `DataError` (one line) when the files are missing or do not match `cfg`.
    """
    _check_call(cfg, rank, world_size)
    path = Path(cfg.path)
    meta = read_meta(path, cfg.dataset)
    if meta.dataset != cfg.dataset:
        raise DataError(f"data.dataset={cfg.dataset} but {path} holds {meta.dataset}; "
                        f"point data.path at a {cfg.dataset} build")
    if split in meta.eval_splits:  # the same recordings at another T (frame duration)
        shifted = meta.eval_splits[split]
        meta = dataclasses.replace(meta, T=int(shifted["T"]), frame_ms=float(shifted["frame_ms"]))
        beton = path / f"{split}.beton"
    elif split in SPLIT_FILES:
        beton = path / SPLIT_FILES[split]
    else:
        extra = "".join(f", {name!r}" for name in meta.eval_splits)
        raise ValueError(f"split={split!r}; expected 'train', 'val'{extra}")
    if not beton.is_file():
        raise DataError(f"{beton} is missing; rebuild with "
                        f"{build_command(cfg.dataset, path)} --force")
    return EpochLoader(cfg, split, meta, beton, rank=rank, world_size=world_size, seed=seed,
                       device=torch.device(device), augment=augment)
