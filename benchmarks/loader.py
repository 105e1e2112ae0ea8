"""Images/s of the ImageNet train pipeline: our FFCV loader vs torchvision ImageFolder (not a test).

All decode the same generated ImageNet-shaped JPEGs (~350 px, quality 90), random-resized-crop
to 224 px, flip, and convert to a normalised float32 tensor on the CPU, with the same number of
workers (FFCV: decode threads; torchvision: DataLoader processes) and batch size:

- ffcv_jpg: a .beton with every image re-encoded at quality 90 (as many JPEGs to decode as
  torchvision has; our loaders decode only each crop's rows and columns, see
  data_pipelines/jpeg_region.py);
- ffcv_proportion: ffcv-imagenet's ResNet-50 setting (half the images stored raw), the default
  of `python -m data_pipelines.build imagenet`;
- torchvision: ImageFolder + DataLoader with PIL, from the JPEG files;
- ffcv_proportion_uint8: the proportion loader's CPU stages as they run when training on a GPU
  (decode, crop, flip, uint8 handed over; the GPU normalises), for reference: not the same
  output as torchvision's, so not the comparison the target is about.

Each gets a warm-up epoch (FFCV's JIT compile, DataLoader start-up, page cache), then timed
epochs interleaved round by round, so that other load on the machine hits all of them alike.

    python -m benchmarks.loader                       # 5000 images, 2 workers
    python -m benchmarks.loader --workers 16 --images 20000

The generated images and .beton files stay in --cache-dir for the next run. Results go to
``benchmarks/results/loader-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from ffcv.transforms import NormalizeImage

from benchmarks.common import cpu_name, machine_name
from data_pipelines import DataConfig, create_loader
from data_pipelines.build import main as build_main
from data_pipelines.common import is_built
from data_pipelines.imagenet import IMAGENET_MEAN, IMAGENET_STD
from data_pipelines.loaders import EpochLoader

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NUM_CLASSES = 100
JPEG_QUALITY = 90


def _photo_like(seed: int) -> np.ndarray:
    """A ~350 px RGB image with smooth regions, edges and sensor-like noise, so that its JPEG
    is about the size (and decode cost) of an ImageNet photo at that resolution (~40 KB)."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = (int(rng.integers(300, 400)), int(rng.integers(300, 470)))
    small = rng.uniform(0, 255, (h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    image = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(10, 120)), int(rng.integers(10, 120)))
        cv2.ellipse(image, center, axes, float(rng.uniform(0, 180)), 0, 360,
                    rng.uniform(0, 255, 3).tolist(), -1)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_image(job: tuple[int, str]) -> int:
    from PIL import Image

    seed, path = job
    Image.fromarray(_photo_like(seed)).save(path, quality=JPEG_QUALITY)
    return os.path.getsize(path)


def generate_images(root: Path, count: int, workers: int) -> dict:
    """ImageFolder tree `root/{train,val}/<class>/*.JPEG`: `count` train images over 100
    classes, one val image per class (the builder wants a val split). Kept if complete."""
    done = root / "complete.json"
    if done.is_file():
        return json.loads(done.read_text())
    jobs = []
    for split, n in (("train", count), ("val", NUM_CLASSES)):
        for c in range(NUM_CLASSES):
            (root / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            c = i % NUM_CLASSES
            jobs.append((len(jobs), str(root / split / f"n{c:08d}" / f"{split}_{i:07d}.JPEG")))
    print(f"generating {len(jobs)} JPEGs in {root} ...")
    with get_context("fork").Pool(workers) as pool:
        sizes = pool.map(_write_image, jobs, chunksize=64)
    info = {"train_images": count, "classes": NUM_CLASSES, "jpeg_quality": JPEG_QUALITY,
            "mean_jpeg_kb": round(float(np.mean(sizes)) / 1024, 1)}
    done.write_text(json.dumps(info))
    return info


class _Uint8Loader(EpochLoader):
    """The train loader without its CPU normalisation stage (a GPU run normalises on the GPU)."""

    def _pipelines(self, resolution):
        pipelines = super()._pipelines(resolution)
        pipelines["image"] = [op for op in pipelines["image"] if not isinstance(op, NormalizeImage)]
        return pipelines


class FfcvEpochs:
    """Our train loader (`create_loader`) at 224 px on CPU; one call = one timed epoch.

    `uint8=True` drops the CPU normalisation stage, leaving what the CPU does for a GPU run.
    """

    def __init__(self, beton_dir: Path, workers: int, batch_size: int, uint8: bool = False):
        cfg = DataConfig(dataset="imagenet", path=str(beton_dir), batch_size=batch_size,
                         num_workers=workers, resolution=224)
        self.loader = create_loader(cfg, "train", seed=0)
        self.dtype = torch.uint8 if uint8 else torch.float32
        if uint8:
            base = self.loader
            self.loader = _Uint8Loader(cfg, "train", base.meta, base.beton, rank=0, world_size=1,
                                       seed=0, device=base.device)
        self.images = self.loader.samples_per_epoch
        self.epoch = 0
        self.first_batch_s: list[float] = []

    def __call__(self) -> float:
        start = time.perf_counter()
        for i, (x, _) in enumerate(self.loader.iterate(self.epoch)):
            if i == 0:
                self.first_batch_s.append(time.perf_counter() - start)
        self.epoch += 1
        assert x.shape[1:] == (3, 224, 224) and x.dtype == self.dtype
        return time.perf_counter() - start


class TorchvisionEpochs:
    """ImageFolder + DataLoader (PIL decode) with the same pipeline, workers and batch size."""

    def __init__(self, image_root: Path, workers: int, batch_size: int):
        from torchvision import datasets, transforms

        transform = transforms.Compose([
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD]),
        ])
        dataset = datasets.ImageFolder(str(image_root / "train"), transform=transform)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                                  num_workers=workers, drop_last=True,
                                                  persistent_workers=True)
        self.images = len(self.loader) * batch_size

    def __call__(self) -> float:
        start = time.perf_counter()
        for x, _ in self.loader:
            pass
        assert x.shape[1:] == (3, 224, 224) and x.dtype == torch.float32
        return time.perf_counter() - start


def measure(loaders: dict[str, Callable[[], float]], images: dict[str, int], rounds: int) -> dict:
    """One warm-up epoch each (JIT compile, worker start-up, page cache), then `rounds` rounds
    of one epoch each, interleaved so that a change in machine load hits all loaders alike.
    Headline: the best round (least disturbed); the median is reported too."""
    results = {}
    for name, run in loaders.items():
        print(f"warm-up epoch: {name}")
        results[name] = {"warmup_epoch_s": run(), "epoch_s": []}
    for r in range(rounds):
        for name, run in loaders.items():
            results[name]["epoch_s"].append(run())
            print(f"round {r + 1}/{rounds} {name}: "
                  f"{images[name] / results[name]['epoch_s'][-1]:.0f} images/s")
    for name, res in results.items():
        res["images_per_epoch"] = images[name]
        res["images_per_s_best"] = images[name] / min(res["epoch_s"])
        res["images_per_s_median"] = images[name] / statistics.median(res["epoch_s"])
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write the JSON; returns 0."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="decode workers for both loaders")
    parser.add_argument("--images", type=int, default=5000, help="training images generated")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed epochs per loader after the warm-up, interleaved")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/spikescale-bench"))
    parser.add_argument("--machine", default=machine_name("cpu"),
                        help="name of this machine in the results file name")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: "
                        "benchmarks/results/loader-<machine>.json)")
    args = parser.parse_args(argv)

    image_root = args.cache_dir / f"imagenet-{args.images}"
    data_info = generate_images(image_root, args.images, max(1, os.cpu_count() or 1))
    # jpg: every image a q90 JPEG, as torchvision reads them;
    # proportion: ffcv-imagenet's ResNet-50 setting (half stored raw), what training uses.
    betons = {mode: args.cache_dir / f"imagenet-{args.images}-ffcv-{mode}" for mode in
              ("jpg", "proportion")}
    for mode, beton_dir in betons.items():
        if not is_built(beton_dir):
            build_main(["imagenet", "--src", str(image_root), "--out", str(beton_dir),
                        "--write-mode", mode, "--jpeg-quality", str(JPEG_QUALITY),
                        "--max-resolution", "500", "--compress-probability", "0.5"])

    loaders: dict[str, Callable[[], float]] = {
        f"ffcv_{mode}": FfcvEpochs(beton_dir, args.workers, args.batch_size)
        for mode, beton_dir in betons.items()}
    loaders["torchvision"] = TorchvisionEpochs(image_root, args.workers, args.batch_size)
    loaders["ffcv_proportion_uint8"] = FfcvEpochs(betons["proportion"], args.workers,
                                                  args.batch_size, uint8=True)
    images = {name: run.images for name, run in loaders.items()}
    results = measure(loaders, images, args.rounds)
    for name, run in loaders.items():
        if isinstance(run, FfcvEpochs):
            results[name]["epoch_start_to_first_batch_s"] = float(np.median(run.first_batch_s[1:]))
    # Speedup = median over rounds of the ratio within a round (epochs run back to back), which
    # cancels most of the load other processes put on the machine; best/best is given too.
    base = results["torchvision"]
    for res in results.values():
        res["images_per_s_per_worker"] = res["images_per_s_median"] / args.workers
        res["speedup_vs_torchvision"] = statistics.median(
            (res["images_per_epoch"] / own) / (base["images_per_epoch"] / tv)
            for own, tv in zip(res["epoch_s"], base["epoch_s"]))
        res["speedup_best_vs_best"] = res["images_per_s_best"] / base["images_per_s_best"]
    result = {
        "benchmark": "ImageNet train pipeline, 224 px random-resized-crop + flip + normalise "
                     "to float32, all on CPU",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"name": args.machine, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                    "load_average_at_end": os.getloadavg(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "data": {**data_info, "ffcv_max_resolution": 500, "ffcv_jpeg_quality": JPEG_QUALITY},
        "workers": args.workers,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "results": results,
    }
    out = args.out or RESULTS_DIR / f"loader-{args.machine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, res in results.items():
        print(f"{name:>16}: {res['images_per_s_median']:7.0f} images/s median, "
              f"{res['images_per_s_best']:7.0f} best; {res['speedup_vs_torchvision']:.2f}x "
              f"torchvision (median of per-round ratios)")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
