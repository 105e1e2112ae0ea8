"""CIFAR-10 / CIFAR-100 from the official python pickle batches into raw-mode FFCV images.

Input: the extracted `cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta) or
`cifar-100-python/` (train, test, meta), or a directory holding one of them. Each batch is a
pickled dict with b"data" (uint8 `[N, 3072]`, the 1024 R then G then B values of a 32x32 image,
row-major) and b"labels" (CIFAR-10) or b"fine_labels" (CIFAR-100). Val = the test batch.

FFCV is imported inside the builder and the pipelines: the registry imports this module for its
specs when a config is checked, on a login node too.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

from .common import (TRAIN_FILE, VAL_FILE, DataError, eprint, staged_output, summary_line,
                     write_report)
from .meta import Meta
from .spec import DatasetSpec, PipelineArgs

LAYOUT = {
    "cifar10": {"dir": "cifar-10-batches-py", "meta": "batches.meta", "names": b"label_names",
                "labels": b"labels", "num_classes": 10,
                "train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]},
    "cifar100": {"dir": "cifar-100-python", "meta": "meta", "names": b"fine_label_names",
                 "labels": b"fine_labels", "num_classes": 100, "train": ["train"], "val": ["test"]},
}


def find_batches_dir(dataset: str, src: Path) -> Path:
    """`src` itself if it holds the batches, else its `cifar-10-batches-py`-style child."""
    layout = LAYOUT[dataset]
    for candidate in (src, src / layout["dir"]):
        if (candidate / layout["meta"]).is_file():
            return candidate
    raise DataError(f"no {dataset} batches at {src}: expected {layout['dir']}/{layout['meta']} "
                    f"(the extracted python version of the official archive)")


def read_batch(path: Path, labels_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch as uint8 HWC images `[N, 32, 32, 3]` and int64 labels `[N]`."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[labels_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"data {data.shape} / {len(labels)} labels, expected [N, 3072] / N")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar(dataset: str, src: Path) -> tuple[dict, list[str], list[tuple[str, str]]]:
    """{"train": (images, labels), "val": ...}, class names, and unreadable batches."""
    layout = LAYOUT[dataset]
    root = find_batches_dir(dataset, src)
    try:
        with open(root / layout["meta"], "rb") as f:
            names = [n.decode() for n in pickle.load(f, encoding="bytes")[layout["names"]]]
    except Exception as e:
        raise DataError(f"{root / layout['meta']} is unreadable ({type(e).__name__}: {e})") from None
    if len(names) != layout["num_classes"]:
        raise DataError(f"{root / layout['meta']} lists {len(names)} classes, expected "
                        f"{layout['num_classes']}")
    splits, skipped = {}, []
    for split in ("train", "val"):
        parts = []
        for name in layout[split]:
            try:
                parts.append(read_batch(root / name, layout["labels"]))
            except Exception as e:  # missing, truncated or not a CIFAR pickle: skip the batch
                skipped.append((str(root / name), f"{type(e).__name__}: {e}".replace("\n", " ")))
                eprint(f"skipping {root / name}: {skipped[-1][1]}")
        if not parts:
            raise DataError(f"no readable {split} batch in {root} ({', '.join(layout[split])})")
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if labels.min() < 0 or labels.max() >= len(names):
            raise DataError(f"{root}: {split} labels outside 0..{len(names) - 1}")
        splits[split] = (images, labels)
    return splits, names, skipped


def build_cifar(dataset: str, src: Path, out: Path, workers: int) -> Meta:
    """Write CIFAR-10/100 to `out` in raw mode (lossless); returns its Meta."""
    from ffcv.fields import IntField, RGBImageField

    from .writer import ArraySamples, write_beton

    splits, names, skipped = load_cifar(dataset, src)
    train_pixels = splits["train"][0].reshape(-1, 3).astype(np.float64)
    meta = Meta(
        dataset=dataset, source=str(src), num_classes=len(names), classes=names, in_chans=3,
        height=32, width=32, T=None,
        counts={split: int(len(labels)) for split, (_, labels) in splits.items()},
        skipped=len(skipped),
        # Per-channel statistics of this training set, in 0..255 units.
        mean=train_pixels.mean(axis=0).tolist(), std=train_pixels.std(axis=0).tolist(),
        details={"image_field": "rgb", "write_mode": "raw"})
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
    with staged_output(out) as stage:
        for split, name in (("train", TRAIN_FILE), ("val", VAL_FILE)):
            write_beton(stage / name, fields, ArraySamples(*splits[split]), workers, chunksize=500)
        write_report(stage, skipped)
        meta.write(stage)
    print(summary_line(dataset, out, meta.counts, len(skipped)))
    return meta


def rgb_pipelines(p: PipelineArgs, decode: list) -> dict[str, list]:
    """Decoded uint8 HWC images -> float32 `[B, 3, H, W]` (channels-last strides), normalised
    with meta's mean/std: on a GPU the uint8 crosses and the GPU normalises; on the CPU FFCV's
    table lookup normalises inside the parallel decode stage instead. Shared with imagenet.py."""
    from .stages import NormalizeImage, NormalizeToFloat, ToDevice, ToTensor, ToTorchImage, label

    mean, std = p.meta.mean, p.meta.std
    if p.device.type == "cuda":
        image = [*decode, ToTensor(), ToDevice(p.device, non_blocking=True), ToTorchImage(),
                 NormalizeToFloat(mean, std, channels_last=True)]
    else:
        image = [*decode, NormalizeImage(np.array(mean), np.array(std), np.float32), ToTensor(),
                 ToTorchImage()]
    return {"image": image, "label": label(p.device)}


def train_pipelines(p: PipelineArgs) -> dict[str, list]:
    """Random flip, then a random shift of up to `translate` px (the pad-and-crop)."""
    from .stages import RandomHorizontalFlipInPlace, RandomTranslateInPlace, SimpleRGBImageDecoder

    flip = [RandomHorizontalFlipInPlace(p.key)] if p.flip else []
    translate = [RandomTranslateInPlace(p.key, p.translate)] if p.translate else []
    return rgb_pipelines(p, [SimpleRGBImageDecoder(), *flip, *translate])


def val_pipelines(p: PipelineArgs) -> dict[str, list]:
    from .stages import SimpleRGBImageDecoder

    return rgb_pipelines(p, [SimpleRGBImageDecoder()])


def _build(args: argparse.Namespace, workers: int) -> Meta:
    return build_cifar(args.dataset, args.src, args.out, workers)


CIFAR10, CIFAR100 = (DatasetSpec(
    name=name, kind="image", help=f"{title} python pickle batches ({LAYOUT[name]['dir']})",
    build=_build, train=train_pipelines, val=val_pipelines, flip=True, translate=4)
    for name, title in (("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100")))
