"""Event frames binned by frame duration over a fixed window (the paper's temporal-resolution
shift), on N-MNIST .bin files in the real format, with extra validation splits at other durations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipelines import DataConfig, create_loader
from data_pipelines.build import main as build_main
from data_pipelines.dvs import FrameMaker, read_nmnist
from tests.data_pipelines.test_dvs import _write_nmnist

WINDOW_MS, FRAME_MS, EVAL_MS = 30, 3, (1, 2, 5, 10)


def _recording(rng, n, t_max_us):
    """n N-MNIST events (34x34) at distinct times in 5..t_max_us us, time-ordered."""
    t = np.sort(rng.choice(np.arange(5, t_max_us), n, replace=False))
    return rng.integers(0, 34, n), rng.integers(0, 34, n), t, rng.integers(0, 2, n)


def _expected(x, y, t, p, frame_ms):
    """Counts [T, 2, 34, 34] without tonic: frame = (t - t0) // frame, events from t0 + window on
    dropped (t0 = the first event)."""
    frame_us, steps = int(frame_ms * 1000), WINDOW_MS // frame_ms
    k = (t - t[0]) // frame_us
    keep = k < steps
    frames = np.zeros((steps, 2, 34, 34), np.float32)
    np.add.at(frames, (k[keep], p[keep], y[keep], x[keep]), 1)
    return frames


def test_2ms_and_4ms_frames_hold_the_same_events_over_the_window(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "00000.bin"
    x, y, t, p = _recording(rng, 500, 40_000)  # 40 ms of events; the window keeps 24 ms
    _write_nmnist(path, x, y, t, p)
    binned = {ms: FrameMaker(read_nmnist, (34, 34, 2), (34, 34, 2), 24 // ms, "events",
                             frame_us=ms * 1000)(str(path)) for ms in (2, 4)}
    assert binned[2].shape == (12, 2, 34, 34) and binned[4].shape == (6, 2, 34, 34)
    in_window = int(np.sum(t - t[0] < 24_000))
    assert 0 < in_window < len(t)
    assert binned[2].sum() == binned[4].sum() == in_window
    # Two consecutive 2 ms frames are one 4 ms frame, pixel by pixel.
    assert np.array_equal(binned[2].reshape(6, 2, 2, 34, 34).sum(axis=1), binned[4])


@pytest.fixture(scope="module")
def nmnist_durations(tmp_path_factory):
    """N-MNIST, 2 digits x 2 train and 2 test recordings of ~40 ms, built at 3 ms frames over a
    30 ms window with val splits at 1, 2, 5 and 10 ms."""
    root = tmp_path_factory.mktemp("durations_src")
    rng = np.random.default_rng(1)
    val = []
    for folder, per_digit in (("Train", 2), ("Test", 2)):
        for digit in range(2):
            for i in range(per_digit):
                events = _recording(rng, int(rng.integers(100, 300)), 40_000)
                _write_nmnist(root / "NMNIST" / folder / str(digit) / f"{i:05d}.bin", *events)
                if folder == "Test":
                    val.append((digit, events))
    out = tmp_path_factory.mktemp("durations_out")
    assert build_main(["dvs", "--set", "nmnist", "--src", str(root), "--out", str(out),
                       "--frame-ms", str(FRAME_MS), "--window-ms", str(WINDOW_MS),
                       "--eval-frame-ms", ",".join(map(str, EVAL_MS)), "--workers", "2"]) == 0
    return out, val


def test_build_writes_val_splits_at_other_durations_listed_in_meta(nmnist_durations):
    out, val = nmnist_durations
    cfg = DataConfig(dataset="dvs", path=str(out), batch_size=3, num_workers=1)
    meta = create_loader(cfg, "val").meta
    assert (meta.T, meta.frame_ms) == (WINDOW_MS // FRAME_MS, FRAME_MS)
    assert meta.eval_splits == {f"val_{ms}ms": {"frame_ms": float(ms), "T": WINDOW_MS // ms}
                                for ms in EVAL_MS}
    assert meta.counts == {"train": 4, "val": 4, **{f"val_{ms}ms": 4 for ms in EVAL_MS}}
    for split, ms in [("val", FRAME_MS)] + [(f"val_{ms}ms", ms) for ms in EVAL_MS]:
        loader = create_loader(cfg, split)
        assert (loader.meta.T, loader.meta.frame_ms) == (WINDOW_MS // ms, ms)
        xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader.iterate(0)])
        x, y = torch.cat(xs, dim=1), torch.cat(ys)
        assert x.shape == (WINDOW_MS // ms, 4, 2, 34, 34)
        assert y.tolist() == [digit for digit, _ in val]
        for b, (_, events) in enumerate(val):
            assert torch.equal(x[:, b], torch.from_numpy(_expected(*events, ms)))


@pytest.mark.parametrize("args, message", [
    (["--frame-ms", "3", "--T", "10"], "give one"),
    (["--frame-ms", "4", "--window-ms", "30"], "does not divide"),
    (["--frame-ms", "3", "--window-ms", "30", "--eval-frame-ms", "7"], "does not divide"),
    (["--frame-ms", "3", "--eval-frame-ms", "3"], "equals --frame-ms"),
    (["--eval-frame-ms", "1,2"], "give --frame-ms too"),
])
def test_inconsistent_durations_are_one_line_errors(tmp_path, capsys, args, message):
    assert build_main(["dvs", "--set", "nmnist", "--src", str(tmp_path), "--out",
                       str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
