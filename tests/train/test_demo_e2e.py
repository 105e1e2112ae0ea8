"""The walking skeleton end to end: build the digits, train, checkpoint, resume, MLflow."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # runs `python -m train`

REPO = Path(__file__).resolve().parents[2]


def train(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train", "--config", str(REPO / "configs/demo_digits.yaml"), *overrides]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def demo_run(digits_dir, tmp_path_factory):
    """Two epochs, then the same command with one more epoch: must resume, not restart."""
    root = tmp_path_factory.mktemp("runs")
    args = [f"data.path={digits_dir}", f"run.root={root}", "data.num_workers=1"]
    first = train(*args, "optim.epochs=2", cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(*args, "optim.epochs=3", cwd=REPO)
    assert second.returncode == 0, second.stderr[-3000:]
    return root, first, second


def test_demo_learns_well_above_chance(demo_run):
    _, _, second = demo_run
    top1 = float(re.search(r"final validation top-1: ([0-9.]+)", second.stdout).group(1))
    assert top1 > 0.6, second.stdout  # chance is 0.1


def test_demo_writes_checkpoints_and_resumes_where_it_stopped(demo_run):
    root, first, second = demo_run
    ckpts = sorted((root / "demo-digits" / "checkpoints").glob("step-*.pt"))
    assert ckpts, "no checkpoint written"
    assert "epoch 2/2" in first.stdout
    assert "resumed from" in second.stdout and "epoch: 2" in second.stdout.replace("epoch 2,", "epoch: 2")
    assert "epoch 3/3" in second.stdout and "epoch 1/3" not in second.stdout
    assert (root / "demo-digits" / "config.yaml").read_text().count("epochs: 3") == 1


def test_mlflow_run_has_metrics_and_a_firing_rate_per_neuron_layer(demo_run):
    import timm

    import models.zoo  # noqa: F401  (registers the spiking networks)

    root, _, _ = demo_run
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "resume must continue the same MLflow run"
    run = runs[0]
    assert run.data.params["model.name"] == "spiking_resnet_tiny"
    history = client.get_metric_history(run.info.run_id, "val/top1")
    assert [m.step for m in history] == [1, 2, 3]
    model = timm.create_model("spiking_resnet_tiny", T=4, num_classes=10, in_chans=1)
    lif_names = {n for n, m in model.named_modules() if type(m).__name__ == "LIF"}
    logged = {k.split("/", 1)[1] for k in run.data.metrics if k.startswith("firing_rate/")}
    assert lif_names and logged == lif_names


def test_a_corrupt_newest_checkpoint_is_named_once_and_the_resume_line_names_the_one_loaded(demo_run, digits_dir,
                                                                                               tmp_path):
    root, _, _ = demo_run
    copy = tmp_path / "runs"
    shutil.copytree(root, copy)
    newest, previous = sorted((copy / "demo-digits" / "checkpoints").glob("step-*.pt"), reverse=True)[:2]
    newest.write_bytes(newest.read_bytes()[:1000])
    again = train(f"data.path={digits_dir}", f"run.root={copy}", "data.num_workers=1", "optim.epochs=3", cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    warnings = [line for line in again.stderr.splitlines() if "not usable" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: checkpoint {newest} is not usable")
    assert f"resumed from {previous.name}:" in again.stdout and newest.name not in again.stdout


def test_a_run_directory_copied_under_a_new_name_is_a_fork_with_its_own_mlflow_run(demo_run, digits_dir, tmp_path):
    root, _, _ = demo_run
    copy = tmp_path / "runs"
    shutil.copytree(root, copy)
    shutil.copytree(copy / "demo-digits", copy / "fork")
    forked = train(f"data.path={digits_dir}", f"run.root={copy}", "data.num_workers=1", "optim.epochs=4",
                   "run.name=fork", cwd=REPO)
    assert forked.returncode == 0, forked.stderr[-3000:]
    assert "resumed from" in forked.stdout and "epoch 4/4" in forked.stdout and "epoch 3/4" not in forked.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{copy}/mlflow.db")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("demo").experiment_id])}
    assert set(runs) == {"demo-digits", "fork"}
    original, fork = runs["demo-digits"], runs["fork"]
    assert fork.data.tags["forked_from"] == original.info.run_id
    assert [m.step for m in client.get_metric_history(original.info.run_id, "val/top1")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(fork.info.run_id, "val/top1")] == [4]
