"""CIFAR builders on tiny batches written in the official pickle format, through the loader."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from data_pipelines import DataConfig, DataError, create_loader
from data_pipelines.build import main as build_main

PER_BATCH = 24


def _write_batch(path, data, labels, labels_key=b"labels"):
    """A batch as the official archive has it: a protocol-2 pickle of a dict with bytes keys."""
    batch = {b"batch_label": b"testing batch", labels_key: labels.tolist(), b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


@pytest.fixture(scope="module")
def cifar10_src(tmp_path_factory):
    """cifar-10-batches-py with 5 x 24 train images, 20 test images; data_batch_5 truncated."""
    root = tmp_path_factory.mktemp("raw") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": PER_BATCH,
                     b"num_vis": 3072}, f, protocol=2)
    batches = {}
    for name, n in [(f"data_batch_{i}", PER_BATCH) for i in range(1, 6)] + [("test_batch", 20)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        _write_batch(root / name, data, labels)
        batches[name] = (data, labels)
    whole = (root / "data_batch_5").read_bytes()
    (root / "data_batch_5").write_bytes(whole[: len(whole) // 2])
    return root, batches


@pytest.fixture(scope="module")
def cifar10_out(cifar10_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("cifar10")
    # --src may be the batches directory's parent.
    assert build_main(["cifar10", "--src", str(cifar10_src[0].parent), "--out", str(out),
                       "--workers", "2"]) == 0
    return out


def _hwc(data):
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_truncated_batch_is_skipped_and_reported(cifar10_out, cifar10_src, capsys):
    loader = create_loader(DataConfig(dataset="cifar10", path=str(cifar10_out)), "val")
    assert loader.meta.counts == {"train": 4 * PER_BATCH, "val": 20}
    assert loader.meta.skipped == 1
    report = (cifar10_out / "skipped.txt").read_text().splitlines()
    assert len(report) == 1 and report[0].startswith(str(cifar10_src[0] / "data_batch_5"))


def test_summary_line_counts_skipped_inputs(cifar10_src, tmp_path, capsys):
    assert build_main(["cifar10", "--src", str(cifar10_src[0]), "--out", str(tmp_path),
                       "--workers", "1"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "train 96, val 20" in summary and "skipped 1 unreadable" in summary


def test_val_pixels_and_labels_round_trip_exactly(cifar10_out, cifar10_src):
    loader = create_loader(DataConfig(dataset="cifar10", path=str(cifar10_out), batch_size=8,
                                      num_workers=2), "val")
    mean = torch.tensor(loader.meta.mean).view(1, 3, 1, 1)
    std = torch.tensor(loader.meta.std).view(1, 3, 1, 1)
    xs, ys = zip(*[((x * std + mean).clone(), y.clone()) for x, y in loader.iterate(0)])
    pixels, labels = torch.cat(xs), torch.cat(ys)
    data, ref_labels = cifar10_src[1]["test_batch"]
    assert pixels.shape == (20, 3, 32, 32)
    expected = torch.from_numpy(_hwc(data).transpose(0, 3, 1, 2).astype(np.float32))
    assert torch.allclose(pixels, expected, atol=1e-3)
    assert torch.equal(labels, torch.from_numpy(ref_labels))


def test_train_loader_augments_with_flip_and_translate(cifar10_out, cifar10_src):
    cfg = DataConfig(dataset="cifar10", path=str(cifar10_out), batch_size=16, num_workers=1)
    loader = create_loader(cfg, "train", seed=3)
    batches = [(x.clone(), y.clone()) for x, y in loader.iterate(0)]
    assert loader.batches_per_epoch == len(batches) == 96 // 16
    x, y = batches[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Labels follow the planned order over the four readable batches.
    train_labels = np.concatenate([cifar10_src[1][f"data_batch_{i}"][1] for i in range(1, 5)])
    assert torch.equal(torch.cat([b[1] for b in batches]),
                       torch.from_numpy(train_labels[loader.order(0)]))
    # Each image is its stored image, maybe flipped, then shifted by up to 4 px (zero fill).
    mean = torch.tensor(loader.meta.mean).view(1, 3, 1, 1)
    std = torch.tensor(loader.meta.std).view(1, 3, 1, 1)
    pixels = (torch.cat([b[0] for b in batches]) * std + mean).round().numpy()
    train_data = _hwc(np.concatenate([cifar10_src[1][f"data_batch_{i}"][0] for i in range(1, 5)]))
    stored = train_data[loader.order(0)].transpose(0, 3, 1, 2).astype(np.float32)
    augmentations = [_matching_augmentation(p, s) for p, s in zip(pixels, stored)]
    assert None not in augmentations
    assert len(set(augmentations)) > 10  # random: many different flips/shifts
    assert {flipped for flipped, _, _ in augmentations} == {False, True}


def _matching_augmentation(image, stored, pad=4):
    """(flipped, dy, dx) such that `image` is `stored` flipped then shifted, else None."""
    for flipped in (False, True):
        source = stored[..., ::-1] if flipped else stored
        padded = np.pad(source, ((0, 0), (pad, pad), (pad, pad)))
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                if np.array_equal(padded[:, dy:dy + 32, dx:dx + 32], image):
                    return flipped, dy - pad, dx - pad
    return None


def test_cifar100_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(1)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, f, protocol=2)
    refs = {}
    for name, n in (("train", 40), ("test", 10)):
        data, fine = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 100, n)
        batch = {b"data": data, b"fine_labels": fine.tolist(),
                 b"coarse_labels": (fine // 5).tolist(), b"filenames": [b"x.png"] * n}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        refs[name] = fine
    out = tmp_path / "out"
    assert build_main(["cifar100", "--src", str(root), "--out", str(out), "--workers", "1"]) == 0
    loader = create_loader(DataConfig(dataset="cifar100", path=str(out), batch_size=4,
                                      num_workers=1), "val")
    assert loader.meta.num_classes == 100 and loader.meta.classes[7] == "c7"
    assert torch.equal(torch.cat([y.clone() for _, y in loader.iterate(0)]),
                       torch.from_numpy(refs["test"]))


def test_missing_batches_are_one_clear_error(tmp_path, capsys):
    assert build_main(["cifar10", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cifar-10-batches-py/batches.meta" in err
    with pytest.raises(DataError):
        create_loader(DataConfig(dataset="cifar10", path=str(tmp_path / "o")), "train")


def test_training_split_without_augmentation_is_read_as_validation_is(cifar10_out, cifar10_src):
    """What the generalisation gap measures on: flip and translation configured, yet every
    training image comes back once, unaugmented, in file order, the same in every epoch."""
    cfg = DataConfig(dataset="cifar10", path=str(cifar10_out), batch_size=16, num_workers=1, flip=True, translate=4)
    loader = create_loader(cfg, "train", seed=3, augment=False)
    mean = torch.tensor(loader.meta.mean).view(1, 3, 1, 1)
    std = torch.tensor(loader.meta.std).view(1, 3, 1, 1)
    epochs = [torch.cat([(x * std + mean).round() for x, _ in loader.iterate(epoch)]) for epoch in (0, 1)]
    train_data = _hwc(np.concatenate([cifar10_src[1][f"data_batch_{i}"][0] for i in range(1, 5)]))
    stored = torch.from_numpy(train_data.transpose(0, 3, 1, 2).astype(np.float32))
    assert torch.equal(epochs[0], stored) and torch.equal(epochs[1], stored)
    # The augmenting loader of the same split still augments (the two do not share a pipeline).
    augmented = torch.cat([(x * std + mean).round() for x, _ in create_loader(cfg, "train", seed=3).iterate(0)])
    assert not torch.equal(augmented, stored[create_loader(cfg, "train", seed=3).order(0)])
