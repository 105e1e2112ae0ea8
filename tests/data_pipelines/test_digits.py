"""The embedded digits set: build, round trip, sharding, order and resume through the FFCV loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines import DataConfig, DataError, create_loader
from data_pipelines.build import main as build_main
from data_pipelines.digits import load_split


@pytest.fixture(scope="module")
def reference():
    return load_split()


def _collect(loader, epoch, start_batch=0):
    """All batches as (denormalised uint8-valued pixels, labels), cloned out of FFCV's buffers."""
    mean, std = loader.meta.mean[0], loader.meta.std[0]
    xs, ys = [], []
    for x, y in loader.iterate(epoch, start_batch):
        xs.append((x * std + mean).clone())
        ys.append(y.clone())
    return xs, ys


@pytest.fixture(scope="module")
def train_loaders(digits_dir):
    """Two ranks' train loaders, built once: FFCV compiles a pipeline per loader."""
    cfg = DataConfig(dataset="digits", path=str(digits_dir), batch_size=32, num_workers=2)
    return [create_loader(cfg, "train", rank=r, world_size=2, seed=7) for r in range(2)]


def test_build_writes_files_and_meta(digits_dir, reference):
    loader = create_loader(DataConfig(path=str(digits_dir)), "val")
    meta = loader.meta
    assert {p.name for p in digits_dir.iterdir()} >= {"train.beton", "val.beton", "meta.json"}
    assert meta.num_classes == 10 and meta.in_chans == 1 and meta.T is None
    assert (meta.height, meta.width) == (8, 8)
    assert meta.counts == {"train": 1437, "val": 360}
    assert meta.counts["val"] == len(reference["val"][1])


def test_val_round_trip_equals_sklearn_pixels_and_labels(digits_dir, reference):
    loader = create_loader(DataConfig(path=str(digits_dir), batch_size=64, num_workers=2), "val")
    xs, ys = _collect(loader, epoch=0)
    pixels, labels = torch.cat(xs), torch.cat(ys)
    ref_images, ref_labels = reference["val"]
    assert pixels.shape == (360, 1, 8, 8) and pixels.dtype == torch.float32
    assert labels.dtype == torch.int64
    # Normalised floats map back to sklearn's integers to within float32 rounding.
    assert torch.allclose(pixels, torch.from_numpy(ref_images).float(), atol=1e-4)
    assert torch.equal(labels, torch.from_numpy(ref_labels))
    assert [len(y) for y in ys] == [64] * 5 + [40]  # last partial batch kept in validation


def test_normalised_train_pixels_have_zero_mean_unit_std(train_loaders):
    x, _ = next(iter(train_loaders[0].iterate(0)))
    # Per batch, so only roughly; the stored mean/std are over all training pixels.
    assert abs(x.mean().item()) < 0.2 and abs(x.std().item() - 1) < 0.2


def test_train_batches_follow_planned_order_for_each_rank(train_loaders, reference):
    ref_images, ref_labels = reference["train"]
    for loader in train_loaders:
        order = loader.order(3)
        xs, ys = _collect(loader, epoch=3)
        assert len(ys) == loader.batches_per_epoch == 1437 // (32 * 2)
        assert all(len(y) == 32 for y in ys)
        assert torch.equal(torch.cat(ys), torch.from_numpy(ref_labels[order]))
        assert torch.allclose(torch.cat(xs), torch.from_numpy(ref_images[order]).float(), atol=1e-4)


def test_two_ranks_train_shards_are_disjoint_equal_and_cover_the_epoch(train_loaders):
    orders = [loader.order(5) for loader in train_loaders]
    assert len(orders[0]) == len(orders[1]) == train_loaders[0].samples_per_epoch == 22 * 32
    assert not set(orders[0]) & set(orders[1])
    # drop_last leaves out fewer samples than one global batch (2 ranks x 32).
    assert 1437 - 64 < len(set(orders[0]) | set(orders[1])) <= 1437


def test_order_is_a_pure_function_of_seed_and_epoch(digits_dir, train_loaders):
    cfg = DataConfig(path=str(digits_dir), batch_size=32)
    again = create_loader(cfg, "train", rank=0, world_size=2, seed=7)
    np.testing.assert_array_equal(again.order(4), train_loaders[0].order(4))
    assert not np.array_equal(train_loaders[0].order(4), train_loaders[0].order(5))
    other_seed = create_loader(cfg, "train", rank=0, world_size=2, seed=8)
    assert not np.array_equal(other_seed.order(4), train_loaders[0].order(4))
    # Same labels when iterated twice: the order, not FFCV state, decides what comes out.
    assert torch.equal(torch.cat(_collect(train_loaders[0], 4)[1]),
                       torch.cat(_collect(train_loaders[0], 4)[1]))


def test_mid_epoch_resume_yields_exactly_the_remaining_batches(train_loaders):
    loader = train_loaders[1]
    full_x, full_y = _collect(loader, epoch=2)
    rest_x, rest_y = _collect(loader, epoch=2, start_batch=15)
    assert len(rest_y) == loader.batches_per_epoch - 15
    for a, b in zip(full_y[15:], rest_y):
        assert torch.equal(a, b)
    for a, b in zip(full_x[15:], rest_x):
        assert torch.equal(a, b)
    assert _collect(loader, epoch=2, start_batch=loader.batches_per_epoch) == ([], [])


def test_two_ranks_val_shards_cover_every_sample_exactly_once(digits_dir, reference):
    cfg = DataConfig(path=str(digits_dir), batch_size=64, val_batch_size=50, num_workers=1)
    loaders = [create_loader(cfg, "val", rank=r, world_size=3) for r in range(3)]
    labels = [torch.cat(_collect(loader, 0)[1]) for loader in loaders]
    assert sum(loader.samples_per_epoch for loader in loaders) == 360
    assert [len(y) for y in labels] == [loader.samples_per_epoch for loader in loaders]
    assert torch.equal(torch.cat(labels), torch.from_numpy(reference["val"][1]))


def test_last_val_batch_of_one_sample_keeps_its_batch_axis(digits_dir):
    cfg = DataConfig(path=str(digits_dir), batch_size=64, val_batch_size=359, num_workers=1)
    shapes = [(tuple(x.shape), tuple(y.shape)) for x, y in create_loader(cfg, "val").iterate(0)]
    assert shapes == [((359, 1, 8, 8), (359,)), ((1, 1, 8, 8), (1,))]


def test_leaving_an_epoch_early_then_iterating_again_works(train_loaders):
    loader = train_loaders[0]
    for i, _ in enumerate(loader.iterate(0)):
        if i == 2:
            break
    assert sum(1 for _ in loader.iterate(1)) == loader.batches_per_epoch


def test_existing_build_is_kept_unless_force(digits_dir, tmp_path, capsys):
    # A copy: the session's build (tests/conftest.py) is shared with the other tests.
    digits_dir = Path(shutil.copytree(digits_dir, tmp_path / "digits"))
    beton = digits_dir / "train.beton"
    before = beton.stat().st_mtime_ns
    assert build_main(["digits", "--out", str(digits_dir)]) == 0
    assert "kept" in capsys.readouterr().out
    assert beton.stat().st_mtime_ns == before
    assert build_main(["digits", "--out", str(digits_dir), "--force", "--workers", "1"]) == 0
    assert beton.stat().st_mtime_ns != before
    assert not [p for p in digits_dir.iterdir() if p.name.startswith(".partial")]


def test_missing_data_set_is_one_line_naming_the_build_command(tmp_path):
    with pytest.raises(DataError) as err:
        create_loader(DataConfig(path=str(tmp_path / "nowhere")), "train")
    message = str(err.value)
    assert "\n" not in message and "meta.json" in message
    assert "python -m data_pipelines.build digits --out" in message


def test_missing_beton_names_the_file(digits_dir, tmp_path):
    partial = tmp_path / "digits"
    partial.mkdir()
    (partial / "meta.json").write_text((digits_dir / "meta.json").read_text())
    with pytest.raises(DataError, match="train.beton is missing"):
        create_loader(DataConfig(path=str(partial)), "train")


@pytest.mark.parametrize("cfg, pattern", [
    (DataConfig(dataset="mnist"), "digits, cifar10, cifar100, imagenet, dvs"),
    (DataConfig(resolution=32), "data.resolution=32"),
    (DataConfig(translate=2), "data.translate=2"),
    (DataConfig(flip=True), "data.flip=true"),
    (DataConfig(dataset="cifar10"), "holds digits"),
])
def test_bad_config_is_a_data_error_naming_the_key(digits_dir, cfg, pattern):
    cfg.path = str(digits_dir)
    with pytest.raises(DataError, match=pattern):
        create_loader(cfg, "train")


def test_batch_larger_than_the_split_is_a_data_error(digits_dir):
    with pytest.raises(DataError, match="data.batch_size"):
        create_loader(DataConfig(path=str(digits_dir), batch_size=1000), "train", world_size=2)
