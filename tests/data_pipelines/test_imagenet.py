"""ImageNet builder on a generated ImageFolder tree (mixed sizes, modes, formats, bad files)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from ffcv.reader import Reader
from PIL import Image

from data_pipelines import DataConfig, create_loader
from data_pipelines.build import main as build_main
from data_pipelines.imagenet import progressive_resolution

CLASSES = ["n01440764", "n01443537", "n01484850"]


def _smooth_image(rng, height, width):
    """A photo-like RGB image: smooth gradients plus a few blobs (JPEG-friendly, unlike noise)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([xx / width * 200, yy / height * 200, (xx + yy) / (width + height) * 255], -1)
    for _ in range(3):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(5, 40)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = rng.uniform(0, 255, 3)
    return cv2.GaussianBlur(image, (5, 5), 1.5).clip(0, 255).astype(np.uint8)


def _save(rng, path, mode, size):
    rgb = Image.fromarray(_smooth_image(rng, size[1], size[0]))
    if mode == "L":
        rgb.convert("L").save(path, quality=95)
    elif mode == "CMYK":
        rgb.convert("CMYK").save(path, quality=95)
    elif mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(np.full((size[1], size[0]), 128, np.uint8)))
        rgba.save(path)
    elif mode == "P":
        rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    else:
        rgb.save(path, quality=95)


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    """train: 3 classes x 6 images; val: 3 x 2 images; plus the bad files each split can have."""
    src = tmp_path_factory.mktemp("imagenet_src")
    rng = np.random.default_rng(0)
    kinds = [("RGB", ".JPEG"), ("L", ".JPEG"), ("CMYK", ".jpg"), ("RGBA", ".png"), ("P", ".png"),
             ("RGB", ".jpeg")]
    expected = {"train": [], "val": []}
    for split, per_class in (("train", 6), ("val", 2)):
        for label, name in enumerate(CLASSES):
            (src / split / name).mkdir(parents=True)
            for i in range(per_class):
                mode, ext = kinds[(i + label) % len(kinds)]
                size = (int(rng.integers(40, 300)), int(rng.integers(40, 300)))
                path = src / split / name / f"{name}_{i:03d}{ext}"
                _save(rng, path, mode, size)
                expected[split].append((str(path), label))
    # A big image (resized to max_resolution), and inputs that must be skipped or ignored.
    big = src / "train" / CLASSES[0] / "big_000.JPEG"
    _save(rng, big, "RGB", (800, 600))
    expected["train"].append((str(big), 0))
    (src / "train" / CLASSES[1] / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + bytes(500))
    whole = (src / "train" / CLASSES[0] / f"{CLASSES[0]}_000.JPEG").read_bytes()
    (src / "train" / CLASSES[2] / "truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    (src / "train" / CLASSES[2] / "README.txt").write_text("not an image")
    (src / "val" / "n99999999").mkdir()
    _save(rng, src / "val" / "n99999999" / "stray.JPEG", "RGB", (64, 64))
    expected = {k: sorted(v) for k, v in expected.items()}
    return src, expected


def _build(src, out, *options):
    return build_main(["imagenet", "--src", str(src), "--out", str(out), "--workers", "2",
                       *options])


@pytest.fixture(scope="module")
def raw_build(imagefolder, tmp_path_factory):
    out = tmp_path_factory.mktemp("imagenet_raw")
    assert _build(imagefolder[0], out, "--write-mode", "raw") == 0
    return out


def _stored_images(beton):
    """Every sample of an RGB .beton as (uint8 HWC image, label, mode), read from the file."""
    reader = Reader(str(beton))
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    data = np.memmap(beton, dtype=np.uint8, mode="r")
    samples = []
    for image_md, label in zip(reader.metadata["f0"], reader.metadata["f1"]):
        ptr, h, w = int(image_md["data_ptr"]), int(image_md["height"]), int(image_md["width"])
        blob = np.asarray(data[ptr:ptr + sizes[ptr]])
        if image_md["mode"] == 0:  # jpg
            image = cv2.cvtColor(cv2.imdecode(blob, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        else:
            image = blob[:h * w * 3].reshape(h, w, 3)
        samples.append((image, int(label), int(image_md["mode"])))
    return samples


def _reference(path, max_side=500):
    """What the builder should store: RGB as torchvision converts it, longest side <= 500."""
    image = np.asarray(Image.open(path).convert("RGB"))
    scale = max_side / max(image.shape[:2])
    if scale < 1:
        size = (int(image.shape[1] * scale), int(image.shape[0] * scale))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def test_raw_mode_round_trip_is_lossless_for_every_mode_and_size(raw_build, imagefolder):
    _, expected = imagefolder
    for split in ("train", "val"):
        stored = _stored_images(raw_build / f"{split}.beton")
        assert [label for _, label, _ in stored] == [label for _, label in expected[split]]
        for (image, _, mode), (path, _) in zip(stored, expected[split]):
            if "big_000" in path:
                assert image.shape == (375, 500, 3)  # 800x600 -> longest side 500
                assert _psnr(image, _reference(path)) > 40  # PIL draft decode vs full decode
            else:
                assert mode == 1 and np.array_equal(image, _reference(path)), path


def test_class_map_and_bad_inputs_are_reported(raw_build, imagefolder):
    assert json.loads((raw_build / "classes.json").read_text()) == {c: i for i, c in enumerate(CLASSES)}
    meta = json.loads((raw_build / "meta.json").read_text())
    assert meta["counts"] == {"train": 19, "val": 6} and meta["skipped"] == 3
    reported = (raw_build / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[1] for line in reported) == [
        "corrupt.JPEG", "stray.JPEG", "truncated.JPEG"]


def test_jpeg_mode_round_trip_psnr_above_35db(imagefolder, tmp_path):
    src, expected = imagefolder
    assert _build(src, tmp_path, "--write-mode", "jpg", "--jpeg-quality", "90") == 0
    stored = _stored_images(tmp_path / "val.beton")
    assert all(mode == 0 for _, _, mode in stored)
    psnrs = [_psnr(image, _reference(path)) for (image, _, _), (path, _) in zip(stored, expected["val"])]
    assert min(psnrs) > 35, psnrs


def test_proportion_mode_compresses_some_images(imagefolder, tmp_path):
    assert _build(imagefolder[0], tmp_path, "--compress-probability", "0.5") == 0  # the default
    modes = [mode for _, _, mode in _stored_images(tmp_path / "train.beton")]
    assert 0 < modes.count(0) < len(modes)


def test_val_loader_centre_crops_224_of_256_and_normalises(raw_build, imagefolder):
    cfg = DataConfig(dataset="imagenet", path=str(raw_build), batch_size=4, val_resolution=64,
                     num_workers=1)
    loader = create_loader(cfg, "val")
    mean = torch.tensor(loader.meta.mean).view(1, 3, 1, 1)
    std = torch.tensor(loader.meta.std).view(1, 3, 1, 1)
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader.iterate(0)])
    x = torch.cat(xs)
    assert x.shape == (6, 3, 64, 64) and torch.cat(ys).tolist() == [0, 0, 1, 1, 2, 2]
    for image, (path, _) in zip((x * std + mean).numpy().transpose(0, 2, 3, 1), imagefolder[1]["val"]):
        ref = _reference(path)
        h, w = ref.shape[:2]
        c = int(224 / 256 * min(h, w))
        crop = ref[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c]
        expected = cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA)
        assert _psnr(image.round().clip(0, 255), expected) > 30


def _val_batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader.iterate(0)]


def test_device_normalisation_path_matches_the_cpu_one(raw_build):
    """A CUDA run's image pipeline (uint8 to the device, normalised there in torch,
    channels-last) gives the CPU pipeline's values (FFCV's table lookup); both run on the CPU."""
    cfg = DataConfig(dataset="imagenet", path=str(raw_build), batch_size=4, val_resolution=64,
                     num_workers=1)
    table = _val_batches(create_loader(cfg, "val"))
    on_device = create_loader(cfg, "val")
    on_device.normalise_on_device = True
    in_torch = _val_batches(on_device)
    assert len(table) == len(in_torch) == 2
    for (a, ya), (b, yb) in zip(table, in_torch):
        assert b.dtype == torch.float32 and b.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(ya, yb)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loader_delivers_normalised_channels_last_batches(raw_build):
    cfg = DataConfig(dataset="imagenet", path=str(raw_build), batch_size=4, val_resolution=64,
                     num_workers=1)
    cpu = _val_batches(create_loader(cfg, "val"))
    cuda = _val_batches(create_loader(cfg, "val", device=torch.device("cuda")))
    assert len(cpu) == len(cuda) == 2
    for (a, ya), (b, yb) in zip(cpu, cuda):
        assert b.is_cuda and yb.is_cuda and b.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(yb.cpu(), ya)
        torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-5)


def test_train_loader_random_resized_crops_with_progressive_resizing(raw_build):
    cfg = DataConfig(dataset="imagenet", path=str(raw_build), batch_size=8, resolution=96,
                     min_resolution=32, ramp_start_epoch=1, ramp_end_epoch=3, num_workers=1)
    loader = create_loader(cfg, "train")
    assert [loader.resolution(e) for e in range(5)] == [32, 32, 64, 96, 96]
    for epoch, size in ((0, 32), (3, 96)):
        x, y = next(iter(loader.iterate(epoch)))
        assert x.shape == (8, 3, size, size) and x.dtype == torch.float32
        assert y.shape == (8,) and y.dtype == torch.int64
    assert loader.batches_per_epoch == 19 // 8


def test_progressive_resolution_follows_ffcv_imagenet_schedule():
    # ResNet-50 88-epoch config: 160 px until epoch 65 (ramp start), 192 px from 76.
    assert progressive_resolution(10, 160, 192, 65, 76) == 160
    assert progressive_resolution(70, 160, 192, 65, 76) == 160  # 174.5 -> nearest 32 multiple
    assert progressive_resolution(72, 160, 192, 65, 76) == 192
    assert progressive_resolution(80, 160, 192, 65, 76) == 192


def test_missing_split_directory_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    assert _build(tmp_path, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "val" in err and "ImageFolder" in err
