"""Fixtures shared across rooms, built once per session: the embedded digits, and small data sets
in the real formats with augmentation (CIFAR-10 pickles, an ImageFolder of JPEGs, N-MNIST events)."""
import os
import tempfile
from pathlib import Path

import pickle

import cv2
import numpy as np
import pytest

from data_pipelines.build import main as build_main

REPO = Path(__file__).resolve().parents[1]
NMNIST_T = 4  # frames per recording of small_nmnist


def pytest_configure(config):
    """The tests' Inductor cache, one per vector ISA. With the default one
    (/tmp/torchinductor_<user>), kernels compiled under one ISA were loaded under another after
    ATEN_CPU_CAPABILITY=avx2 (as on CPUs without AVX-512): compiled losses off by 3e-3 and
    'tuple args required' errors from the kernels. An explicit TORCHINDUCTOR_CACHE_DIR is kept;
    xdist workers and the runs the tests start inherit it."""
    isa = os.environ.get("ATEN_CPU_CAPABILITY", "native")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"spikescale-inductor-{isa}"))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """sklearn's digits written to FFCV files by the builder's command line, in process."""
    out = tmp_path_factory.mktemp("data") / "digits"
    assert build_main(["digits", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def seqdigits_dir(tmp_path_factory) -> Path:
    """The same digits as row sequences (`seqdigits`), built once per test run in process."""
    out = tmp_path_factory.mktemp("data") / "seqdigits"
    assert build_main(["seqdigits", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def small_cifar10(tmp_path_factory):
    """A CIFAR-10 build from official-format pickle batches: 5 x 16 train, 8 test images."""
    root = tmp_path_factory.mktemp("seed_cifar_src") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    for name, n in [(f"data_batch_{i}", 16) for i in range(1, 6)] + [("test_batch", 8)]:
        labels = rng.integers(0, 10, n)
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": labels.tolist(), b"filenames": [b"x.png"] * n}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    out = tmp_path_factory.mktemp("seed_cifar")
    assert build_main(["cifar10", "--src", str(root), "--out", str(out), "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def small_imagenet(tmp_path_factory):
    """An ImageFolder of 12 train, 2 val JPEGs of different sizes, stored as JPEG."""
    src = tmp_path_factory.mktemp("seed_imagenet_src")
    rng = np.random.default_rng(1)
    for split, per_class in (("train", 6), ("val", 1)):
        for name in ("n00000001", "n00000002"):
            (src / split / name).mkdir(parents=True)
            for i in range(per_class):
                height, width = int(rng.integers(48, 120)), int(rng.integers(48, 120))
                small = rng.uniform(0, 255, (height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
                image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
                image = image.clip(0, 255).astype(np.uint8)
                cv2.imwrite(str(src / split / name / f"{i}.JPEG"), image,
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
    out = tmp_path_factory.mktemp("seed_imagenet")
    assert build_main(["imagenet", "--src", str(src), "--out", str(out), "--workers", "1",
                       "--write-mode", "jpg"]) == 0
    return out


@pytest.fixture(scope="session")
def small_nmnist(tmp_path_factory):
    """An N-MNIST build: 3 digits x 4 train, 1 test recordings of 34 x 34 events, T = NMNIST_T."""
    root = tmp_path_factory.mktemp("seed_dvs_src")
    rng = np.random.default_rng(2)
    for folder, per_digit in (("Train", 4), ("Test", 1)):
        for digit in range(3):
            for i in range(per_digit):
                n = NMNIST_T * int(rng.integers(20, 60))
                record = np.zeros((n, 5), np.uint8)  # x, y, polarity bit 7 + 23-bit time
                t = np.sort(rng.choice(np.arange(1, 300_000), n, replace=False))
                record[:, 0], record[:, 1] = rng.integers(0, 34, n), rng.integers(0, 34, n)
                record[:, 2] = (rng.integers(0, 2, n) << 7) | ((t >> 16) & 0x7F)
                record[:, 3], record[:, 4] = (t >> 8) & 0xFF, t & 0xFF
                path = root / "NMNIST" / folder / str(digit) / f"{i:05d}.bin"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(record.tobytes())
    out = tmp_path_factory.mktemp("seed_dvs")
    assert build_main(["dvs", "--set", "nmnist", "--src", str(root), "--out", str(out),
                       "--T", str(NMNIST_T), "--workers", "1"]) == 0
    return out
