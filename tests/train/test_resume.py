"""Resume is exact: a run stopped by SIGUSR2 or killed outright ends with the same weights as one
that never stopped (deterministic CPU settings), and a changed config is refused."""
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from train import REQUEUE_EXIT_CODE, USER_ERROR_EXIT_CODE
from tests.train.trainrun import DEMO, REPO, train, train_command, train_env

EPOCHS = 2


def args(root: Path, digits: Path) -> list[str]:
    return [f"run.root={root}", f"data.path={digits}", f"optim.epochs={EPOCHS}", "data.num_workers=1",
            "run.deterministic=true", "train.checkpoint_every_steps=5", "train.keep_checkpoints=2"]


def final_weights(root: Path) -> tuple[int, dict[str, torch.Tensor]]:
    newest = sorted((root / "demo-digits" / "checkpoints").glob("step-*.pt"))[-1]
    state = torch.load(newest, weights_only=True)
    return state["global_step"], state["model"]


def wait_for_checkpoint(root: Path, proc: subprocess.Popen, min_step: int) -> int:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [int(p.stem.split("-")[1]) for p in (root / "demo-digits" / "checkpoints").glob("step-*.pt")]
        if steps and max(steps) >= min_step:
            return max(steps)
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step >= {min_step} (exit code {proc.poll()})")


@pytest.fixture(scope="module")
def reference(digits_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    done = train(*args(root, digits_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return final_weights(root)


def assert_same_weights(a, b):
    (step_a, wa), (step_b, wb) = a, b
    assert step_a == step_b
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"


def test_sigusr2_saves_exits_for_requeue_and_resumes_exactly(reference, digits_dir, tmp_path):
    proc = subprocess.Popen(train_command(*args(tmp_path, digits_dir)), cwd=REPO, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(tmp_path, proc, min_step=10)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert "SIGUSR2: checkpoint saved at step" in out
    stopped_at, _ = final_weights(tmp_path)
    resumed = train(*args(tmp_path, digits_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {stopped_at}" in resumed.stdout.splitlines()[0] or f"step {stopped_at}" in resumed.stdout
    assert_same_weights(final_weights(tmp_path), reference)


def test_sigkill_at_a_random_step_then_resume_gives_identical_weights(reference, digits_dir, tmp_path):
    proc = subprocess.Popen(train_command(*args(tmp_path, digits_dir)), cwd=REPO, env=train_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(tmp_path, proc, min_step=random.Random().randrange(5, 60))
    proc.kill()
    proc.wait(timeout=60)
    resumed = train(*args(tmp_path, digits_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_weights(final_weights(tmp_path), reference)


def test_resume_with_an_unnamed_config_change_is_refused(reference, digits_dir, tmp_path):
    root = tmp_path / "runs"
    assert train(*args(root, digits_dir), "optim.epochs=1").returncode == 0
    changed = tmp_path / "changed.yaml"
    changed.write_text(Path(DEMO).read_text().replace("lr: 0.1", "lr: 0.2"))
    cmd = train_command(*args(root, digits_dir), "optim.epochs=1")
    cmd[cmd.index(DEMO)] = str(changed)
    refused = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == USER_ERROR_EXIT_CODE
    assert "optim.lr" in refused.stderr and "different config" in refused.stderr


def test_non_finite_losses_in_a_row_stop_the_run_and_keep_the_checkpoints(digits_dir, tmp_path):
    done = train(f"run.root={tmp_path}", f"data.path={digits_dir}", "data.num_workers=1", "optim.lr=1e30",
                 "optim.warmup_epochs=0", "train.checkpoint_every_steps=1", "train.max_nonfinite_steps=3")
    assert done.returncode == 1
    assert "3 non-finite losses in a row" in done.stdout
    assert list((tmp_path / "demo-digits" / "checkpoints").glob("step-*.pt"))


# ----------------------------------------------------------------------------- two ranks

RANKED = {
    "ddp": ["train.strategy=ddp"],
    "deepspeed-zero2": ["train.strategy=deepspeed", "train.deepspeed.zero_stage=2"],
}


def ranked_args(root: Path, digits: Path, strategy: str) -> list[str]:
    # One epoch (45 steps of 2 x 16) keeps the pair of runs per strategy to about a minute or two.
    return [*args(root, digits), "optim.epochs=1", "data.batch_size=16", *RANKED[strategy]]


def ranked_final_weights(root: Path, strategy: str) -> tuple[int, dict[str, torch.Tensor]]:
    if strategy == "ddp":
        return final_weights(root)
    # DeepSpeed: our manifest names the engine's checkpoint; its model file holds the weights.
    ckpts = root / "demo-digits" / "checkpoints"
    manifest = torch.load(sorted(ckpts.glob("step-*.pt"))[-1], weights_only=True)
    engine_state = torch.load(ckpts / "deepspeed" / manifest["deepspeed_tag"] / "mp_rank_00_model_states.pt",
                              map_location="cpu", weights_only=False)
    return manifest["global_step"], engine_state["module"]


@pytest.fixture(scope="module", params=list(RANKED))
def ranked_reference(request, digits_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"reference-{request.param}")
    done = train(*ranked_args(root, digits_dir, request.param), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return request.param, ranked_final_weights(root, request.param)


def test_sigkill_of_every_rank_then_resume_gives_identical_weights(ranked_reference, digits_dir, tmp_path):
    strategy, reference_weights = ranked_reference
    # Its own session: the kill takes torchrun and both ranks at once, like a node going down.
    proc = subprocess.Popen(train_command(*ranked_args(tmp_path, digits_dir, strategy), nproc=2), cwd=REPO,
                            env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        killed_after = wait_for_checkpoint(tmp_path, proc, min_step=random.Random().randrange(5, 35))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    resumed = train(*ranked_args(tmp_path, digits_dir, strategy), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout, resumed.stdout[-2000:]
    assert ranked_final_weights(tmp_path, strategy)[0] > killed_after
    assert_same_weights(ranked_final_weights(tmp_path, strategy), reference_weights)
