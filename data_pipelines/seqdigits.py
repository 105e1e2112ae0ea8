"""Sequential digits: the embedded digits read one row per time step (a temporal demo set).

Row t of each 8x8 digit (8 pixel intensities 0..16) is the input at step t, so T = 8 and a
model sees 8 features per step; the class is only known once it has remembered earlier rows.
Same 1797 images, same stratified split and same one mean/std over training pixels as `digits`
(`digits.load_split`), stored unchanged as uint8 `[T, F]` = `[8, 8]` arrays in the field
`sequence`.

Its Meta has `T` = 8, `in_chans` = 8 (features per step: the model's input width) and
`height`/`width` = None: a step is a feature vector, not an image, so the loader yields x
`[T, B, F]` with no spatial axes (the spec's kind is "sequence").
"""

from __future__ import annotations

from pathlib import Path

import argparse

import numpy as np

from .common import TRAIN_FILE, VAL_FILE, staged_output, summary_line
from .digits import PIXEL_MAX, SPLIT_SEED, VAL_FRACTION, load_split
from .meta import Meta
from .spec import DatasetSpec, PipelineArgs

T = 8         # one step per image row
FEATURES = 8  # pixels per row


def to_sequences(images: np.ndarray) -> np.ndarray:
    """Digit images uint8 `[N, 1, 8, 8]` -> row sequences uint8 `[N, T, F]` (row t = step t)."""
    if images.shape[1:] != (1, T, FEATURES):
        raise ValueError(f"expected digit images [N, 1, {T}, {FEATURES}], got {images.shape}")
    # Contiguous, because FFCV's writer stores each sample's buffer as is.
    return np.ascontiguousarray(images[:, 0])


def build_seqdigits(out: Path, workers: int) -> Meta:
    """Write the row sequences to `out` (train/val .beton + meta.json); returns their Meta.

    FFCV is imported here, not at the top: the registry imports this module on a login node."""
    from ffcv.fields import IntField, NDArrayField

    from .writer import MIN_PAGE_SIZE, ArraySamples, write_beton

    splits = {split: (to_sequences(images), labels)
              for split, (images, labels) in load_split().items()}
    train_pixels = splits["train"][0].astype(np.float64)
    # One mean/std over all training pixels, in stored units (0..16): the same values as digits'.
    mean, std = float(train_pixels.mean()), float(train_pixels.std())
    fields = {"sequence": NDArrayField(np.dtype("uint8"), (T, FEATURES)), "label": IntField()}
    meta = Meta(
        dataset="seqdigits", source="sklearn.datasets.load_digits, row t of each image as time step t",
        num_classes=10, classes=[str(d) for d in range(10)], in_chans=FEATURES, T=T,
        counts={split: int(len(labels)) for split, (_, labels) in splits.items()},
        dtype="uint8", pixel_max=PIXEL_MAX, mean=[mean], std=[std],
        details={"split": {"method": "stratified", "val_fraction": VAL_FRACTION, "seed": SPLIT_SEED}})
    with staged_output(out) as stage:
        for split, name in (("train", TRAIN_FILE), ("val", VAL_FILE)):
            write_beton(stage / name, fields, ArraySamples(*splits[split]), workers,
                        page_size=MIN_PAGE_SIZE)
        meta.write(stage)
    print(summary_line("seqdigits", out, meta.counts, 0))
    return meta


def sequence_pipelines(p: PipelineArgs) -> dict[str, list]:
    """x: contiguous float32 `[T, B, F]` normalised with meta's one mean/std (stored `[B, T, F]`;
    time leads inside the network); y: int64 `[B]`. Every sequence set without augmentation
    (seqdigits, mnist1d, delayed_xor) reads its `sequence` field this way."""
    from .stages import NDArrayDecoder, NormalizeToFloat, ToDevice, ToTensor, label

    sequence = [NDArrayDecoder(), ToTensor(), ToDevice(p.device, non_blocking=True),
                NormalizeToFloat(p.meta.mean, p.meta.std, channels_last=False, time_major=True)]
    return {"sequence": sequence, "label": label(p.device)}


def _build(args: argparse.Namespace, workers: int) -> Meta:
    return build_seqdigits(args.out, workers)


SPEC = DatasetSpec(
    name="seqdigits", kind="sequence",
    help="the same digits as sequences: row t of each image is time step t",
    build=_build, train=sequence_pipelines, val=sequence_pipelines, needs_src=False,
    no_flip_reason="handwritten digits are not mirror-symmetric")
