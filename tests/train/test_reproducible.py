"""Same seed, same bits, with augmentation on: with the paper configs' pipelines (CIFAR pad-4 crop
and flip, ImageNet random-resized crop and flip, DVS flip and shift), a run killed at a random
step and resumed (with another worker count) ends with the weights, optimizer state and logged
losses of one that never stopped, on every data set kind (one process) and under every strategy
(2 ranks: DDP, DeepSpeed ZeRO-1/2/3) on augmented CIFAR."""
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import NMNIST_T
from tests.train.trainrun import REPO, start, train, train_command, train_env
from train import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow  # runs and kills the trainer

COMMON = ["model.name=spiking_resnet_tiny", "train.strategy=single", "train.precision=fp32", "run.name=repro",
          "run.deterministic=true", "train.checkpoint_every_steps=1", "train.keep_checkpoints=2",
          "tracking.log_every_steps=1", "train.checkpointing=none"]
KINDS = {  # config, data fixture, overrides: each with its augmentation on
    "cifar": ("configs/cifar10_resnet19.yaml", "small_cifar10", ["model.T=2", "data.batch_size=8", "optim.epochs=2"]),
    "imagenet": ("configs/imagenet_resnet34.yaml", "small_imagenet",
                 ["model.T=2", "data.batch_size=2", "optim.epochs=2", "data.resolution=32", "data.val_resolution=32",
                  "data.min_resolution=0"]),
    "dvs": ("configs/dvs_cifar10dvs.yaml", "small_nmnist",
            [f"model.T={NMNIST_T}", "data.batch_size=2", "optim.epochs=2", "data.flip=true", "data.translate=2"]),
}
STRATEGIES = {
    "ddp": ["train.strategy=ddp"],
    "zero1": ["train.strategy=deepspeed", "train.deepspeed.zero_stage=1"],
    "zero2": ["train.strategy=deepspeed", "train.deepspeed.zero_stage=2"],
    "zero3": ["train.strategy=deepspeed", "train.deepspeed.zero_stage=3"],
}


def run_args(kind: str, data: Path, root: Path, *extra: str) -> tuple[str, list[str]]:
    config, _, overrides = KINDS[kind]
    return config, [*COMMON, *overrides, f"data.path={data}", f"run.root={root}", *extra]


def final_state(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the newest checkpoint, DeepSpeed's engine files included, by a flat name."""
    ckpts = root / "repro" / "checkpoints"
    manifest_path = sorted(ckpts.glob("step-*.pt"))[-1]
    manifest = torch.load(manifest_path, weights_only=True)
    files = {"manifest": manifest}
    if "deepspeed_tag" in manifest:
        for path in sorted((ckpts / "deepspeed" / manifest["deepspeed_tag"]).glob("*.pt")):
            files[path.name] = torch.load(path, map_location="cpu", weights_only=False)
    flat: dict[str, torch.Tensor] = {"global_step": torch.tensor(manifest["global_step"])}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)

    for name, content in files.items():
        walk(name, {k: v for k, v in content.items() if k not in ("rng", "mlflow_run_id", "config")}
             if name == "manifest" else content)
    return flat


def losses(root: Path) -> list[tuple[int, float]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/step_loss"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ: {different[:5]}"


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def kill_at_a_random_checkpoint(config: str, args: list[str], root: Path, nproc: int, last: int,
                                first: int = 1) -> int:
    """Start the run and SIGKILL every process of it (launcher and ranks) once a checkpoint past a
    random step exists, as a node going down would; returns that step."""
    proc = (start(*args, config=config) if nproc == 1 else
            subprocess.Popen(train_command(*args, nproc=nproc, config=config), cwd=REPO, env=train_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    target = random.Random().randrange(first, last)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [int(p.stem.split("-")[1]) for p in (root / "repro" / "checkpoints").glob("step-*.pt")]
            if steps and max(steps) >= target:
                return max(steps)
            time.sleep(0.01)
        raise AssertionError(f"no checkpoint at step >= {target} (exit code {proc.poll()})")
    finally:
        # torchrun starts every rank in a session of its own: kill the whole tree, not a group.
        launcher = _process(proc.pid)
        family = [proc.pid, *(child.pid for child in (launcher.children(recursive=True) if launcher else []))]
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
        psutil.wait_procs([p for p in map(_process, family) if p is not None], timeout=60)


def state_step(root: Path) -> int:
    return max(int(p.stem.split("-")[1]) for p in (root / "repro" / "checkpoints").glob("step-*.pt"))


def wait_for_checkpoint_then(run, root: Path, step: int, sig: int) -> int:
    """Send `sig` to `run` once a checkpoint at or past `step` exists; returns that step."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.poll() is None:
        steps = [int(p.stem.split("-")[1]) for p in (root / "repro" / "checkpoints").glob("step-*.pt")]
        if steps and max(steps) >= step:
            run.send_signal(sig)
            return max(steps)
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint at step >= {step} (exit code {run.poll()})")


@pytest.fixture(scope="module", params=list(KINDS))
def reference(request, tmp_path_factory):
    kind = request.param
    data = request.getfixturevalue(KINDS[kind][1])
    root = tmp_path_factory.mktemp(f"reference-{kind}")
    config, args = run_args(kind, data, root, "data.num_workers=1")
    done = train(*args, config=config)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return kind, data, final_state(root), losses(root)


def test_stopped_by_sigusr2_then_killed_and_resumed_with_other_workers_is_bit_identical(reference, tmp_path):
    """SIGUSR2 mid-epoch (save, exit for requeue), a resume killed at a later random step, and a
    last resume that decodes with 2 workers instead of 1: neither the augmentation nor the
    model's arithmetic may depend on the stops or the decode threads."""
    kind, data, state, history = reference
    config, args = run_args(kind, data, tmp_path, "data.num_workers=1")
    last = int(state["global_step"])
    run = start(*args, config=config)
    wait_for_checkpoint_then(run, tmp_path, random.Random().randrange(1, last // 2), signal.SIGUSR2)
    assert run.wait(timeout=300) == REQUEUE_EXIT_CODE, run.output()[1][-3000:]
    stopped_at = int(state_step(tmp_path))
    assert f"SIGUSR2: checkpoint saved at step {stopped_at}" in run.output()[0]
    killed_after = kill_at_a_random_checkpoint(config, args, tmp_path, 1, last, first=stopped_at + 1)
    resumed = train(*args, "data.num_workers=2", config=config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step-{killed_after:09d}.pt" in resumed.stdout or "resumed from" in resumed.stdout
    assert_identical(final_state(tmp_path), state)
    assert losses(tmp_path) == history


@pytest.fixture(scope="module", params=list(STRATEGIES))
def ranked_reference(request, small_cifar10, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"reference-{request.param}")
    config, args = run_args("cifar", small_cifar10, root, "data.num_workers=1", "optim.epochs=1",
                            *STRATEGIES[request.param])
    done = train(*args, config=config, nproc=2)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return request.param, final_state(root), losses(root)


def test_every_strategy_killed_and_resumed_on_augmented_cifar_is_bit_identical(ranked_reference, small_cifar10,
                                                                                 tmp_path):
    strategy, state, history = ranked_reference
    config, args = run_args("cifar", small_cifar10, tmp_path, "data.num_workers=1", "optim.epochs=1",
                            *STRATEGIES[strategy])
    kill_at_a_random_checkpoint(config, args, tmp_path, 2, int(state["global_step"]))
    resumed = train(*args, config=config, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout, resumed.stdout[-2000:]
    assert_identical(final_state(tmp_path), state)
    assert losses(tmp_path) == history
