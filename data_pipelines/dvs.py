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

Frame duration (the paper's temporal-resolution shift: train on N-MNIST at 3 ms frames, test at
1, 2, 5, 10 ms): with `frame_ms > 0` every recording is cut to one fixed time window,
`[t0, t0 + window_ms)` from its first event t0, and binned into frames of `frame_ms` each (tonic's
ToFrame with `time_window`), so T = window_ms / frame_ms; events after the window are dropped, and
a recording that ends early gets empty trailing frames. Every duration covers the same window, so
a recording holds the same events at 1 ms (T = 300) as at 10 ms (T = 30); only their grouping in
time changes. `eval_frame_ms` writes one extra validation split per further duration (the same
val recordings, the same window), named `val_<ms>ms` (`val_<ms>ms.beton`; ms written with
Python's `:g`, e.g. `val_1ms`, `val_2.5ms`) and listed in meta.json's `eval_splits` (see
`build_dvs`), so one checkpoint is evaluated at every duration without retraining.

FFCV (and the writer) are imported inside the builder and the pipelines, tonic inside the
readers: the registry imports this module for its spec when a config is checked.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from .common import DataError, staged_output, summary_line, write_report
from .meta import Meta
from .spec import DatasetSpec, PipelineArgs

DVS_SETS = ("nmnist", "dvsgesture", "cifar10dvs")
BIN_BY = ("events", "time")

#: Default time window per set when binning by frame duration, in ms: a multiple of every
#: duration the paper uses (1, 2, 3, 5, 10 ms). N-MNIST's three ~100 ms saccades take ~300 ms in
#: all; DVS Gesture recordings last ~6 s, of which 1.5 s holds several repetitions of a gesture;
#: CIFAR10-DVS recordings last ~1.2-1.3 s.
DEFAULT_WINDOW_MS = {"nmnist": 300.0, "dvsgesture": 1500.0, "cifar10dvs": 1200.0}


@dataclass
class DvsOptions:
    """How recordings become frames."""

    dvs_set: str = "cifar10dvs"  # nmnist | dvsgesture | cifar10dvs
    T: int = 10                  # frames per recording (tdBN's DVS-CIFAR10 uses 10)
    bin_by: str = "events"       # events: equal event counts per frame; time: equal durations
    size: int = 0                # longer side after spatial downsampling in px (0 = sensor's)
    split_seed: int = 0          # CIFAR10-DVS train/val split
    frame_ms: float = 0.0        # > 0: frames of this duration over window_ms; T = window / frame
    window_ms: float = 0.0       # the fixed window binned by duration (0 = DEFAULT_WINDOW_MS)
    eval_frame_ms: tuple[float, ...] = ()  # extra val splits at these durations (same window)


def frame_count(window_ms: float, frame_ms: float, what: str = "--frame-ms") -> int:
    """T = window_ms / frame_ms, both in ms; DataError unless both are whole microseconds and
    the window is a whole number of frames (a partial last frame would hold fewer events)."""
    window_us, frame_us = window_ms * 1000, frame_ms * 1000
    if frame_ms <= 0 or window_ms <= 0 or frame_us != int(frame_us) or window_us != int(window_us):
        raise DataError(f"{what} {frame_ms:g} / --window-ms {window_ms:g}: need positive "
                        f"durations in whole microseconds")
    if int(window_us) % int(frame_us):
        raise DataError(f"{what} {frame_ms:g} does not divide --window-ms {window_ms:g}: the "
                        f"window must be a whole number of frames")
    return int(window_us) // int(frame_us)


def eval_split_name(frame_ms: float) -> str:
    """Name of the extra validation split at `frame_ms` ms: `val_<ms>ms` (file `<name>.beton`)."""
    return f"val_{frame_ms:g}ms"


def add_options(parser: argparse.ArgumentParser) -> None:
    """`python -m data_pipelines.build dvs`'s options (read back by `options_from`)."""
    defaults = DvsOptions()
    parser.add_argument("--set", dest="dvs_set", choices=DVS_SETS, required=True)
    parser.add_argument("--T", type=int, default=None,
                        help=f"frames per recording (default {defaults.T}; by --frame-ms, "
                             f"T = window / frame)")
    parser.add_argument("--bin-by", choices=BIN_BY, default=defaults.bin_by,
                        help="equal event counts (default) or equal durations per frame")
    parser.add_argument("--frame-ms", type=float, default=defaults.frame_ms,
                        help="bin by frame duration: frames of FRAME_MS ms over a fixed window "
                             "(instead of --T and --bin-by)")
    parser.add_argument("--window-ms", type=float, default=defaults.window_ms,
                        help="that window in ms from each recording's first event (default: "
                             + ", ".join(f"{ms:g} {name}" for name, ms in DEFAULT_WINDOW_MS.items())
                             + ")")
    parser.add_argument("--eval-frame-ms", type=_durations, default=(),
                        help="comma-separated frame durations of extra val splits, e.g. 1,2,5,10")
    parser.add_argument("--size", type=int, default=defaults.size,
                        help="downsample so the longer side is SIZE px (0 = sensor size)")
    parser.add_argument("--split-seed", type=int, default=defaults.split_seed,
                        help="seed of CIFAR10-DVS's 9:1 per-class split")


def options_from(args: argparse.Namespace) -> DvsOptions:
    """The DvsOptions of a command line parsed with `add_options`."""
    if args.T is not None and args.frame_ms:
        raise DataError(f"--T {args.T} and --frame-ms {args.frame_ms:g}: give one (by frame "
                        f"duration, T = --window-ms / --frame-ms)")
    return DvsOptions(args.dvs_set, DvsOptions.T if args.T is None else args.T, args.bin_by,
                      args.size, args.split_seed, args.frame_ms, args.window_ms,
                      args.eval_frame_ms)


def build_from_args(args: argparse.Namespace, workers: int) -> Meta:
    """`python -m data_pipelines.build dvs ...`: build_dvs with the options `add_options` parsed."""
    return build_dvs(args.src, args.out, workers, options_from(args))


def _durations(text: str) -> tuple[float, ...]:
    """`--eval-frame-ms 1,2,5,10` -> (1.0, 2.0, 5.0, 10.0)."""
    try:
        return tuple(float(ms) for ms in text.split(",") if ms.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated ms, "
                                         f"e.g. 1,2,5,10") from None


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
    """path -> int16 event counts `[T, 2, H, W]`, in a worker process.

    `frame_us > 0`: T frames of `frame_us` microseconds each over `[t0, t0 + T * frame_us)`,
    t0 = the recording's first event; otherwise T bins by `bin_by`.
    """

    reader: Callable[[str], np.ndarray]
    sensor_size: tuple[int, int, int]
    target_size: tuple[int, int, int]
    T: int
    bin_by: str
    frame_us: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """One sample's frames: `[T, 2, H, W]`."""
        return (self.T, 2, self.target_size[1], self.target_size[0])

    dtype = np.dtype("int16")

    def __call__(self, path: str) -> np.ndarray:
        from tonic.transforms import Downsample, ToFrame

        events = self.reader(path)
        if len(events) < (1 if self.frame_us else self.T):
            raise ValueError(f"{len(events)} events, fewer than T={self.T} frames")
        if self.target_size != self.sensor_size:
            events = Downsample(sensor_size=self.sensor_size,
                                target_size=self.target_size[:2])(events)
        if self.frame_us:
            t0 = events["t"][0]
            bins = {"time_window": self.frame_us, "start_time": t0,
                    "end_time": t0 + self.T * self.frame_us}
        elif self.bin_by == "events":
            bins = {"n_event_bins": self.T}
        else:
            bins = {"n_time_bins": self.T}
        frames = ToFrame(sensor_size=self.target_size, **bins)(events)
        expected = self.shape
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


def bin_split(make: Callable, items: list[tuple[object, int]], buffer: Path, workers: int,
              desc: str) -> tuple[FrameSamples, list[int], list[tuple[str, str]]]:
    """Bin every recording in `workers` processes into a memory-mapped array at `buffer`.

    `make` maps an item's first entry (a path, or any picklable job) to one sample of shape
    `make.shape` and dtype `make.dtype` (FrameMaker; shd.SpikeBinner). Returns the samples, the
    indices that binned, and (str(job), reason) for those that did not. The array is
    memory-mapped so that a large set does not have to fit in RAM.
    """
    shape = (len(items), *make.shape)
    frames = np.lib.format.open_memmap(buffer, mode="w+", dtype=make.dtype, shape=shape)
    good, bad = [], []
    with get_context("fork").Pool(workers) as pool:
        results = pool.imap(_frames_or_reason, [(make, p) for p, _ in items], chunksize=4)
        for i, (array, reason) in enumerate(tqdm(results, total=len(items), desc=desc,
                                                 unit="rec")):
            if reason is None:
                frames[i] = array
                good.append(i)
            else:
                bad.append((str(items[i][0]), reason))
    frames.flush()
    return FrameSamples(frames, [label for _, label in items]), good, bad


def build_dvs(src: Path, out: Path, workers: int, options: DvsOptions) -> Meta:
    """Bin the recordings of `options.dvs_set` under `src` into frames in `out`; returns its Meta.

    By frame duration (`options.frame_ms > 0`) meta.json records `frame_ms` and `window_ms` (of
    train and val; T = window_ms / frame_ms) and `eval_splits`: for each further duration of
    `options.eval_frame_ms`, `{"val_<ms>ms": {"frame_ms": ms, "T": window_ms / ms}}`, whose
    samples (the val recordings binned at that duration) are in `val_<ms>ms.beton`, with their
    number in `counts` beside train and val. `eval_splits` is `{}` when there are none, and
    `frame_ms` is 0 when binning by `bin_by` instead.
    """
    from ffcv.fields import IntField, NDArrayField

    from .writer import write_beton

    ds = _dvs_set(options.dvs_set)
    if options.T < 1 or options.bin_by not in BIN_BY or options.size < 0:
        raise DataError(f"--T {options.T} / --bin-by {options.bin_by} / --size {options.size}: "
                        f"need T >= 1, bin-by one of {', '.join(BIN_BY)}, size >= 0")
    durations = _frame_durations(ds.name, options)  # {split: (frame_ms, T)}, train/val first
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
    frame_ms, T = durations["val"]
    details = {
        "source_path": str(root),
        "bin_by": "duration" if frame_ms else options.bin_by,
        "window_ms": T * frame_ms,
        "sensor_size": list(ds.sensor_size),
        "split": ({"method": "9:1 per class", "seed": options.split_seed}
                  if ds.name == "cifar10dvs" else {"method": "official"}),
    }
    eval_splits = {name: {"frame_ms": ms, "T": steps}
                   for name, (ms, steps) in durations.items() if name not in ("train", "val")}
    counts = {}
    with staged_output(out) as stage:
        for split, (ms, steps) in durations.items():
            make = FrameMaker(ds.reader, tuple(ds.sensor_size), target, steps, options.bin_by,
                              frame_us=int(ms * 1000))
            fields = {"frames": NDArrayField(make.dtype, make.shape), "label": IntField()}
            source = "train" if split == "train" else "val"  # eval splits rebin val recordings
            buffer = stage / f"{split}-frames.npy"
            samples, good, bad = bin_split(make, splits[source], buffer, workers,
                                           desc=f"binning {split}")
            skipped += bad
            if not good:
                raise DataError(f"none of the {len(splits[source])} {source} recordings under "
                                f"{root} could be read (first: {bad[0][1]})")
            write_beton(stage / f"{split}.beton", fields, samples, workers, indices=good,
                        page_size=_page_size(samples.frames[0].nbytes))
            counts[split] = len(good)
            del samples
            buffer.unlink()
        skipped = sorted(dict(skipped).items())  # eval splits fail on the same val files again
        meta = Meta(dataset="dvs", source=ds.name, num_classes=len(ds.classes),
                    classes=list(ds.classes), in_chans=2, height=target[1], width=target[0], T=T,
                    counts=counts, skipped=len(skipped), dtype="int16", frame_ms=frame_ms,
                    eval_splits=eval_splits, details=details)
        write_report(stage, skipped)
        meta.write(stage)
    print(summary_line(f"dvs/{ds.name}", out, counts, len(skipped)))
    return meta


def _frame_durations(name: str, options: DvsOptions) -> dict[str, tuple[float, int]]:
    """{split: (frame duration in ms, T)} for train, val and every eval split; (0, options.T)
    for train and val when binning by `bin_by`."""
    if not options.frame_ms:
        if options.eval_frame_ms or options.window_ms:
            raise DataError("--eval-frame-ms and --window-ms bin by frame duration: give "
                            "--frame-ms too")
        return {"train": (0.0, options.T), "val": (0.0, options.T)}
    window = options.window_ms or DEFAULT_WINDOW_MS[name]
    T = frame_count(window, options.frame_ms)
    durations = {"train": (float(options.frame_ms), T), "val": (float(options.frame_ms), T)}
    for ms in options.eval_frame_ms:
        name_ms = eval_split_name(ms)
        if ms == options.frame_ms or name_ms in durations:
            raise DataError(f"--eval-frame-ms {ms:g} is given twice or equals --frame-ms "
                            f"(val is already binned at {options.frame_ms:g} ms)")
        durations[name_ms] = (float(ms), frame_count(window, ms, "--eval-frame-ms"))
    return durations


def _page_size(sample_bytes: int) -> int:
    """Smallest FFCV page (power of two >= 2 MiB) holding a few samples."""
    from .writer import MIN_PAGE_SIZE

    page = MIN_PAGE_SIZE
    while page < 4 * sample_bytes:
        page *= 2
    return page


def train_pipelines(p: PipelineArgs) -> dict[str, list]:
    """x: float32 event counts `[T, B, 2, H, W]`, randomly flipped and shifted per sample
    (data.flip, data.translate); y: int64 `[B]`."""
    from .stages import EventFramesToFloat, NDArrayDecoder, ToDevice, ToTensor, label

    frames = [NDArrayDecoder(), ToTensor(), ToDevice(p.device, non_blocking=True),
              EventFramesToFloat(p.flip, p.translate, p.key)]
    return {"frames": frames, "label": label(p.device)}


def val_pipelines(p: PipelineArgs) -> dict[str, list]:
    """As in training, neither flipped nor shifted."""
    from .stages import EventFramesToFloat, NDArrayDecoder, ToDevice, ToTensor, label

    frames = [NDArrayDecoder(), ToTensor(), ToDevice(p.device, non_blocking=True),
              EventFramesToFloat(False, 0, p.key)]
    return {"frames": frames, "label": label(p.device)}


SPEC = DatasetSpec(
    name="dvs", kind="events", help="event data read with tonic, binned to T frames",
    build=build_from_args, train=train_pipelines, val=val_pipelines, options=add_options,
    # Not flipped by default: DVS Gesture's classes include left/right pairs.
    flip=False, translate=0)
