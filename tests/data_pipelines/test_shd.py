"""SHD/SSC builder on small HDF5 files in the published layout (spikes/times in seconds and
spikes/units per sample as variable-length arrays, labels, extra/keys)."""

from __future__ import annotations

import h5py
import numpy as np
import torch

from data_pipelines import DataConfig, create_loader
from data_pipelines.build import main as build_main

T, WINDOW_MS = 20, 200.0  # frames of 10 ms
FRAME_US = int(WINDOW_MS * 1000 / T)


def _write_h5(path, samples, classes):
    """The published layout: vlen float16 times (s) and uint16 units per sample, uint16 labels."""
    with h5py.File(path, "w") as f:
        times = f.create_dataset("spikes/times", (len(samples),), dtype=h5py.vlen_dtype(np.float16))
        units = f.create_dataset("spikes/units", (len(samples),), dtype=h5py.vlen_dtype(np.uint16))
        for i, (t, u, _) in enumerate(samples):
            times[i], units[i] = t, u
        f.create_dataset("labels", data=np.array([y for _, _, y in samples], np.uint16))
        f.create_dataset("extra/keys", data=np.array([c.encode() for c in classes]))


def _samples(rng, n, num_classes):
    """n samples of up to 400 spikes over 0..0.25 s (some after the 0.2 s window), sorted in time,
    each with one channel firing twice in one frame (counts must not be clipped to 1)."""
    out = []
    for i in range(n):
        k = int(rng.integers(50, 400))
        t = np.sort(rng.uniform(0, 0.25, k)).astype(np.float16)
        u = rng.integers(0, 700, k).astype(np.uint16)
        t = np.concatenate([t, np.float16([0.0125, 0.0126])])
        u = np.concatenate([u, np.uint16([699, 699])])
        order = np.argsort(t, kind="stable")
        out.append((t[order], u[order], i % num_classes))
    return out


def _expected(t, u):
    """Spike counts [T, 700] computed without tonic: frame = floor(t_us / frame), t_us as tonic
    truncates it; spikes from the window's end on are dropped."""
    t_us = (t.astype(np.float64) * 1e6).astype(np.int64)
    keep = t_us < T * FRAME_US
    frames = np.zeros((T, 700), np.float32)
    np.add.at(frames, (t_us[keep] // FRAME_US, u[keep].astype(np.int64)), 1)
    return frames


def _all(loader):
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader.iterate(0)])
    return torch.cat(xs, dim=1), torch.cat(ys)


def test_shd_spikes_land_in_their_frames_and_channels(tmp_path):
    rng = np.random.default_rng(0)
    classes = [f"digit {d}" for d in range(4)]
    train, test = _samples(rng, 8, 4), _samples(rng, 5, 4)
    bad = (np.float16([0.01]), np.uint16([700]), 1)  # channel 700 does not exist
    src = tmp_path / "SHD"
    src.mkdir()
    _write_h5(src / "shd_train.h5", train + [bad], classes)
    _write_h5(src / "shd_test.h5", test, classes)

    out = tmp_path / "out"
    assert build_main(["shd", "--src", str(tmp_path), "--out", str(out), "--T", str(T),
                       "--window-ms", str(WINDOW_MS), "--workers", "2"]) == 0
    loader = create_loader(DataConfig(dataset="shd", path=str(out), batch_size=3, num_workers=1),
                           "val")
    meta = loader.meta
    assert (meta.T, meta.in_chans, meta.num_classes, meta.frame_ms) == (T, 700, 4, 10.0)
    assert meta.classes == classes and meta.counts == {"train": 8, "val": 5}
    assert meta.skipped == 1 and meta.eval_splits == {}
    (line,) = (out / "skipped.txt").read_text().splitlines()
    assert line.startswith(f"{src / 'shd_train.h5'}[8]\t") and "700" in line

    x, y = _all(loader)
    assert x.shape == (T, 5, 700) and x.dtype == torch.float32
    assert y.tolist() == [s[2] for s in test]
    for b, (t, u, _) in enumerate(test):
        assert torch.equal(x[:, b], torch.from_numpy(_expected(t, u)))
        assert x[1, b, 699] >= 2  # the two spikes at 12.5 and 12.6 ms: counted, not clipped
    train_x, _ = _all(create_loader(DataConfig(dataset="shd", path=str(out), batch_size=4,
                                               num_workers=1), "train", augment=False))
    for b, (t, u, _) in enumerate(train):
        assert torch.equal(train_x[:, b], torch.from_numpy(_expected(t, u)))


def test_ssc_test_file_is_an_extra_evaluation_split(tmp_path):
    rng = np.random.default_rng(1)
    classes = [f"command {c}" for c in range(3)]
    files = {"ssc_train.h5": _samples(rng, 6, 3), "ssc_valid.h5": _samples(rng, 3, 3),
             "ssc_test.h5": _samples(rng, 4, 3)}
    for name, samples in files.items():
        _write_h5(tmp_path / name, samples, classes)
    out = tmp_path / "out"
    assert build_main(["ssc", "--src", str(tmp_path), "--out", str(out), "--T", str(T),
                       "--window-ms", str(WINDOW_MS), "--workers", "1"]) == 0
    loader = create_loader(DataConfig(dataset="ssc", path=str(out), batch_size=4, num_workers=1),
                           "test")
    assert loader.meta.counts == {"train": 6, "val": 3, "test": 4}
    assert loader.meta.eval_splits == {"test": {"frame_ms": 10.0, "T": T}}
    x, y = _all(loader)
    assert y.tolist() == [s[2] for s in files["ssc_test.h5"]]
    for b, (t, u, _) in enumerate(files["ssc_test.h5"]):
        assert torch.equal(x[:, b], torch.from_numpy(_expected(t, u)))


def test_missing_or_foreign_files_are_one_line_errors(tmp_path, capsys):
    assert build_main(["shd", "--src", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "shd_train.h5, shd_test.h5" in err and "download" in err

    (tmp_path / "shd_train.h5").write_bytes(b"not hdf5")
    _write_h5(tmp_path / "shd_test.h5", _samples(np.random.default_rng(2), 2, 2), ["a", "b"])
    assert build_main(["shd", "--src", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a readable HDF5 file" in err

    assert build_main(["shd", "--src", str(tmp_path), "--out", str(tmp_path / "out"),
                       "--T", "3", "--window-ms", "1"]) == 2
    assert "whole microseconds" in capsys.readouterr().err
