"""The paper configs the README tells researchers to run (CIFAR-10 ResNet-19, ImageNet
ResNet-34 under the DeepSpeed ZeRO-2 block, CIFAR10-DVS-style frames) train end to end: their
data built by our builder from small files in each set's real format, one short epoch each."""
import json
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.train.trainrun import REPO, metric_history, train


def _cifar10(src, rng):
    """cifar-10-batches-py: 5 training batches of 4 images, a test batch of 4 (pickles)."""
    root = src / "cifar-10-batches-py"
    root.mkdir(parents=True)
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, 2))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"labels": rng.integers(0, 10, 4).tolist(), b"data": rng.integers(0, 256, (4, 3072), np.uint8)}
        (root / name).write_bytes(pickle.dumps(batch, 2))


def _imagenet(src, rng):
    """An ImageFolder tree: 3 synsets, 4 training and 2 validation JPEGs of odd sizes each."""
    for split, count in (("train", 4), ("val", 2)):
        for k in range(3):
            folder = src / split / f"n0000000{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(90, 200, 2)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(folder / f"{i}.JPEG", quality=90)


def _dvs_gesture(src, rng):
    """tonic's DVS Gesture .npy recordings ([N, 4]: x, y, p, t in ms), 3 gestures per user."""
    for folder, user in (("ibmGestureTrain", "user01_led"), ("ibmGestureTrain", "user02_led"),
                         ("ibmGestureTest", "user24_led")):
        for label in (0, 5, 10):
            n = 2000
            t = np.sort(rng.choice(np.arange(1, 3_000_000), n, replace=False)) // 1000
            events = np.stack([rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n), t], 1)
            (src / "DVSGesture" / folder / user).mkdir(parents=True, exist_ok=True)
            np.save(src / "DVSGesture" / folder / user / f"{label}.npy", events.astype(np.int64))


CASES = {
    # name: (writer, builder arguments, config files, overrides, ranks)
    "cifar10": (_cifar10, ["cifar10"], ["configs/cifar10_resnet19.yaml"], ["data.batch_size=8"], 1),
    "imagenet-zero2": (_imagenet, ["imagenet"],
                       ["configs/imagenet_resnet34.yaml", "configs/blocks/deepspeed_zero2.yaml"],
                       ["data.batch_size=2", "model.T=2"], 2),
    "dvs": (_dvs_gesture, ["dvs", "--set", "dvsgesture", "--T", "10", "--size", "32"],
            ["configs/dvs_cifar10dvs.yaml"], ["data.batch_size=2"], 1),
}


@pytest.mark.parametrize("case", CASES)
def test_shipped_config_trains_on_its_data_format(case, tmp_path):
    writer, build_args, configs, overrides, ranks = CASES[case]
    writer(tmp_path / "src", np.random.default_rng(0))
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "data_pipelines.build", *build_args, "--src", str(tmp_path / "src"),
                    "--out", str(data), "--workers", "2"], check=True, cwd=REPO, timeout=300, capture_output=True)
    config_args = [a for c in configs[1:] for a in ("--config", c)]
    done = train(*config_args, *overrides, f"data.path={data}", f"run.root={tmp_path / 'runs'}",
                 "optim.epochs=1", "data.num_workers=1", "tracking.log_every_steps=1",
                 config=configs[0], nproc=ranks)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    (final_path,) = (tmp_path / "runs").glob("*/final_metrics.json")
    final = json.loads(final_path.read_text())
    assert 0 <= final["val/top1"] <= 1 and any(k.startswith("firing_rate/") for k in final)
    batch = int(overrides[0].removeprefix("data.batch_size="))
    steps = json.loads((data / "meta.json").read_text())["counts"]["train"] // (batch * ranks)
    assert (final_path.parent / "checkpoints" / f"step-{steps:09d}.pt").is_file()
    experiment = {"cifar10": "cifar10", "imagenet-zero2": "imagenet", "dvs": "cifar10dvs"}[case]
    losses = [v for _, v in metric_history(tmp_path / "runs", "train/step_loss", experiment=experiment)]
    assert len(losses) == steps > 0 and all(math.isfinite(v) for v in losses)
