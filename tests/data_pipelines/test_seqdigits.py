"""Sequential digits: build, time-major round trip, order and resume, config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipelines import DataConfig, DataError, create_loader
from data_pipelines.build import main as build_main
from data_pipelines.digits import load_split
from data_pipelines.registry import spec


@pytest.fixture(scope="module")
def reference():
    return load_split()


def _collect(loader, epoch, start_batch=0):
    """All batches as (denormalised pixels `[T, B, F]`, labels), cloned out of FFCV's buffers."""
    mean, std = loader.meta.mean[0], loader.meta.std[0]
    xs, ys = [], []
    for x, y in loader.iterate(epoch, start_batch):
        xs.append((x * std + mean).clone())
        ys.append(y.clone())
    return xs, ys


def _rows_time_major(images: np.ndarray) -> torch.Tensor:
    """Reference digits uint8 `[N, 1, 8, 8]` -> float `[T, N, F]` with x[t, b] = image[b, 0, t]."""
    return torch.from_numpy(images[:, 0]).float().transpose(0, 1)


@pytest.fixture(scope="module")
def train_loader(seqdigits_dir):
    """Rank 1 of 2: FFCV compiles a pipeline per loader, so one is shared by the train tests."""
    cfg = DataConfig(dataset="seqdigits", path=str(seqdigits_dir), batch_size=32, num_workers=2)
    return create_loader(cfg, "train", rank=1, world_size=2, seed=7)


def test_meta_describes_a_temporal_set_of_row_sequences(seqdigits_dir, reference):
    meta = json.loads((seqdigits_dir / "meta.json").read_text())
    assert meta["dataset"] == "seqdigits" and spec("seqdigits").kind == "sequence"
    assert (meta["T"], meta["in_chans"]) == (8, 8)
    assert (meta["height"], meta["width"]) == (None, None)
    assert meta["num_classes"] == 10 and meta["classes"] == [str(d) for d in range(10)]
    assert meta["counts"] == {"train": 1437, "val": 360} and meta["pixel_max"] == 16
    # One mean/std over the training pixels: the digits' own statistics.
    train_pixels = reference["train"][0].astype(np.float64)
    assert meta["mean"] == [pytest.approx(train_pixels.mean())]
    assert meta["std"] == [pytest.approx(train_pixels.std())]


def test_val_round_trip_gives_back_the_digit_rows_time_major(seqdigits_dir, reference):
    cfg = DataConfig(dataset="seqdigits", path=str(seqdigits_dir), batch_size=64,
                     val_batch_size=359, num_workers=1)
    loader = create_loader(cfg, "val")
    batches = list(loader.iterate(0))
    # A last batch of one sample keeps its batch axis.
    assert [tuple(x.shape) for x, _ in batches] == [(8, 359, 8), (8, 1, 8)]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.is_contiguous() and y.dtype == torch.int64
    xs, ys = _collect(loader, epoch=0)
    pixels, labels = torch.cat(xs, dim=1), torch.cat(ys)
    ref_images, ref_labels = reference["val"]
    # Normalised floats map back to the integer rows to within float32 rounding.
    assert torch.equal(pixels.round(), _rows_time_major(ref_images))
    assert torch.allclose(pixels, _rows_time_major(ref_images), atol=1e-4)
    assert torch.equal(labels, torch.from_numpy(ref_labels))


def test_train_batches_follow_the_planned_order_and_resume_mid_epoch(train_loader, reference):
    ref_images, ref_labels = reference["train"]
    order = train_loader.order(3)
    xs, ys = _collect(train_loader, epoch=3)
    assert len(ys) == train_loader.batches_per_epoch == 1437 // (32 * 2)
    assert all(tuple(x.shape) == (8, 32, 8) for x in xs)
    assert torch.equal(torch.cat(ys), torch.from_numpy(ref_labels[order]))
    assert torch.allclose(torch.cat(xs, dim=1), _rows_time_major(ref_images[order]), atol=1e-4)
    rest_x, rest_y = _collect(train_loader, epoch=3, start_batch=15)
    assert len(rest_y) == train_loader.batches_per_epoch - 15
    assert all(torch.equal(a, b) for a, b in zip(ys[15:], rest_y))
    assert all(torch.equal(a, b) for a, b in zip(xs[15:], rest_x))


def test_existing_build_is_kept_unless_force(seqdigits_dir, capsys):
    beton = seqdigits_dir / "train.beton"
    before = beton.stat().st_mtime_ns
    assert build_main(["seqdigits", "--out", str(seqdigits_dir)]) == 0
    assert "kept" in capsys.readouterr().out
    assert beton.stat().st_mtime_ns == before


def test_missing_build_names_the_command_without_src(tmp_path):
    with pytest.raises(DataError) as err:
        create_loader(DataConfig(dataset="seqdigits", path=str(tmp_path / "nowhere")), "train")
    message = str(err.value)
    assert "\n" not in message
    assert f"python -m data_pipelines.build seqdigits --out {tmp_path / 'nowhere'}" in message
    assert "--src" not in message


@pytest.mark.parametrize("cfg, pattern", [
    (DataConfig(dataset="seqdigits", flip=True), "data.flip=true"),
    (DataConfig(dataset="seqdigits", translate=1), "data.translate=1"),
    (DataConfig(dataset="seqdigits", resolution=8), "data.resolution=8"),
    (DataConfig(dataset="digits"), "holds seqdigits"),
])
def test_bad_config_is_a_one_line_data_error_naming_the_key(seqdigits_dir, cfg, pattern):
    cfg.path = str(seqdigits_dir)
    with pytest.raises(DataError, match=pattern) as err:
        create_loader(cfg, "train")
    assert "\n" not in str(err.value)
