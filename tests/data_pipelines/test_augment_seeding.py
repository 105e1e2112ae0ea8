"""Augmentation follows the seed: every random crop, flip, translation and DVS augmentation of a
training sample is a function of (seed, epoch, the sample's index in the data set), so reruns,
thread counts, resumed epochs and shardings all see the same augmented sample (DESIGN.md, 10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ffcv.fields.rgb_image import get_random_crop

from data_pipelines import DataConfig, create_loader
from data_pipelines.jpeg_region import random_resized_crop
from data_pipelines.transforms import uniforms

T = 4


def _config(name, path, **options):
    if name == "cifar":
        base = dict(dataset="cifar10", batch_size=16)  # flip and pad-4 translate by default
    elif name == "imagenet":
        base = dict(dataset="imagenet", batch_size=4, resolution=32)  # random crop and flip
    else:
        base = dict(dataset="dvs", batch_size=3, flip=True, translate=3)
    return DataConfig(path=str(path), **{"num_workers": 1, **base, **options})


def _by_sample(loader, epoch, start_batch=0):
    """{data-set index: augmented sample} over batches `start_batch ..` of `epoch`."""
    samples = []
    for x, _ in loader.iterate(epoch, start_batch):
        samples += list((x.transpose(0, 1) if x.dim() == 5 else x).clone())  # DVS: [T, B, ...]
    order = loader.order(epoch)[start_batch * loader.batch_size:]
    assert len(order) == len(samples)
    return dict(zip(order.tolist(), samples))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _differ(a, b):
    """How many samples both hold with different pixels."""
    return sum(not torch.equal(a[k], b[k]) for k in a.keys() & b.keys())


FIXTURES = {"cifar": "small_cifar10", "imagenet": "small_imagenet", "dvs": "small_nmnist"}  # tests/conftest.py


@pytest.fixture(params=list(FIXTURES))
def built(request):
    return request.param, request.getfixturevalue(FIXTURES[request.param])


def test_same_seed_and_epoch_give_the_same_batches_in_any_loader_and_thread_count(built):
    name, path = built
    loader = create_loader(_config(name, path), "train", seed=5)
    first = [x.clone() for x, _ in loader.iterate(2)]
    _by_sample(loader, 3)  # another epoch in between leaves no trace
    again = [x.clone() for x, _ in loader.iterate(2)]
    threads = create_loader(_config(name, path, num_workers=2), "train", seed=5)
    other = [x.clone() for x, _ in threads.iterate(2)]
    assert len(first) == len(again) == len(other) == loader.batches_per_epoch
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_another_epoch_or_seed_augments_differently(built):
    name, path = built
    cfg = _config(name, path)
    reference = _by_sample(create_loader(cfg, "train", seed=5), 2)
    other_epoch = _by_sample(create_loader(cfg, "train", seed=5), 3)
    other_seed = _by_sample(create_loader(cfg, "train", seed=6), 2)
    # Same samples, other augmentations: most of the samples both epochs read differ.
    assert _differ(reference, other_epoch) > len(reference.keys() & other_epoch.keys()) // 2
    assert _differ(reference, other_seed) > len(reference.keys() & other_seed.keys()) // 2


def test_resuming_mid_epoch_gives_the_tail_of_the_epoch(built):
    name, path = built
    loader = create_loader(_config(name, path), "train", seed=5)
    whole = _by_sample(loader, 4)
    tail = _by_sample(create_loader(_config(name, path), "train", seed=5), 4, start_batch=1)
    assert len(tail) == len(whole) - loader.batch_size
    assert _same(tail, {k: whole[k] for k in tail})


def test_a_sample_is_augmented_alike_whatever_rank_or_batch_size_reads_it(small_cifar10):
    cifar = small_cifar10
    single = _by_sample(create_loader(_config("cifar", cifar), "train", seed=5), 1)
    shards = {}
    for rank in (0, 1):
        loader = create_loader(_config("cifar", cifar, batch_size=8), "train", seed=5, rank=rank,
                               world_size=2)
        shards.update(_by_sample(loader, 1))
    # Both read all 80 samples: 5 batches of 16, or 5 batches of 8 on each of 2 ranks.
    assert len(single) == len(shards) == 80
    assert _same(single, shards)


def test_keyed_draws_are_uniform_and_independent():
    u = uniforms(0, 0, np.arange(200_000), 0)
    assert u.min() >= 0 and u.max() < 1
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    assert np.abs(counts / len(u) * 20 - 1).max() < 0.03
    # Neighbouring samples, draws, epochs and seeds are uncorrelated.
    for other in (uniforms(0, 0, np.arange(1, 200_001), 0), uniforms(0, 0, np.arange(200_000), 1),
                  uniforms(0, 1, np.arange(200_000), 0), uniforms(1, 0, np.arange(200_000), 0)):
        assert abs(np.corrcoef(u, other)[0, 1]) < 0.01


def test_keyed_crop_has_ffcvs_crop_distribution():
    """Area fraction, aspect ratio and position of the random-resized crop of a 300 x 400
    image, ours keyed against FFCV's from numpy's generator."""
    scale, ratio = np.array([0.08, 1.0]), np.array([3 / 4, 4 / 3])
    np.random.seed(0)
    n = 4000
    theirs = np.array([get_random_crop(300, 400, scale, ratio) for _ in range(n)], np.float64)
    ours = np.array([random_resized_crop(np.uint32(300), np.uint32(400), scale, ratio, 7, 0, s)
                     for s in range(n)], np.float64)

    def stats(crops):
        i, j, h, w = crops.T
        area, log_aspect = h * w / (300 * 400), np.log(w / h)
        centre_y, centre_x = (i + h / 2) / 300, (j + w / 2) / 400
        return np.array([area.mean(), area.std(), log_aspect.mean(), log_aspect.std(),
                         centre_y.mean(), centre_x.mean(), centre_y.std(), centre_x.std()])

    np.testing.assert_allclose(stats(ours), stats(theirs), atol=0.02)
    assert (ours[:, 0] + ours[:, 2] <= 300).all() and (ours[:, 1] + ours[:, 3] <= 400).all()
