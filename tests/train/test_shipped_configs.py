"""The paper configs the README tells researchers to run (CIFAR-10 ResNet-19, ImageNet
ResNet-34 under the DeepSpeed ZeRO-2 block, CIFAR10-DVS-style frames, the spiking transformers'
ImageNet and CIFAR-10 recipes) train end to end: their
data built by our builder from small files in each set's real format, one short epoch each."""
import json
import math
import pickle
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from tests.train.trainrun import REPO, metric_history, run_module, train

pytestmark = pytest.mark.slow  # runs the trainer


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


class Case(NamedTuple):
    write: Callable            # writes the raw files under a source folder
    build: list[str]           # data_pipelines.build arguments before --src/--out
    configs: list[str]         # --config files, in order
    batch: int                 # data.batch_size per rank
    ranks: int
    experiment: str            # the configs' tracking.experiment
    overrides: tuple[str, ...] = ()


CASES = {
    "cifar10": Case(_cifar10, ["cifar10"], ["configs/cifar10_resnet19.yaml"], 8, 1, "cifar10"),
    "imagenet-resnet50": Case(_imagenet, ["imagenet"], ["configs/imagenet_resnet50.yaml"], 4, 1, "imagenet",
                              ("data.resolution=64", "data.val_resolution=64", "data.min_resolution=0")),
    "imagenet-zero2": Case(_imagenet, ["imagenet"],
                           ["configs/imagenet_resnet34.yaml", "configs/blocks/deepspeed_zero2.yaml"],
                           2, 2, "imagenet", ("model.T=2",)),
    "dvs": Case(_dvs_gesture, ["dvs", "--set", "dvsgesture", "--T", "10", "--size", "32"],
                ["configs/dvs_cifar10dvs.yaml"], 2, 1, "cifar10dvs"),
}
# The spiking transformers' paper recipes with each family's smallest ImageNet model, at T = 1
# on 64 px images (4 x 4 tokens), to keep each run to seconds. Meta-SpikeFormer's attention is
# silent at init below 14 x 14 tokens at T = 1, and its gradients overflow (models/spike_driven.py):
# its ImageNet case runs at 224 px, its CIFAR one at T = 2.
_TINY = ("model.T=1", "data.resolution=64", "data.val_resolution=64")
CASES.update({
    f"cifar10-{family}": Case(_cifar10, ["cifar10"], [f"configs/cifar10_{family}.yaml"], 8, 1, "cifar10",
                              ("model.T=2" if family == "meta_spikeformer" else "model.T=1",))
    for family in ("spikformer", "spike_driven", "meta_spikeformer", "qkformer")
})
CASES.update({
    f"imagenet-{family}": Case(_imagenet, ["imagenet"], [f"configs/imagenet_{family}.yaml"], 4, 1, "imagenet",
                               (*_TINY, f"model.name={smallest}", *extra))
    for family, smallest, extra in (("spikformer", "spikformer_8_384", ()),
                                    ("spike_driven", "spike_driven_8_384", ()),
                                    ("meta_spikeformer", "meta_spikeformer_8_256",
                                     ("data.resolution=224", "data.val_resolution=224")),
                                    ("qkformer", "qkformer_10_384", ("optim.accumulate=1",)))
})


@pytest.fixture(scope="module")
def built_data(tmp_path_factory):
    """Each data format built once for the module (several configs train on one): case -> the
    folder `python -m data_pipelines.build` wrote from the case's raw files."""
    built: dict[tuple, object] = {}

    def build(case: Case):
        key = (case.write, tuple(case.build))
        if key not in built:
            root = tmp_path_factory.mktemp("data")
            case.write(root / "src", np.random.default_rng(0))
            done = run_module("data_pipelines.build", *case.build, "--src", str(root / "src"),
                              "--out", str(root / "data"), "--workers", "2", timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            built[key] = root / "data"
        return built[key]
    return build


@pytest.mark.parametrize("name", CASES)
def test_shipped_config_trains_on_its_data_format(name, tmp_path, built_data):
    case = CASES[name]
    data = built_data(case)
    config_args = [a for c in case.configs[1:] for a in ("--config", c)]
    done = train(*config_args, *case.overrides, "train.precision=fp32", f"data.batch_size={case.batch}", f"data.path={data}",
                 f"run.root={tmp_path / 'runs'}", "optim.epochs=1", "data.num_workers=1",
                 "tracking.log_every_steps=1", config=case.configs[0], nproc=case.ranks)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    (final_path,) = (tmp_path / "runs").glob("*/final_metrics.json")
    final = json.loads(final_path.read_text())
    assert 0 <= final["val/top1"] <= 1 and any(k.startswith("firing_rate/") for k in final)
    steps = json.loads((data / "meta.json").read_text())["counts"]["train"] // (case.batch * case.ranks)
    assert (final_path.parent / "checkpoints" / f"step-{steps:09d}.pt").is_file()
    losses = [v for _, v in metric_history(tmp_path / "runs", "train/step_loss", experiment=case.experiment)]
    assert len(losses) == steps > 0 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("steps", [2, 6])
def test_the_other_cifar10_timesteps_are_the_trained_recipe_at_another_T(steps):
    """cifar10_resnet19_T2/T6.yaml train as the T = 4 case above does: they differ from it in T
    and the run name only (training each again would only repeat that case)."""
    from train.config import flat_items, load_config, to_dict

    base = flat_items(to_dict(load_config(REPO / "configs/cifar10_resnet19.yaml")))
    other = flat_items(to_dict(load_config(REPO / f"configs/cifar10_resnet19_T{steps}.yaml")))
    assert {k for k in base if base[k] != other[k]} == {"model.T", "run.name"}
    assert other["model.T"] == steps and other["run.name"] == f"cifar10-resnet19-T{steps}"
