"""ImageNet (or any ImageFolder tree) into FFCV RGB image fields, ffcv-imagenet style.

Input layout (torchvision's ImageFolder)::

    SRC/train/<class>/<image>   SRC/val/<class>/<image>

Classes are the sorted directory names under train/, label = position in that list (the same
map torchvision's ImageFolder builds); it is saved as classes.json beside the .beton files.
Images in any PIL mode (grayscale, CMYK, palette, RGBA/LA with alpha, 16-bit) are converted
to RGB the way torchvision's loader does (`Image.convert("RGB")`, alpha dropped).

FFCV is imported inside the builder and the pipelines: the registry imports this module for its
spec when a config is checked, on a login node too.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .cifar import rgb_pipelines
from .common import (CLASSES_FILE, TRAIN_FILE, VAL_FILE, DataError, staged_output, summary_line,
                     write_json, write_report)
from .meta import Meta
from .spec import DatasetSpec, PipelineArgs

#: torchvision's ImageFolder extensions (compared in lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: The usual ImageNet normalisation, in 0..255 pixel units (ffcv-imagenet's IMAGENET_MEAN/STD).
IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
WRITE_MODES = ("raw", "jpg", "proportion")


@dataclass
class ImageFieldOptions:
    """ffcv-imagenet's `RGBImageField` options; defaults are those of their ResNet-50 files."""

    write_mode: str = "proportion"    # raw | jpg | proportion (JPEG with compress_probability)
    max_resolution: int = 500         # longest side in px after resizing (0 = keep)
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    seed: int = 0                     # draws which images 'proportion' compresses

    def field(self) -> Any:
        """The FFCV `RGBImageField` these options describe."""
        from ffcv.fields import RGBImageField

        if self.write_mode not in WRITE_MODES:
            raise DataError(f"--write-mode {self.write_mode}: expected one of {', '.join(WRITE_MODES)}")
        if not 1 <= self.jpeg_quality <= 100 or not 0 <= self.compress_probability <= 1:
            raise DataError(f"--jpeg-quality {self.jpeg_quality} / --compress-probability "
                            f"{self.compress_probability}: need 1..100 and 0..1")
        return RGBImageField(write_mode=self.write_mode,
                             max_resolution=self.max_resolution or None,
                             jpeg_quality=self.jpeg_quality,
                             compress_probability=self.compress_probability)


def load_rgb(path: str | Path, max_resolution: int = 0) -> np.ndarray:
    """Decode an image file to uint8 RGB `[H, W, 3]`, as torchvision's ImageFolder would.

    With `max_resolution`, JPEGs are decoded at the smallest power-of-two DCT scale that still
    leaves the longest side >= max_resolution (PIL's draft mode): the field resizes to
    max_resolution anyway, and a 4000 px photo then decodes several times faster.
    """
    with Image.open(path) as im:
        if max_resolution and im.format == "JPEG":
            scale = max_resolution / max(im.size)
            if scale < 1:
                im.draft("RGB", (int(im.size[0] * scale) + 1, int(im.size[1] * scale) + 1))
        return np.asarray(im.convert("RGB"))


def check_image(path: str, max_resolution: int) -> str | None:
    """None if `path` decodes completely, else the reason it does not (for the report)."""
    try:
        image = load_rgb(path, max_resolution)
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            return f"decoded to shape {image.shape}"
        if max(image.shape[:2]) >= 1 << 16:  # FFCV stores width/height as uint16
            return f"too large ({image.shape[1]}x{image.shape[0]} px)"
    except Exception as e:  # PIL raises many types for bad files; each is one skipped input
        return f"{type(e).__name__}: {e}".replace("\n", " ")
    return None


def _check_image_star(args: tuple[str, int]) -> str | None:
    return check_image(*args)


class ImageFileSamples:
    """(RGB image, label) for each (path, label) pair; indexed by FFCV's writer processes."""

    def __init__(self, items: list[tuple[str, int]], max_resolution: int):
        self.items = items
        self.max_resolution = max_resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.items[index]
        return load_rgb(path, self.max_resolution), label


def list_classes(train_dir: Path) -> list[str]:
    """Sorted class directory names (ImageFolder's label order)."""
    return sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())


def list_images(split_dir: Path, class_index: dict[str, int]
                ) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """Image files under `split_dir/<class>/` (recursively, sorted) with labels, and the ones
    that cannot be labelled (class directory unknown) as (path, reason)."""
    items, unknown = [], []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        for root, dirs, files in os.walk(class_dir):
            dirs.sort()
            for name in sorted(files):
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(root, name)
                if class_dir.name in class_index:
                    items.append((path, class_index[class_dir.name]))
                else:
                    unknown.append((path, f"class {class_dir.name!r} is not in train/"))
    return items, unknown


def scan_images(items: list[tuple[str, int]], max_resolution: int, workers: int, desc: str
                ) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """Decode every image once in `workers` processes; split into readable and (path, reason)."""
    jobs = [(path, max_resolution) for path, _ in items]
    with get_context("fork").Pool(workers) as pool:
        reasons = list(tqdm(pool.imap(_check_image_star, jobs, chunksize=16), total=len(jobs),
                            desc=desc, unit="img"))
    good = [item for item, reason in zip(items, reasons) if reason is None]
    bad = [(item[0], reason) for item, reason in zip(items, reasons) if reason is not None]
    return good, bad


def build_imagenet(src: Path, out: Path, workers: int, options: ImageFieldOptions) -> Meta:
    """Write SRC/{train,val} ImageFolder trees to `out`; returns its Meta."""
    from ffcv.fields import IntField

    from .writer import write_beton

    field = options.field()
    splits = {"train": src / "train", "val": src / "val"}
    for split_dir in splits.values():
        if not split_dir.is_dir():
            raise DataError(f"{split_dir} is missing: --src must hold train/<class>/* and "
                            f"val/<class>/* (ImageFolder layout)")
    classes = list_classes(splits["train"])
    if not classes:
        raise DataError(f"{splits['train']} has no class directories (expected train/<class>/*)")
    class_index = {name: i for i, name in enumerate(classes)}

    skipped: list[tuple[str, str]] = []
    good: dict[str, list[tuple[str, int]]] = {}
    for split, split_dir in splits.items():
        items, unknown = list_images(split_dir, class_index)
        skipped += unknown
        good[split], bad = scan_images(items, options.max_resolution, workers,
                                       desc=f"checking {split}")
        skipped += bad
        if not good[split]:
            raise DataError(f"no readable images under {split_dir}/<class>/")

    meta = Meta(
        dataset="imagenet", source=str(src), num_classes=len(classes), classes=classes,
        in_chans=3, height=None, width=None, T=None,  # variable size; the loader crops
        counts={split: len(items) for split, items in good.items()}, skipped=len(skipped),
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        details={"image_field": "rgb", "write_mode": options.write_mode,
                 "max_resolution": options.max_resolution, "jpeg_quality": options.jpeg_quality,
                 "compress_probability": options.compress_probability})
    fields = {"image": field, "label": IntField()}
    with staged_output(out) as stage:
        for split, name in (("train", TRAIN_FILE), ("val", VAL_FILE)):
            # Which images 'proportion' compresses is drawn with numpy's global RNG in FFCV's
            # forked writers, which inherit this state: seeding it makes the build reproducible.
            np.random.seed(options.seed)
            write_beton(stage / name, fields, ImageFileSamples(good[split], options.max_resolution),
                        workers, chunksize=64)
        write_json(stage / CLASSES_FILE, class_index)
        write_report(stage, skipped)
        meta.write(stage)
    print(summary_line("imagenet", out, meta.counts, len(skipped)))
    return meta


#: Evaluation crops the centre 224/256 of the short side (torchvision's Resize(256) +
#: CenterCrop(224), ffcv-imagenet's DEFAULT_CROP_RATIO).
CENTER_CROP_RATIO = 224 / 256
RESOLUTION = 224


def progressive_resolution(epoch: int, min_res: int, max_res: int, start_ramp: int,
                           end_ramp: int) -> int:
    """ffcv-imagenet's schedule: `min_res` up to `start_ramp`, `max_res` from `end_ramp`,
    linear in between rounded to a multiple of 32 px."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0]
    return int(np.round(interp / 32)) * 32


def resolution(cfg: Any, train: bool, epoch: int) -> int:
    """Output size in px at `epoch` of the `DataConfig` `cfg`: data.val_resolution in
    validation; data.resolution in training, ramped up from data.min_resolution if set."""
    if not train:
        return cfg.val_resolution or RESOLUTION
    final = cfg.resolution or RESOLUTION
    if cfg.min_resolution == 0:
        return final
    return progressive_resolution(epoch, cfg.min_resolution, final, cfg.ramp_start_epoch,
                                  cfg.ramp_end_epoch)


def train_pipelines(p: PipelineArgs) -> dict[str, list]:
    """A random-resized crop to `resolution` px, decoding only the JPEG region it covers
    (jpeg_region.py), then a random flip."""
    from .stages import RandomHorizontalFlipInPlace, crop_decoders

    random_crop, _ = crop_decoders()
    flip = [RandomHorizontalFlipInPlace(p.key)] if p.flip else []
    return rgb_pipelines(p, [random_crop((p.resolution, p.resolution), p.key), *flip])


def val_pipelines(p: PipelineArgs) -> dict[str, list]:
    """The centre crop (CENTER_CROP_RATIO of the short side) resized to `resolution` px."""
    from .stages import crop_decoders

    _, centre_crop = crop_decoders()
    return rgb_pipelines(p, [centre_crop((p.resolution, p.resolution), ratio=CENTER_CROP_RATIO)])


def _options(parser: argparse.ArgumentParser) -> None:
    defaults = ImageFieldOptions()
    parser.add_argument("--write-mode", choices=WRITE_MODES, default=defaults.write_mode)
    parser.add_argument("--max-resolution", type=int, default=defaults.max_resolution,
                        help="longest side in px (0 = keep)")
    parser.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    parser.add_argument("--compress-probability", type=float, default=defaults.compress_probability,
                        help="share of images stored as JPEG in 'proportion' mode")


def _build(args: argparse.Namespace, workers: int) -> Meta:
    options = ImageFieldOptions(args.write_mode, args.max_resolution, args.jpeg_quality,
                                args.compress_probability)
    return build_imagenet(args.src, args.out, workers, options)


SPEC = DatasetSpec(
    name="imagenet", kind="image",
    help="ImageFolder tree: SRC/train/<class>/*, SRC/val/<class>/*",
    build=_build, train=train_pipelines, val=val_pipelines, options=_options,
    flip=True, resolution=resolution)
