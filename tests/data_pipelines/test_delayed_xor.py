"""Delayed spiking XOR: samples as pure functions of (seed, split, index), labels as the XOR of
the two pattern levels, the builder and loader round trip, and the readout that counts only the
steps from the second pattern on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipelines import DataConfig, create_loader
from data_pipelines.build import main as build_main
from data_pipelines.delayed_xor import CHANNELS, NOISE_RATE, PATTERN_STEPS, sample

DELAY = 5
T = PATTERN_STEPS + DELAY + PATTERN_STEPS


@pytest.fixture(scope="module")
def xor_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("delayed_xor")
    assert build_main(["delayed_xor", "--out", str(out), "--delay", str(DELAY), "--train", "40",
                       "--val", "12", "--seed", "3", "--workers", "1"]) == 0
    return out


def test_a_sample_is_a_function_of_seed_split_and_index():
    a, label_a, levels_a = sample(3, "train", 17, DELAY)
    b, label_b, levels_b = sample(3, "train", 17, DELAY)
    assert np.array_equal(a, b) and (label_a, levels_a) == (label_b, levels_b)
    assert a.shape == (T, CHANNELS) and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1}
    others = [sample(4, "train", 17, DELAY)[0], sample(3, "val", 17, DELAY)[0], sample(3, "train", 18, DELAY)[0]]
    assert not any(np.array_equal(a, other) for other in others)


def test_label_is_the_xor_of_the_levels_the_spike_rates_show():
    for index in range(60):
        spikes, label, (first, second) = sample(0, "train", index, DELAY)
        assert label == first ^ second
        # 200 Bernoulli draws at 0.2 vs 0.6: their mean is on the level's side of 0.4.
        assert (spikes[:PATTERN_STEPS].mean() > 0.4) == bool(first)
        assert (spikes[-PATTERN_STEPS:].mean() > 0.4) == bool(second)
    labels = [sample(0, "train", i, DELAY)[1] for i in range(200)]
    assert 60 < sum(labels) < 140  # both classes, about equally often


def test_noise_between_the_patterns_has_the_background_rate():
    gaps = np.stack([sample(1, "train", i, 100)[0][PATTERN_STEPS:-PATTERN_STEPS] for i in range(50)])
    assert gaps.shape == (50, 100, CHANNELS)
    assert abs(gaps.mean() - NOISE_RATE) < 0.003  # 100k draws: 3e-3 is > 9 standard errors


def test_build_round_trip_and_meta_readout_from(xor_dir):
    loader = create_loader(DataConfig(dataset="delayed_xor", path=str(xor_dir), batch_size=12), "val")
    meta = loader.meta
    assert (meta.T, meta.readout_from, meta.in_chans, meta.num_classes) == (T, PATTERN_STEPS + DELAY, CHANNELS, 2)
    assert meta.counts == {"train": 40, "val": 12}
    ((x, y),) = [(x.clone(), y.clone()) for x, y in loader.iterate(0)]
    assert x.shape == (T, 12, CHANNELS) and x.dtype == torch.float32
    for i in range(12):
        spikes, label, _ = sample(3, "val", i, DELAY)
        assert torch.equal(x[:, i], torch.from_numpy(spikes).float()) and int(y[i]) == label
