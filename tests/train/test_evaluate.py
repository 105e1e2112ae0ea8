"""`python -m train.evaluate RUN_DIR` on a finished demo run: every measurement of the study in
eval.json and in the run's own MLflow run, the same numbers twice, bad input in one line."""
import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.train.trainrun import REPO, free_port, run_module, train, train_env

pytestmark = pytest.mark.slow  # runs the trainer and the evaluation

SMALL_GRID = ["eval.noise_sigmas=[0,0.2]", "eval.epsilons=[0,0.1]", "eval.pgd_steps=3"]


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return run_module("train.evaluate", *args)


@pytest.fixture(scope="module")
def demo_run(digits_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    done = train(f"run.root={root}", f"data.path={digits_dir}", "optim.epochs=2", "data.num_workers=1")
    assert done.returncode == 0, done.stderr[-3000:]
    return root, root / "demo-digits"


def test_evaluation_writes_every_measurement_into_eval_json_and_the_runs_mlflow_run(demo_run):
    root, run_dir = demo_run
    done = evaluate(str(run_dir), *SMALL_GRID)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run_dir / "eval.json").read_text())
    m = record["metrics"]
    for key in ("eval/val_top1", "eval/val_top5", "eval/val_loss", "eval/train_top1", "eval/generalization_gap",
                "eval/firing_rate_mean", "eval/sparsity_mean", "eval/sops_per_image", "eval/energy_uj_per_image",
                "eval/noise_top1_0", "eval/noise_top1_0.2", "eval/fgsm_top1_0", "eval/fgsm_top1_0.1",
                "eval/pgd_top1_0", "eval/pgd_top1_0.1"):
        assert key in m, key
    assert any(k.startswith("eval/firing_rate/") for k in m)
    assert "eval/stream_top1" not in m  # the digits are static
    assert m["eval/val_top1"] == m["eval/noise_top1_0"] == m["eval/fgsm_top1_0"] == m["eval/pgd_top1_0"] > 0.3
    assert m["eval/pgd_top1_0.1"] <= m["eval/fgsm_top1_0.1"] <= m["eval/val_top1"]
    assert m["eval/generalization_gap"] == pytest.approx(m["eval/train_top1"] - m["eval/val_top1"])
    assert record["weights"] == "best_model.pt" and record["eval"]["epsilons"] == [0.0, 0.1]
    # The trainer's own final validation top-1 of the best (= last) epoch is the clean top-1.
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert m["eval/val_top1"] == pytest.approx(final["val/top1"])

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert run.data.metrics["eval/pgd_top1_0.1"] == pytest.approx(m["eval/pgd_top1_0.1"])
    assert "eval.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert run.info.status == "FINISHED"

    # The same checkpoint gives identical numbers again (noise and PGD starts are seeded), also
    # read from the newest step checkpoint instead of best_model.pt (the same weights here).
    again = evaluate(str(run_dir), *SMALL_GRID, "eval.checkpoint=last")
    assert again.returncode == 0, again.stderr[-3000:]
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["weights"].startswith("step-") and record["metrics"] == m


@pytest.mark.parametrize("args, words", [
    (["{missing}"], ["is not a run directory"]),
    (["{run}", "eval.epsilons=[0,-0.1]"], ["eval.epsilons", ">= 0"]),
    (["{run}", "eval.checkpoint=newest"], ["eval.checkpoint", "best, last"]),
])
def test_bad_input_is_one_line_and_exit_code_2(demo_run, tmp_path, args, words):
    _, run_dir = demo_run
    args = [a.format(missing=tmp_path / "nope", run=run_dir) for a in args]
    done = evaluate(*args)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and all(w in lines[0] for w in words), lines


def test_two_ranks_measure_the_same_clean_generalisation_and_fgsm_numbers_as_one(demo_run):
    _, run_dir = demo_run
    grid = ["eval.noise_sigmas=[0]", "eval.epsilons=[0.1]", "eval.pgd_steps=1", "eval.pgd_random_start=false"]
    one = evaluate(str(run_dir), *grid)
    assert one.returncode == 0, one.stderr[-3000:]
    single = json.loads((run_dir / "eval.json").read_text())["metrics"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "train.evaluate", str(run_dir), *grid],
                         cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    ranked = json.loads((run_dir / "eval.json").read_text())["metrics"]
    for key in ("eval/val_top1", "eval/val_top5", "eval/train_top1", "eval/fgsm_top1_0.1", "eval/pgd_top1_0.1",
                "eval/firing_rate_mean"):
        assert ranked[key] == pytest.approx(single[key], abs=1e-9), key
    assert ranked["eval/val_loss"] == pytest.approx(single["eval/val_loss"], rel=1e-6)
