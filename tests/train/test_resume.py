"""Resume is exact: a run stopped by SIGUSR2 or killed outright ends with the same weights as one
that never stopped (deterministic CPU settings), and a changed config is refused."""
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from train import REQUEUE_EXIT_CODE, USER_ERROR_EXIT_CODE
from tests.train.trainrun import DEMO, REPO, start, train, train_command, train_env

pytestmark = pytest.mark.slow  # runs and kills the trainer

EPOCHS = 2


def args(root: Path, digits: Path) -> list[str]:
    return [f"run.root={root}", f"data.path={digits}", f"optim.epochs={EPOCHS}", "data.num_workers=1",
            "run.deterministic=true", "train.checkpoint_every_steps=5", "train.keep_checkpoints=2"]


def final_weights(root: Path) -> tuple[int, dict[str, torch.Tensor]]:
    newest = sorted((root / "demo-digits" / "checkpoints").glob("step-*.pt"))[-1]
    state = torch.load(newest, weights_only=True)
    return state["global_step"], state["model"]


def wait_for_checkpoint(root: Path, proc, min_step: int) -> int:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [int(p.stem.split("-")[1]) for p in (root / "demo-digits" / "checkpoints").glob("step-*.json")]
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
    proc = start(*args(tmp_path, digits_dir))
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
    proc = start(*args(tmp_path, digits_dir))
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
    # `python -m train` itself, not the forked runner: that path stays tested end to end.
    refused = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == USER_ERROR_EXIT_CODE
    assert "optim.lr" in refused.stderr and "different config" in refused.stderr


def test_non_finite_losses_in_a_row_stop_the_run_and_keep_the_checkpoints(digits_dir, tmp_path):
    done = train(f"run.root={tmp_path}", f"data.path={digits_dir}", "data.num_workers=1", "optim.lr=1e30",
                 "optim.warmup_epochs=0", "train.checkpoint_every_steps=1", "train.max_nonfinite_steps=3")
    assert done.returncode == 1
    assert "3 non-finite losses in a row" in done.stdout
    assert list((tmp_path / "demo-digits" / "checkpoints").glob("step-*.pt"))


# Every rank killed under DDP and DeepSpeed ZeRO-1/2/3, on augmented data: tests/train/test_reproducible.py.


def test_resuming_with_another_models_checkpoint_is_one_line(digits_dir, tmp_path):
    first = train(*args(tmp_path, digits_dir), "optim.epochs=1")
    assert first.returncode == 0, first.stderr[-2000:]
    other = train(*args(tmp_path, digits_dir), "optim.epochs=1", "model.neuron.recurrence=self")
    assert other.returncode == USER_ERROR_EXIT_CODE, other.stderr[-2000:]
    (line,) = other.stderr.strip().splitlines()
    assert line.startswith("error: ") and "holds the weights of another model" in line and "recurrent_weight" in line
