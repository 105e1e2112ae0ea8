"""The embedded demo set: scikit-learn's handwritten digits (1797 real 8x8 images, no download).

Pixels are the data set's integer intensities 0..16, stored unchanged as uint8 `[1, 8, 8]`
arrays, so a loaded batch times `std` plus `mean` (meta.json) gives back sklearn's values exactly.
Split: stratified 80/20 with a fixed seed -> 1437 train, 360 val.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ffcv.fields import IntField, NDArrayField

from .common import (FORMAT_VERSION, TRAIN_FILE, VAL_FILE, staged_output, summary_line,
                     write_json)
from .writer import MIN_PAGE_SIZE, ArraySamples, write_beton

SPLIT_SEED = 0
VAL_FRACTION = 0.2
PIXEL_MAX = 16  # sklearn's digits are 4x4-block counts of an 32x32 bitmap: 0..16


def load_split(seed: int = SPLIT_SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits as {"train": (images, labels), "val": ...}: uint8 `[N, 1, 8, 8]`, int64 `[N]`.

    This is the reference the round-trip test compares the .beton files with.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None, :, :]  # float 0..16 in sklearn, exact ints
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    train_idx, val_idx = train_test_split(index, test_size=VAL_FRACTION, random_state=seed,
                                          stratify=labels)
    # Sorted, so that the files are in sklearn's order within each split.
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    return {"train": (images[train_idx], labels[train_idx]),
            "val": (images[val_idx], labels[val_idx])}


def build_digits(out: Path, workers: int) -> dict:
    """Write the digits to `out` (train/val .beton + meta.json); returns the meta dict."""
    splits = load_split()
    train_images = splits["train"][0].astype(np.float64)
    # One mean/std over all training pixels (a single channel), in stored units (0..16).
    mean, std = float(train_images.mean()), float(train_images.std())
    fields = {"image": NDArrayField(np.dtype("uint8"), (1, 8, 8)), "label": IntField()}
    meta = {
        "format_version": FORMAT_VERSION,
        "dataset": "digits",
        "source": "sklearn.datasets.load_digits",
        "num_classes": 10,
        "classes": [str(d) for d in range(10)],
        "in_chans": 1,
        "height": 8,
        "width": 8,
        "T": None,
        "counts": {split: int(len(labels)) for split, (_, labels) in splits.items()},
        "skipped": 0,
        "image_field": "ndarray",
        "dtype": "uint8",
        "pixel_max": PIXEL_MAX,
        "mean": [mean],
        "std": [std],
        "split": {"method": "stratified", "val_fraction": VAL_FRACTION, "seed": SPLIT_SEED},
    }
    with staged_output(out) as stage:
        for split, name in (("train", TRAIN_FILE), ("val", VAL_FILE)):
            write_beton(stage / name, fields, ArraySamples(*splits[split]), workers,
                        page_size=MIN_PAGE_SIZE)
        write_json(stage / "meta.json", meta)
    print(summary_line("digits", out, meta["counts"], 0))
    return meta
