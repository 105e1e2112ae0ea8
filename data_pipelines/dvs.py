"""Event-camera data sets, read with tonic from files already on disk, binned to T frames.

Input: tonic's `save_to` directory (or the data set's own directory inside it) with the files
extracted as tonic's data set classes expect them. This module never downloads: it uses tonic's
readers and frame binning, not the data set classes (which download when files look missing).

- N-MNIST      NMNIST/Train/<digit>/*.bin, NMNIST/Test/<digit>/*.bin  (34x34; 5-byte events)
- DVS Gesture  DVSGesture/ibmGestureTrain/user<NN>_<lighting>/<label>.npy, ibmGestureTest/...
               (128x128; tonic's preprocessed [N, 4] arrays x, y, p, t in ms)
- CIFAR10-DVS  CIFAR10DVS/<class>/*.aedat4  (128x128; no official split: 9:1 per class with a
               fixed seed). Reading .aedat4 needs the `aedat` package; packets may be
               uncompressed, LZ4 or zstd (the IOHeader says which).

Each recording becomes int16 event counts `[T, 2, H, W]` (tonic's ToFrame): by default T bins
holding equal numbers of events, or with `bin_by="time"` T bins of equal duration. Optional
spatial downsampling (tonic's Downsample) maps the sensor to `size` px on its longer side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np
from ffcv.fields import IntField, NDArrayField
from tqdm import tqdm

from .common import (FORMAT_VERSION, META_FILE, TRAIN_FILE, VAL_FILE, DataError, staged_output,
                     summary_line, write_json, write_report)
from .writer import MIN_PAGE_SIZE, write_beton

DVS_SETS = ("nmnist", "dvsgesture", "cifar10dvs")
BIN_BY = ("events", "time")


@dataclass
class DvsOptions:
    """How recordings become frames."""

    dvs_set: str = "cifar10dvs"  # nmnist | dvsgesture | cifar10dvs
    T: int = 10                  # frames per recording (tdBN's DVS-CIFAR10 uses 10)
    bin_by: str = "events"       # events: equal event counts per frame; time: equal durations
    size: int = 0                # longer side after spatial downsampling in px (0 = sensor's)
    split_seed: int = 0          # CIFAR10-DVS train/val split


# --- readers: path -> tonic structured event array (fields x, y, t, p) ---------------------

def read_nmnist(path: str) -> np.ndarray:
    """N-MNIST .bin: 5 bytes per event; a length that is not a multiple of 5 is a truncated file
    (tonic would silently read misaligned events from it)."""
    import tonic.io
    from tonic.datasets import NMNIST

    size = os.path.getsize(path)
    if size % 5:
        raise ValueError(f"truncated: {size} bytes is not a whole number of 5-byte events")
    return tonic.io.read_mnist_file(path, dtype=NMNIST.dtype)


def read_dvsgesture(path: str) -> np.ndarray:
    """tonic's DVSGesture .npy, converted exactly as `tonic.datasets.DVSGesture.__getitem__`."""
    from numpy.lib import recfunctions
    from tonic.datasets import DVSGesture

    events = np.load(path)
    if events.ndim != 2 or events.shape[1] != 4:
        raise ValueError(f"array of shape {events.shape}, expected [N, 4] (x, y, p, t)")
    events[:, 3] *= 1000  # ms -> us
    return recfunctions.unstructured_to_structured(events, DVSGesture.dtype)


def read_cifar10dvs(path: str) -> np.ndarray:
    """CIFAR10-DVS .aedat4, as `tonic.datasets.CIFAR10DVS.__getitem__` reads it.

    The aedat decoder reports a file cut inside a packet as a bare "failed to fill whole buffer"
    RuntimeError; the skip report says what that means. (A file cut exactly between packets
    reads as a shorter recording: AEDAT4 without a file-data table has no total length.)
    """
    import tonic.io

    try:
        events = tonic.io.read_aedat4(path)
    except RuntimeError as e:  # aedat's only error type: bad header, packet or flatbuffer
        raise ValueError(f"truncated or corrupt AEDAT4 file ({e})") from None
    events.dtype.names = ["t", "x", "y", "p"]
    return events


@dataclass(frozen=True)
class DvsSet:
    name: str
    folder: str                    # tonic's folder name under save_to
    sensor_size: tuple[int, int, int]  # W, H, P
    classes: tuple[str, ...]
    reader: Callable[[str], np.ndarray]
    layout: str                    # shown in the "files not found" error


def _dvs_set(name: str) -> DvsSet:
    from tonic.datasets import CIFAR10DVS, DVSGesture, NMNIST

    if name == "nmnist":
        return DvsSet("nmnist", "NMNIST", NMNIST.sensor_size, tuple(NMNIST.classes), read_nmnist,
                      "NMNIST/Train/<digit>/*.bin and NMNIST/Test/<digit>/*.bin")
    if name == "dvsgesture":
        return DvsSet("dvsgesture", "DVSGesture", DVSGesture.sensor_size,
                      tuple(DVSGesture.classes), read_dvsgesture,
                      "DVSGesture/ibmGestureTrain/user<NN>_<lighting>/<label>.npy and "
                      "DVSGesture/ibmGestureTest/...")
    if name == "cifar10dvs":
        return DvsSet("cifar10dvs", "CIFAR10DVS", CIFAR10DVS.sensor_size,
                      tuple(CIFAR10DVS.classes), read_cifar10dvs, "CIFAR10DVS/<class>/*.aedat4")
    raise DataError(f"--set {name}: expected one of {', '.join(DVS_SETS)}")


# --- listing: where the files are and what their labels are ---------------------------------

def _walk(root: Path, suffix: str) -> list[str]:
    found = []
    for path, dirs, files in os.walk(root):
        dirs.sort()
        found += [os.path.join(path, f) for f in sorted(files) if f.endswith(suffix)]
    return found


def _labelled(paths: list[str], label_of: Callable[[str], int | None]
              ) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    items, bad = [], []
    for p in paths:
        label = label_of(p)
        if label is None:
            bad.append((p, "no label in its path"))
        else:
            items.append((p, label))
    return items, bad


def list_recordings(ds: DvsSet, root: Path, split_seed: int
                    ) -> tuple[dict[str, list[tuple[str, int]]], list[tuple[str, str]]]:
    """{"train": [(path, label)], "val": [...]} in tonic's layout, and unlabellable files."""
    if ds.name == "nmnist":
        def digit(p: str) -> int | None:
            d = Path(p).parent.name
            return int(d) if d.isdigit() and int(d) < 10 else None
        train, bad_t = _labelled(_walk(root / "Train", ".bin"), digit)
        val, bad_v = _labelled(_walk(root / "Test", ".bin"), digit)
        return {"train": train, "val": val}, bad_t + bad_v
    if ds.name == "dvsgesture":
        def gesture(p: str) -> int | None:
            stem = Path(p).stem
            return int(stem) if stem.isdigit() and int(stem) < len(ds.classes) else None
        train, bad_t = _labelled(_walk(root / "ibmGestureTrain", ".npy"), gesture)
        val, bad_v = _labelled(_walk(root / "ibmGestureTest", ".npy"), gesture)
        return {"train": train, "val": val}, bad_t + bad_v
    # CIFAR10-DVS: per class, a seeded permutation of the sorted files; the first 10% are val.
    train, val = [], []
    for label, name in enumerate(ds.classes):
        files = _walk(root / name, ".aedat4")
        perm = np.random.default_rng([split_seed, label]).permutation(len(files))
        n_val = int(round(len(files) / 10))
        val += [(files[i], label) for i in sorted(perm[:n_val])]
        train += [(files[i], label) for i in sorted(perm[n_val:])]
    return {"train": train, "val": val}, []


def find_root(ds: DvsSet, src: Path) -> Path:
    """tonic's folder for `ds`: `src` itself if it is that folder, else `src/<folder>`."""
    return src if src.name == ds.folder else src / ds.folder


# --- binning -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FrameMaker:
    """path -> int16 event counts `[T, 2, H, W]`, in a worker process."""

    reader: Callable[[str], np.ndarray]
    sensor_size: tuple[int, int, int]
    target_size: tuple[int, int, int]
    T: int
    bin_by: str

    def __call__(self, path: str) -> np.ndarray:
        from tonic.transforms import Downsample, ToFrame

        events = self.reader(path)
        if len(events) < self.T:
            raise ValueError(f"{len(events)} events, fewer than T={self.T} frames")
        if self.target_size != self.sensor_size:
            events = Downsample(sensor_size=self.sensor_size,
                                target_size=self.target_size[:2])(events)
        bins = {"n_event_bins": self.T} if self.bin_by == "events" else {"n_time_bins": self.T}
        frames = ToFrame(sensor_size=self.target_size, **bins)(events)
        expected = (self.T, 2, self.target_size[1], self.target_size[0])
        if frames.shape != expected:
            raise ValueError(f"binned to {frames.shape}, expected {expected}")
        return frames


def _frames_or_reason(job: tuple[FrameMaker, str]) -> tuple[np.ndarray | None, str | None]:
    make, path = job
    try:
        return make(path), None
    except Exception as e:  # any unreadable recording is one skipped input
        return None, f"{type(e).__name__}: {e}".replace("\n", " ")


class FrameSamples:
    """(frames, label) read back from the memory-mapped array the binning pass filled."""

    def __init__(self, frames: np.ndarray, labels: list[int]):
        self.frames = frames
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return np.ascontiguousarray(self.frames[index]), self.labels[index]


def bin_split(make: FrameMaker, items: list[tuple[str, int]], buffer: Path, workers: int,
              desc: str) -> tuple[FrameSamples, list[int], list[tuple[str, str]]]:
    """Bin every recording in `workers` processes into a memory-mapped array at `buffer`.

    Returns the samples, the indices that binned, and (path, reason) for those that did not.
    The array is memory-mapped so that a large set does not have to fit in RAM.
    """
    shape = (len(items), make.T, 2, make.target_size[1], make.target_size[0])
    frames = np.lib.format.open_memmap(buffer, mode="w+", dtype=np.int16, shape=shape)
    good, bad = [], []
    with get_context("fork").Pool(workers) as pool:
        results = pool.imap(_frames_or_reason, [(make, p) for p, _ in items], chunksize=4)
        for i, (array, reason) in enumerate(tqdm(results, total=len(items), desc=desc,
                                                 unit="rec")):
            if reason is None:
                frames[i] = array
                good.append(i)
            else:
                bad.append((items[i][0], reason))
    frames.flush()
    return FrameSamples(frames, [label for _, label in items]), good, bad


def build_dvs(src: Path, out: Path, workers: int, options: DvsOptions) -> dict:
    """Bin the recordings of `options.dvs_set` under `src` into frames in `out`; returns meta."""
    ds = _dvs_set(options.dvs_set)
    if options.T < 1 or options.bin_by not in BIN_BY or options.size < 0:
        raise DataError(f"--T {options.T} / --bin-by {options.bin_by} / --size {options.size}: "
                        f"need T >= 1, bin-by one of {', '.join(BIN_BY)}, size >= 0")
    root = find_root(ds, src)
    splits, skipped = list_recordings(ds, root, options.split_seed)
    if not splits["train"] or not splits["val"]:
        raise DataError(f"no {ds.name} recordings under {root}: expected {ds.layout} under "
                        f"--src (tonic's layout, already extracted; nothing is downloaded)")
    if ds.name == "cifar10dvs":
        try:
            import aedat  # noqa: F401  (tonic.io.read_aedat4 imports it per file)
        except ImportError:
            raise DataError("reading CIFAR10-DVS .aedat4 files needs the `aedat` package "
                            "(pip install aedat)") from None

    width, height, _ = ds.sensor_size
    scale = options.size / max(width, height) if options.size else 1.0
    target = (int(round(width * scale)), int(round(height * scale)), 2)
    make = FrameMaker(ds.reader, tuple(ds.sensor_size), target, options.T, options.bin_by)
    meta = {
        "format_version": FORMAT_VERSION,
        "dataset": "dvs",
        "source": ds.name,
        "source_path": str(root),
        "num_classes": len(ds.classes),
        "classes": list(ds.classes),
        "in_chans": 2,
        "height": target[1],
        "width": target[0],
        "T": options.T,
        "bin_by": options.bin_by,
        "sensor_size": list(ds.sensor_size),
        "dtype": "int16",
        "split": ({"method": "9:1 per class", "seed": options.split_seed}
                  if ds.name == "cifar10dvs" else {"method": "official"}),
    }
    fields = {"frames": NDArrayField(np.dtype("int16"), (options.T, 2, target[1], target[0])),
              "label": IntField()}
    counts = {}
    with staged_output(out) as stage:
        for split, name in (("train", TRAIN_FILE), ("val", VAL_FILE)):
            buffer = stage / f"{split}-frames.npy"
            samples, good, bad = bin_split(make, splits[split], buffer, workers,
                                           desc=f"binning {split}")
            skipped += bad
            if not good:
                raise DataError(f"none of the {len(splits[split])} {split} recordings under "
                                f"{root} could be read (first: {bad[0][1]})")
            write_beton(stage / name, fields, samples, workers, indices=good,
                        page_size=_page_size(samples.frames[0].nbytes))
            counts[split] = len(good)
            del samples
            buffer.unlink()
        meta.update(counts=counts, skipped=len(skipped))
        write_report(stage, skipped)
        write_json(stage / META_FILE, meta)
    print(summary_line(f"dvs/{ds.name}", out, counts, len(skipped)))
    return meta


def _page_size(sample_bytes: int) -> int:
    """Smallest FFCV page (power of two >= 2 MiB) holding a few samples."""
    page = MIN_PAGE_SIZE
    while page < 4 * sample_bytes:
        page *= 2
    return page
