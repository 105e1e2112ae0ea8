"""The embedded demo set: scikit-learn's handwritten digits (1797 real 8x8 images, no download).

Pixels are the data set's integer intensities 0..16, stored unchanged as uint8 `[1, 8, 8]`
arrays, so a loaded batch times `std` plus `mean` (meta.json) gives back sklearn's values exactly.
Split: stratified 80/20 with a fixed seed -> 1437 train, 360 val.

FFCV (and the writer) are imported inside the builder and the pipelines: the registry imports
this module for `SPEC` when a config is checked, on a login node too.
"""

from __future__ import annotations

from pathlib import Path

import argparse

import numpy as np

from .common import TRAIN_FILE, VAL_FILE, staged_output, summary_line
from .meta import Meta
from .spec import DatasetSpec, PipelineArgs

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


def build_digits(out: Path, workers: int) -> Meta:
    """Write the digits to `out` (train/val .beton + meta.json); returns their Meta."""
    from ffcv.fields import IntField, NDArrayField

    from .writer import MIN_PAGE_SIZE, ArraySamples, write_beton

    splits = load_split()
    train_images = splits["train"][0].astype(np.float64)
    # One mean/std over all training pixels (a single channel), in stored units (0..16).
    mean, std = float(train_images.mean()), float(train_images.std())
    fields = {"image": NDArrayField(np.dtype("uint8"), (1, 8, 8)), "label": IntField()}
    meta = Meta(
        dataset="digits", source="sklearn.datasets.load_digits", num_classes=10,
        classes=[str(d) for d in range(10)], in_chans=1, height=8, width=8, T=None,
        counts={split: int(len(labels)) for split, (_, labels) in splits.items()},
        dtype="uint8", pixel_max=PIXEL_MAX, mean=[mean], std=[std],
        details={"image_field": "ndarray",
                 "split": {"method": "stratified", "val_fraction": VAL_FRACTION, "seed": SPLIT_SEED}})
    with staged_output(out) as stage:
        for split, name in (("train", TRAIN_FILE), ("val", VAL_FILE)):
            write_beton(stage / name, fields, ArraySamples(*splits[split]), workers,
                        page_size=MIN_PAGE_SIZE)
        meta.write(stage)
    print(summary_line("digits", out, meta.counts, 0))
    return meta


def pipelines(p: PipelineArgs) -> dict[str, list]:
    """x: float32 `[B, 1, 8, 8]` normalised with meta's one mean/std; y: int64 `[B]`. The same in
    training and validation (digits are neither flipped nor shifted)."""
    from .stages import NDArrayDecoder, NormalizeToFloat, ToDevice, ToTensor, label

    image = [NDArrayDecoder(), ToTensor(), ToDevice(p.device, non_blocking=True),
             NormalizeToFloat(p.meta.mean, p.meta.std, channels_last=p.device.type == "cuda")]
    return {"image": image, "label": label(p.device)}


def _build(args: argparse.Namespace, workers: int) -> Meta:
    return build_digits(args.out, workers)


SPEC = DatasetSpec(
    name="digits", kind="image", help="scikit-learn's handwritten digits (embedded demo set)",
    build=_build, train=pipelines, val=pipelines, needs_src=False,
    no_flip_reason="handwritten digits are not mirror-symmetric")
