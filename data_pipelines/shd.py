"""Spiking Heidelberg Digits (SHD) and Spiking Speech Commands (SSC), from their published HDF5 files.

Cramer et al., "The Heidelberg spiking data sets for the systematic evaluation of spiking neural
networks", IEEE TNNLS 2020: spoken digits (SHD, 20 classes: 0-9 in English and German) and
speech commands (SSC, 35 classes) turned into spikes of 700 cochlear channels. Each file holds
per sample `spikes/times` (float seconds from the start of the recording) and `spikes/units`
(channel ids 0..699), `labels` (int), and `extra/keys` (the class names).

Input (`--src`): the decompressed files, in `--src` itself or in `--src/SHD` / `--src/SSC`
(tonic's folders)::

    shd_train.h5  shd_test.h5                   -> train, val
    ssc_train.h5  ssc_valid.h5  ssc_test.h5     -> train, val, test (an extra evaluation split)

SHD has no validation file, so its val split is the test file (as in the SHD literature); SSC's
val is its validation file (what the trainer's best-checkpoint choice may see) and its test file
becomes the extra split `test`, listed in Meta.eval_splits.

Reading: with h5py, as `tonic.datasets.hsd.HSD.__getitem__` reads a sample (times to integer
microseconds, tonic's event dtype). tonic's SHD/SSC classes themselves are not used: they
download unless the .zip archive lies beside the .h5 file, and they reopen the file (never
closing it) for every sample.

Binning (tonic's ToFrame with `time_window`): a fixed window `[0, window_ms)` from the start of
each recording, cut into T frames of `window_ms / T` ms each; every frame holds the number of
spikes of each channel in it (counts, not clipped to 1: at 10 ms frames a channel fires up to a
few times). Spikes at or after the window's end are dropped; a shorter recording ends in empty
frames. A sample is stored as uint8 `[T, 700]` in the field `sequence` (a sample with more than
255 spikes of one channel in one frame is skipped and reported), and fed to the model unscaled
(Meta mean 0, std 1): the loader yields float32 spike counts `[T, B, 700]`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import DataError, staged_output, summary_line, write_report
from .meta import Meta
from .seqdigits import sequence_pipelines
from .spec import DatasetSpec

CHANNELS = 700

#: The published files of each set: split -> file name. "train" and "val" are the trainer's
#: splits; any other is an extra evaluation split (Meta.eval_splits).
FILES = {
    "shd": {"train": "shd_train.h5", "val": "shd_test.h5"},
    "ssc": {"train": "ssc_train.h5", "val": "ssc_valid.h5", "test": "ssc_test.h5"},
}
FOLDERS = {"shd": "SHD", "ssc": "SSC"}  # tonic's folder names under its save_to


@dataclass
class ShdOptions:
    """How spike trains become frames."""

    T: int = 100                # frames per sample (the model's time steps)
    window_ms: float = 1000.0   # the fixed window from each recording's start, in ms

    @property
    def frame_ms(self) -> float:
        """Duration of one frame in ms."""
        return self.window_ms / self.T


@dataclass(frozen=True)
class SampleRef:
    """Sample `index` of the HDF5 file at `path` (what the binning workers are handed)."""

    path: str
    index: int

    def __str__(self) -> str:  # the skip report's first column
        return f"{self.path}[{self.index}]"


#: HDF5 files opened by this process, by (pid, path): a binning worker keeps its files open
#: across samples. h5py handles must not cross a fork, so a forked worker never uses one its
#: parent opened (the key's pid differs) and opens its own.
_OPEN: dict[tuple[int, str], object] = {}


def _h5(path: str):
    import h5py

    key = (os.getpid(), path)
    if key not in _OPEN:
        _OPEN[key] = h5py.File(path, "r")
    return _OPEN[key]


def read_spikes(path: str, index: int) -> np.ndarray:
    """Sample `index` of an SHD/SSC file as tonic's structured events (t in integer us,
    x = channel, p = 1), converted exactly as `tonic.datasets.hsd.HSD.__getitem__` does."""
    from tonic.datasets.hsd import HSD
    from tonic.io import make_structured_array

    file = _h5(path)
    times = np.asarray(file["spikes/times"][index], dtype=np.float64)
    units = np.asarray(file["spikes/units"][index])
    if times.shape != units.shape or times.ndim != 1:
        raise ValueError(f"spikes/times {times.shape} and spikes/units {units.shape} differ")
    if len(units) and (units.min() < 0 or units.max() >= CHANNELS):
        raise ValueError(f"channel ids {units.min()}..{units.max()} outside 0..{CHANNELS - 1}")
    if not np.isfinite(times).all() or (len(times) and times.min() < 0):
        raise ValueError("spike times that are negative or not finite")
    events = make_structured_array(times * 1e6, units, 1, dtype=HSD.dtype)
    # tonic's time slicing searches sorted timestamps; the published files are sorted already.
    if np.any(np.diff(events["t"]) < 0):
        events = events[np.argsort(events["t"], kind="stable")]
    return events


@dataclass(frozen=True)
class SpikeBinner:
    """SampleRef -> uint8 spike counts `[T, 700]` over `[0, T * frame_us)` (in a worker)."""

    T: int
    frame_us: int
    dtype = np.dtype("uint8")

    @property
    def shape(self) -> tuple[int, int]:
        """One sample: `[T, 700]`."""
        return (self.T, CHANNELS)

    def __call__(self, ref: SampleRef) -> np.ndarray:
        from tonic.datasets.hsd import HSD
        from tonic.transforms import ToFrame

        events = read_spikes(ref.path, ref.index)
        if not len(events):  # ToFrame returns one frame for no events, not T empty ones
            return np.zeros(self.shape, self.dtype)
        frames = ToFrame(sensor_size=HSD.sensor_size, time_window=self.frame_us, start_time=0,
                         end_time=self.T * self.frame_us)(events)  # [T, 1, 700] int16
        if frames.shape != (self.T, 1, CHANNELS):
            raise ValueError(f"binned to {frames.shape}, expected {(self.T, 1, CHANNELS)}")
        if frames.max() > np.iinfo(self.dtype).max:
            raise ValueError(f"{frames.max()} spikes of one channel in one frame, more than "
                             f"uint8 holds")
        return frames[:, 0].astype(self.dtype)


def find_files(name: str, src: Path) -> dict[str, Path]:
    """{split: path} of set `name`'s files under `src` or `src/<SHD|SSC>`; DataError naming
    the files it expects when any is missing."""
    files = FILES[name]
    for folder in (src, src / FOLDERS[name]):
        paths = {split: folder / file for split, file in files.items()}
        if all(p.is_file() for p in paths.values()):
            return paths
    raise DataError(f"no {name} files under {src}: expected {', '.join(files.values())} in --src "
                    f"or --src/{FOLDERS[name]} (the published .h5 files, decompressed; nothing "
                    f"is downloaded)")


def read_labels(path: Path) -> tuple[np.ndarray, list[str]]:
    """(labels int64 `[N]`, class names from `extra/keys`, or [] when the file has none);
    DataError when the file is not an HDF5 file in the published layout."""
    import h5py

    try:
        with h5py.File(path, "r") as file:
            missing = [k for k in ("spikes/times", "spikes/units", "labels") if k not in file]
            if missing:
                raise DataError(f"{path} lacks {', '.join(missing)}: not an SHD/SSC file "
                                f"(spikes/times, spikes/units, labels)")
            n_times, n_units = len(file["spikes/times"]), len(file["spikes/units"])
            labels = np.asarray(file["labels"][()], dtype=np.int64)
            keys = file["extra/keys"][()] if "extra/keys" in file else []
    except OSError as e:  # h5py's error for a file that is not HDF5, or is truncated
        raise DataError(f"{path} is not a readable HDF5 file ({e})") from None
    if not n_times == n_units == len(labels):
        raise DataError(f"{path}: {n_times} spike times, {n_units} unit arrays, {len(labels)} "
                        f"labels; expected one of each per sample")
    names = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
    return labels, names


def build_shd(name: str, src: Path, out: Path, workers: int, options: ShdOptions) -> Meta:
    """Bin set `name` ("shd" or "ssc") from the HDF5 files under `src` into `out`; returns Meta.

    Meta: T, in_chans = 700, frame_ms = window_ms / T, mean [0] / std [1] (counts unscaled),
    counts per split, and for SSC eval_splits = {"test": {"frame_ms": frame_ms, "T": T}}.
    """
    from ffcv.fields import IntField, NDArrayField

    from .dvs import _page_size, bin_split
    from .writer import write_beton

    if options.T < 1 or options.window_ms <= 0:
        raise DataError(f"--T {options.T} / --window-ms {options.window_ms:g}: need T >= 1 and "
                        f"a positive window")
    frame_us = options.window_ms * 1000 / options.T
    if frame_us != int(frame_us):
        raise DataError(f"--window-ms {options.window_ms:g} / --T {options.T} = "
                        f"{frame_us:g} us: frames must last whole microseconds")
    paths = find_files(name, src)
    labels, classes = {}, []
    for split, path in paths.items():
        labels[split], names = read_labels(path)
        classes = classes or names
    num_classes = len(classes) or int(max(y.max(initial=-1) for y in labels.values())) + 1
    for split, y in labels.items():
        if len(y) == 0 or y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"{paths[split]}: {len(y)} samples, labels outside 0..{num_classes - 1}"
                            f" or none at all")
    classes = classes or [str(c) for c in range(num_classes)]

    binner = SpikeBinner(options.T, int(frame_us))
    fields = {"sequence": NDArrayField(binner.dtype, binner.shape), "label": IntField()}
    counts, skipped = {}, []
    with staged_output(out) as stage:
        for split, path in paths.items():
            items = [(SampleRef(str(path), i), int(y)) for i, y in enumerate(labels[split])]
            buffer = stage / f"{split}-sequences.npy"
            samples, good, bad = bin_split(binner, items, buffer, workers, desc=f"binning {split}")
            skipped += bad
            if not good:
                raise DataError(f"none of the {len(items)} samples of {path} could be read "
                                f"(first: {bad[0][1]})")
            write_beton(stage / f"{split}.beton", fields, samples, workers, indices=good,
                        page_size=_page_size(samples.frames[0].nbytes))
            counts[split] = len(good)
            del samples
            buffer.unlink()
        meta = Meta(
            dataset=name, source=str(paths["train"].parent), num_classes=num_classes,
            classes=classes, in_chans=CHANNELS, T=options.T, counts=counts, dtype="uint8",
            mean=[0.0], std=[1.0], skipped=len(skipped), frame_ms=options.frame_ms,
            eval_splits={split: {"frame_ms": options.frame_ms, "T": options.T}
                         for split in paths if split not in ("train", "val")},
            details={"window_ms": options.window_ms,
                     "values": "spike counts per (frame, channel), not clipped to 1",
                     "files": {split: p.name for split, p in paths.items()},
                     "split": {"method": "official"}})
        write_report(stage, skipped)
        meta.write(stage)
    print(summary_line(name, out, counts, len(skipped)))
    return meta


def add_options(parser: argparse.ArgumentParser) -> None:
    """`python -m data_pipelines.build shd|ssc`'s options."""
    defaults = ShdOptions()
    parser.add_argument("--T", type=int, default=defaults.T,
                        help="frames per sample; each lasts WINDOW_MS / T ms")
    parser.add_argument("--window-ms", type=float, default=defaults.window_ms,
                        help="the window binned from each recording's start, in ms")


def _builder(name: str):
    def build(args: argparse.Namespace, workers: int) -> Meta:
        return build_shd(name, args.src, args.out, workers, ShdOptions(args.T, args.window_ms))
    return build


SHD = DatasetSpec(
    name="shd", kind="sequence",
    help="Spiking Heidelberg Digits (shd_train.h5, shd_test.h5), binned to [T, 700] spike counts",
    build=_builder("shd"), train=sequence_pipelines, val=sequence_pipelines, options=add_options,
    no_flip_reason="cochlear channels are ordered by frequency, not mirror-symmetric")
SSC = DatasetSpec(
    name="ssc", kind="sequence",
    help="Spiking Speech Commands (ssc_train/valid/test.h5), binned to [T, 700] spike counts",
    build=_builder("ssc"), train=sequence_pipelines, val=sequence_pipelines, options=add_options,
    no_flip_reason="cochlear channels are ordered by frequency, not mirror-symmetric")
