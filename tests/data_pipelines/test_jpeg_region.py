"""Region JPEG decoding: the crop's pixels equal FFCV's whole-image decode, in the library and
through the ImageNet loaders; without a compiler the decoders decode JPEGs whole."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                   encode_jpeg)
from ffcv.libffcv import imdecode

from data_pipelines import DataConfig, create_loader, jpeg_region, loaders, stages
from data_pipelines.build import main as build_main


def _photo(rng, height, width):
    """Smooth colour fields, edges and noise: every 8x8 block has detail, as in a photo."""
    small = rng.uniform(0, 255, (height // 12 + 2, width // 12 + 2, 3)).astype(np.float32)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 8, image.shape).astype(np.float32)
    return image.clip(0, 255).astype(np.uint8)


def _whole(jpeg, height, width):
    out = np.empty(height * width * 3, np.uint8)
    imdecode(jpeg, out, height, width, height, width, 0, 0, 1, 1, False, False)
    return out.reshape(height, width, 3)


def test_region_pixels_equal_the_whole_decode():
    decode = jpeg_region.decode_region_function()
    rng = np.random.default_rng(0)
    out, geometry = np.empty(500 * 500 * 3, np.uint8), np.zeros(2, np.int32)
    checked = 0
    # Odd sizes (partial MCUs at the right and bottom edges), as the builder stores them.
    for height, width in ((333, 500), (257, 191), (40, 45), (17, 300)):
        image = _photo(rng, height, width)
        jpeg = encode_jpeg(image, 90)
        whole = _whole(jpeg, height, width)
        assert np.abs(whole.astype(int) - image).mean() < 8  # a real decode of this image
        regions = [(0, 0, height, width), (height - 1, width - 1, 1, 1), (0, width - 17, 9, 17),
                   (height // 2, 0, height - height // 2, 3)]
        for _ in range(40):
            y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
            regions.append((y, x, int(rng.integers(1, height - y + 1)),
                            int(rng.integers(1, width - x + 1))))
        for y, x, h, w in regions:
            assert decode(jpeg, y, x, h, w, out, geometry) == 0
            offset, row = int(geometry[0]), int(geometry[1])
            assert w <= row <= width and 0 <= offset <= row - w
            got = out[:h * row * 3].reshape(h, row, 3)[:, offset:offset + w]
            np.testing.assert_array_equal(got, whole[y:y + h, x:x + w],
                                          err_msg=f"{height}x{width} image, region {(y, x, h, w)}")
            checked += 1
    assert checked == 4 * 44


def test_region_decode_reports_bad_requests_and_bad_data():
    decode = jpeg_region.decode_region_function()
    jpeg = encode_jpeg(_photo(np.random.default_rng(1), 64, 80), 90)
    out, geometry = np.empty(64 * 80 * 3, np.uint8), np.zeros(2, np.int32)
    assert decode(jpeg, 0, 0, 65, 80, out, geometry) == -3           # below the last row
    assert decode(jpeg, 0, 70, 10, 11, out, geometry) == -3          # past the last column
    assert decode(jpeg, 0, 0, 64, 80, out[:1000], geometry) == -2    # buffer too small
    garbage = np.frombuffer(b"\xff\xd8\xff\xe0" + bytes(500), np.uint8)
    assert decode(garbage, 0, 0, 1, 1, out, geometry) == -1


@pytest.fixture(scope="module")
def jpeg_build(tmp_path_factory):
    """An ImageFolder of photo-like JPEGs built in jpg mode (every image stored as JPEG)."""
    src = tmp_path_factory.mktemp("region_src")
    rng = np.random.default_rng(2)
    for split, count in (("train", 8), ("val", 6)):
        for label in ("n00000001", "n00000002"):
            (src / split / label).mkdir(parents=True)
            for i in range(count // 2):
                size = (int(rng.integers(60, 200)), int(rng.integers(60, 200)))
                image = _photo(rng, *size)
                cv2.imwrite(str(src / split / label / f"{i}.JPEG"),
                            cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    out = tmp_path_factory.mktemp("region_out")
    assert build_main(["imagenet", "--src", str(src), "--out", str(out), "--workers", "1",
                       "--write-mode", "jpg"]) == 0
    return out


#: FFCV loaders compiled with the decoders patched in, kept alive to the end (freeing them makes
#: numba's finalisers log spurious KeyErrors, see data_pipelines/loaders.py).
_KEPT: list[dict] = []


def _batches(cfg, split, epoch=0):
    loader = create_loader(cfg, split)
    return [(x.clone(), y.clone()) for x, y in loader.iterate(epoch)]


def test_val_loader_gives_ffcv_decoders_output(jpeg_build, monkeypatch):
    cfg = DataConfig(dataset="imagenet", path=str(jpeg_build), batch_size=4, val_resolution=48,
                     num_workers=1)
    assert stages.crop_decoders()[1] is jpeg_region.CenterCropRegionDecoder
    ours = _batches(cfg, "val")
    _KEPT.append({})
    monkeypatch.setattr(loaders, "_FFCV_LOADERS", _KEPT[-1])
    monkeypatch.setattr(stages, "crop_decoders",
                        lambda: (RandomResizedCropRGBImageDecoder, CenterCropRGBImageDecoder))
    ffcv = _batches(cfg, "val")
    assert len(ours) == len(ffcv) == 2
    for (a, ya), (b, yb) in zip(ours, ffcv):
        assert torch.equal(ya, yb) and torch.equal(a, b)


def test_train_loader_crops_are_decoded_regions_of_the_stored_images(jpeg_build):
    cfg = DataConfig(dataset="imagenet", path=str(jpeg_build), batch_size=4, resolution=32,
                     num_workers=2, flip=False)
    x = torch.cat([b[0] for b in _batches(cfg, "train")])
    assert x.shape == (8, 3, 32, 32) and torch.isfinite(x).all()
    # Different random crops of different images: no two alike, none blank.
    flat = x.flatten(1)
    assert (flat.std(1) > 0.05).all() and torch.cdist(flat, flat).add(torch.eye(8) * 1e9).min() > 0


def test_without_a_compiler_the_decoders_decode_whole_jpegs_to_the_same_crops(
        jpeg_build, tmp_path, monkeypatch):
    """FFCV's random crop is not seeded, so the fallback is ours decoding JPEGs whole: the same
    keyed crops, the same pixels as the region decode."""
    cfg = DataConfig(dataset="imagenet", path=str(jpeg_build), batch_size=4, resolution=32,
                     num_workers=1)
    regions = _batches(cfg, "train", epoch=1)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SPIKESCALE_CACHE", str(tmp_path / "cache"))
    jpeg_region._library.cache_clear()
    jpeg_region._warn_once.cache_clear()
    try:
        available, why = jpeg_region.region_decoders_available()
        assert not available and "no-such-cc" in why
        with pytest.warns(UserWarning, match="decoded whole"):
            decoders = jpeg_region.crop_decoders()
        assert decoders == (jpeg_region.RandomResizedCropRegionDecoder,
                            jpeg_region.CenterCropRegionDecoder)
        assert not list((tmp_path / "cache").glob("*"))  # no half-written library left behind
        _KEPT.append({})
        monkeypatch.setattr(loaders, "_FFCV_LOADERS", _KEPT[-1])  # compile without the library
        wholes = _batches(cfg, "train", epoch=1)
    finally:
        jpeg_region._library.cache_clear()
    assert len(regions) == len(wholes) == 2
    for (a, ya), (b, yb) in zip(regions, wholes):
        assert torch.equal(ya, yb) and torch.equal(a, b)
