"""DVS builder on N-MNIST .bin, DVS Gesture .npy and CIFAR10-DVS .aedat4 files written in the
formats tonic reads."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from data_pipelines import DataConfig, create_loader
from data_pipelines.build import main as build_main
from data_pipelines.dvs import _dvs_set, list_recordings

T = 4


def _events(rng, n, size):
    """n events on a size x size sensor, time-ordered, in microseconds."""
    x = rng.integers(0, size, n)
    y = rng.integers(0, size, n)
    t = np.sort(rng.choice(np.arange(1, 300_000), n, replace=False))
    p = rng.integers(0, 2, n)
    return x, y, t, p


def _write_nmnist(path, x, y, t, p):
    """N-MNIST's 40-bit events: x, y, then polarity bit 7 + 23-bit timestamp (big-endian)."""
    record = np.zeros((len(x), 5), np.uint8)
    record[:, 0], record[:, 1] = x, y
    record[:, 2] = (p << 7) | ((t >> 16) & 0x7F)
    record[:, 3], record[:, 4] = (t >> 8) & 0xFF, t & 0xFF
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(record.tobytes())


def _write_gesture(path, x, y, t, p):
    """tonic's preprocessed DVS Gesture sample: [N, 4] columns x, y, p, t in milliseconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.stack([x, y, p, t // 1000], axis=1).astype(np.int64))


def _expected_frames(x, y, p, size, scale=1.0):
    """Count-binned frames computed independently of tonic: T bins of n/T consecutive events."""
    frames = np.zeros((T, 2, size, size), np.int16)
    per_bin = len(x) // T
    for i in range(per_bin * T):
        frames[i // per_bin, p[i], int(y[i] * scale), int(x[i] * scale)] += 1
    return frames


@pytest.fixture(scope="module")
def nmnist(tmp_path_factory):
    """tonic's NMNIST layout: 3 digits x 3 train, 1 test each, plus one truncated .bin."""
    root = tmp_path_factory.mktemp("dvs_src")
    rng = np.random.default_rng(0)
    samples = {"train": [], "val": []}
    for split, folder, per_digit in (("train", "Train", 3), ("val", "Test", 1)):
        for digit in range(3):
            for i in range(per_digit):
                events = _events(rng, T * int(rng.integers(10, 40)), 34)
                path = root / "NMNIST" / folder / str(digit) / f"{i:05d}.bin"
                _write_nmnist(path, *events)
                samples[split].append((path, digit, events))
    bad = root / "NMNIST" / "Train" / "1" / "99999.bin"
    _write_nmnist(bad, *_events(rng, 40, 34))
    bad.write_bytes(bad.read_bytes()[:-2])  # cut inside the last event
    return root, samples


@pytest.fixture(scope="module")
def nmnist_build(nmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("nmnist_out")
    assert build_main(["dvs", "--set", "nmnist", "--src", str(nmnist[0]), "--out", str(out),
                       "--T", str(T), "--workers", "2"]) == 0
    return out


def _all(loader, epoch=0):
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader.iterate(epoch)])
    return torch.cat(xs, dim=1), torch.cat(ys)


def test_nmnist_frames_round_trip_time_major(nmnist_build, nmnist):
    loader = create_loader(DataConfig(dataset="dvs", path=str(nmnist_build), batch_size=2,
                                      num_workers=1), "val")
    assert loader.meta.T == T and loader.meta.in_chans == 2
    assert (loader.meta.height, loader.meta.width) == (34, 34)
    x, y = _all(loader)
    assert x.shape == (T, 3, 2, 34, 34) and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 2]
    for b, (_, _, (ex, ey, _, ep)) in enumerate(nmnist[1]["val"]):
        expected = torch.from_numpy(_expected_frames(ex, ey, ep, 34)).float()
        assert torch.equal(x[:, b], expected)


def test_truncated_event_file_is_skipped_and_reported(nmnist_build):
    meta = json.loads((nmnist_build / "meta.json").read_text())
    assert meta["counts"] == {"train": 9, "val": 3} and meta["skipped"] == 1
    (line,) = (nmnist_build / "skipped.txt").read_text().splitlines()
    assert line.split("\t")[0].endswith("Train/1/99999.bin") and "truncated" in line


def test_downsampling_and_time_bins(nmnist, tmp_path):
    out = tmp_path / "small"
    assert build_main(["dvs", "--set", "nmnist", "--src", str(nmnist[0] / "NMNIST"), "--out",
                       str(out), "--T", str(T), "--size", "17", "--workers", "1"]) == 0
    loader = create_loader(DataConfig(dataset="dvs", path=str(out), batch_size=3,
                                      num_workers=1), "val")
    x, _ = _all(loader)
    assert x.shape == (T, 3, 2, 17, 17)
    for b, (_, _, (ex, ey, _, ep)) in enumerate(nmnist[1]["val"]):
        assert torch.equal(x[:, b], torch.from_numpy(_expected_frames(ex, ey, ep, 17, 0.5)).float())

    by_time = tmp_path / "time"
    assert build_main(["dvs", "--set", "nmnist", "--src", str(nmnist[0]), "--out", str(by_time),
                       "--T", str(T), "--bin-by", "time", "--workers", "1"]) == 0
    loader = create_loader(DataConfig(dataset="dvs", path=str(by_time), batch_size=3,
                                      num_workers=1), "val")
    x, _ = _all(loader)
    for b, (_, _, (ex, ey, et, ep)) in enumerate(nmnist[1]["val"]):
        window = (et[-1] - et[0]) // T
        for k in range(T):
            in_bin = (et >= et[0] + k * window) & (et < et[0] + (k + 1) * window)
            assert x[k, b].sum().item() == in_bin.sum()


def test_train_flip_and_translate_move_events_only(nmnist_build):
    cfg = DataConfig(dataset="dvs", path=str(nmnist_build), batch_size=3, flip=True, translate=3,
                     num_workers=1)
    augmented = create_loader(cfg, "train", seed=1)
    plain = create_loader(DataConfig(dataset="dvs", path=str(nmnist_build), batch_size=3,
                                     num_workers=1), "train", seed=1)
    xa, ya = _all(augmented, epoch=2)
    xp, yp = _all(plain, epoch=2)
    assert torch.equal(ya, yp) and xa.shape == (T, 9, 2, 34, 34)
    moved = 0
    for b in range(9):
        matches = [(f, dy, dx) for f in (False, True) for dy in range(-3, 4) for dx in range(-3, 4)
                   if torch.equal(xa[:, b], _shift(xp[:, b].flip(-1) if f else xp[:, b], dy, dx))]
        assert matches, b
        moved += (False, 0, 0) not in matches
    assert moved > 0


def _shift(frames, dy, dx):
    padded = torch.nn.functional.pad(frames, (3, 3, 3, 3))
    h, w = frames.shape[-2:]
    return padded[..., 3 - dy:3 - dy + h, 3 - dx:3 - dx + w]


def test_dvs_gesture_npy_files(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "DVSGesture"
    samples = []
    for folder, user in (("ibmGestureTrain", "user01_fluorescent"),
                         ("ibmGestureTrain", "user02_led"), ("ibmGestureTest", "user24_natural")):
        for label in (0, 4, 10):
            events = _events(rng, T * 50, 128)
            _write_gesture(root / folder / user / f"{label}.npy", *events)
            samples.append((folder, label, events))
    out = tmp_path / "out"
    assert build_main(["dvs", "--set", "dvsgesture", "--src", str(tmp_path), "--out", str(out),
                       "--T", str(T), "--size", "32", "--workers", "2"]) == 0
    loader = create_loader(DataConfig(dataset="dvs", path=str(out), batch_size=2,
                                      num_workers=1), "val")
    assert loader.meta.num_classes == 11 and loader.meta.counts == {"train": 6, "val": 3}
    x, y = _all(loader)
    # Files are read in sorted name order: 0.npy, 10.npy, 4.npy.
    val = sorted((s for s in samples if s[0] == "ibmGestureTest"), key=lambda s: str(s[1]))
    assert x.shape == (T, 3, 2, 32, 32) and y.tolist() == [0, 10, 4]
    for b, (_, _, (ex, ey, _, ep)) in enumerate(val):
        assert torch.equal(x[:, b], torch.from_numpy(_expected_frames(ex, ey, ep, 32, 0.25)).float())


AEDAT4_MAGIC = b"#!AER-DAT4.0\r\n"
# The DV software's stream description: one polarity-event stream, id 0, on a 128x128 sensor.
AEDAT4_DESCRIPTION = (
    '<dv version="2.0"><node name="outInfo" path="/mainloop/Recorder/outInfo/">'
    '<node name="0" path="/mainloop/Recorder/outInfo/0/">'
    '<attr key="typeIdentifier" type="string">EVTS</attr>'
    '<node name="info" path="/mainloop/Recorder/outInfo/0/info/">'
    '<attr key="sizeX" type="int">128</attr><attr key="sizeY" type="int">128</attr>'
    '</node></node></node></dv>')
# flatbuffers struct Event {t: int64; x: int16; y: int16; on: bool} (16 bytes, 8-aligned).
AEDAT4_EVENT = np.dtype({"names": ["t", "x", "y", "on"], "formats": ["<i8", "<i2", "<i2", "u1"],
                         "offsets": [0, 8, 10, 12], "itemsize": 16})


def _aedat4_ioheader(description: str, compression: int) -> bytes:
    """Size-prefixed flatbuffer `table Ioheader {compression, file_data_position, description}`
    (file_data_position left at its default -1: packets are read to the end of the file).

    Offsets after the size prefix: 0 root offset, 4 "IOHE", 8 vtable (3 fields), 20 table
    (vtable offset, compression, description offset), 32 string.
    """
    text = description.encode() + b"\0"
    text += b"\0" * (-len(text) % 4)
    body = (struct.pack("<I", 20) + b"IOHE" + struct.pack("<5H", 10, 12, 4, 0, 8) + b"\0\0"
            + struct.pack("<iiI", 20 - 8, compression, 32 - 28) + struct.pack("<I", len(description))
            + text)
    return struct.pack("<I", len(body)) + body


def _aedat4_event_packet(x, y, t, p, compress) -> bytes:
    """One packet of stream 0: stream id, byte length, then a size-prefixed flatbuffer
    `table EventPacket {elements: [Event]}` with identifier "EVTS", passed through `compress`
    (the file's compression applies to each packet's flatbuffer on its own).

    Offsets from the size prefix: 4 root offset, 8 "EVTS", 12 vtable, 20 table, 28 vector
    length, 32 events (8-aligned, as the struct needs).
    """
    events = np.zeros(len(x), AEDAT4_EVENT)
    events["t"], events["x"], events["y"], events["on"] = t, x, y, p
    body = (struct.pack("<I", 20 - 4) + b"EVTS" + struct.pack("<3H", 6, 8, 4) + b"\0\0"
            + struct.pack("<iI", 20 - 12, 28 - 24) + struct.pack("<I", len(x)) + events.tobytes())
    payload = compress(struct.pack("<I", len(body)) + body)
    return struct.pack("<II", 0, len(payload)) + payload


def _compressor(name: str):
    """The DV software's packet compressions (IOHeader enum value, compress function):
    none, LZ4 frames, zstd frames."""
    if name == "lz4":
        lz4_frame = pytest.importorskip("lz4.frame")
        return 1, lz4_frame.compress
    if name == "zstd":
        zstandard = pytest.importorskip("zstandard")
        return 3, zstandard.ZstdCompressor(level=3).compress
    return 0, bytes


def _write_aedat4(path, x, y, t, p, packets=3, compression="none"):
    """An AEDAT4 recording as the DV software writes it: magic line, IOHeader, then the events
    spread over `packets` event packets (the reader must join them)."""
    code, compress = _compressor(compression)
    parts = np.array_split(np.arange(len(x)), packets)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(AEDAT4_MAGIC + _aedat4_ioheader(AEDAT4_DESCRIPTION, code) + b"".join(
        _aedat4_event_packet(x[i], y[i], t[i], p[i], compress) for i in parts))


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
def test_cifar10dvs_aedat4_downsampled_frames_split_and_corrupt_file(tmp_path, compression):
    rng = np.random.default_rng(3)
    root = tmp_path / "CIFAR10DVS"
    written = {}  # path -> (label, expected frames at 48x48)
    for label, name in ((1, "automobile"), (3, "cat")):
        for i in range(10):
            # Event counts that are not multiples of T: the remainder is dropped, as in tonic.
            x, y, t, p = _events(rng, int(rng.integers(200, 400)), 128)
            path = root / name / f"cifar10_{name}_{i}.aedat4"
            _write_aedat4(path, x, y, t, p, compression=compression)
            written[str(path)] = (label, _expected_frames(x, y, p, 48, 48 / 128))
    # An eleventh cat recording cut inside its last packet.
    bad = root / "cat" / "cifar10_cat_10.aedat4"
    _write_aedat4(bad, *_events(rng, 300, 128), compression=compression)
    bad.write_bytes(bad.read_bytes()[:-40])

    out = tmp_path / "out"
    assert build_main(["dvs", "--set", "cifar10dvs", "--src", str(tmp_path), "--out", str(out),
                       "--T", str(T), "--size", "48", "--split-seed", "5", "--workers", "2"]) == 0

    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_classes"] == 10 and (meta["height"], meta["width"]) == (48, 48)
    assert meta["split"] == {"method": "9:1 per class", "seed": 5} and meta["skipped"] == 1
    (line,) = (out / "skipped.txt").read_text().splitlines()
    assert line.split("\t")[0] == str(bad) and "truncated or corrupt AEDAT4" in line

    # Every readable recording lands in exactly one split, with its own label and frames.
    seen = {}
    for split in ("train", "val"):
        loader = create_loader(DataConfig(dataset="dvs", path=str(out), batch_size=2,
                                          num_workers=1), split)
        x, y = _all(loader)
        assert x.shape == (T, meta["counts"][split], 2, 48, 48)
        for b in range(x.shape[1]):
            (path,) = [p for p, (label, frames) in written.items()
                       if label == int(y[b]) and torch.equal(x[:, b], torch.from_numpy(frames).float())]
            assert path not in seen
            seen[path] = split
    assert seen.keys() == written.keys()
    # round(10 / 10) = round(11 / 10) = 1 val file per class; seed 5 puts the cut file in train.
    assert meta["counts"] == {"train": 18, "val": 2}
    assert sorted(written[p][0] for p, split in seen.items() if split == "val") == [1, 3]


def test_cifar10dvs_split_is_9_to_1_per_class_and_seeded(tmp_path):
    ds = _dvs_set("cifar10dvs")
    for name in ds.classes:
        (tmp_path / name).mkdir()
        for i in range(20):
            (tmp_path / name / f"cifar10_{name}_{i}.aedat4").touch()
    splits, _ = list_recordings(ds, tmp_path, split_seed=0)
    assert len(splits["train"]) == 180 and len(splits["val"]) == 20
    assert {label for _, label in splits["val"]} == set(range(10))
    assert not {p for p, _ in splits["train"]} & {p for p, _ in splits["val"]}
    again, _ = list_recordings(ds, tmp_path, split_seed=0)
    other, _ = list_recordings(ds, tmp_path, split_seed=1)
    assert again == splits and other["val"] != splits["val"]


def test_missing_recordings_name_the_expected_layout(tmp_path, capsys):
    assert build_main(["dvs", "--set", "nmnist", "--src", str(tmp_path), "--out",
                       str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "NMNIST/Train/<digit>/*.bin" in err and "download" in err
    assert not (tmp_path / "NMNIST").exists()  # nothing was fetched or created
