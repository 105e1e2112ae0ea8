"""The real trainer through `python -m launch.submit` on the local Slurm cluster: the demo as a
2-rank gloo DDP job logging to MLflow; SIGUSR2 mid-training -> checkpoint, requeue, resume in
the same MLflow run without repeating a step; a 2 x 2 sweep -> 4 runs in one experiment."""
from __future__ import annotations

import re
from pathlib import Path

from mlflow.tracking import MlflowClient
import pytest

from tests.launch.slurm_jobs import log_of, scancel_usr2, submit_demo, wait_for, wait_until_done

pytestmark = pytest.mark.slow  # submits to a Slurm cluster


def only_run(root: Path, experiment: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def test_demo_as_two_rank_ddp_job_finishes_and_logs_to_mlflow(slurm_cluster, digits, tmp_path):
    _, [job] = submit_demo(tmp_path, digits, "--tasks-per-node", "2", "--cpus-per-task", "1",
                           "train.strategy=ddp", "optim.epochs=2", "run.name=ddp")
    [record] = wait_until_done(job, 240).values()
    assert record["JobState"] == "COMPLETED", log_of(tmp_path, "ddp", job)[-3000:]

    client, run = only_run(tmp_path, "demo")
    assert run.info.status == "FINISHED" and run.info.run_name == "ddp"
    assert run.data.params["env.world_size"] == "2" and run.data.params["train.strategy"] == "ddp"
    assert run.data.tags["slurm.job_id"] == job
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == [1, 2]
    assert run.data.metrics["val/top1"] > 0.2  # chance is 0.1
    assert (tmp_path / "ddp" / "final_metrics.json").exists()


def test_usr2_checkpoints_requeues_and_resumes_in_the_same_mlflow_run_without_repeating_steps(
        slurm_cluster, digits, tmp_path):
    _, [job] = submit_demo(tmp_path, digits, "optim.epochs=2", "tracking.log_every_steps=1",
                           "train.checkpoint_every_steps=11", "run.name=requeue")
    checkpoints = tmp_path / "requeue" / "checkpoints"

    def newest_step() -> int:
        return max((int(p.stem.split("-")[1]) for p in checkpoints.glob("step-*.pt")), default=0)

    # Signal well inside the second epoch, so the resume starts mid-epoch: the periodic
    # checkpoints show where training is (MLflow's asynchronous metrics lag behind).
    wait_for(lambda: "epoch 1/2  train loss" in log_of(tmp_path, "requeue", job), 180, "the first epoch")
    first_epoch = newest_step()
    wait_for(lambda: newest_step() >= first_epoch + 11, 60, "11 steps into the second epoch")

    scancel_usr2(job)
    [record] = wait_until_done(job, 240).values()

    log = log_of(tmp_path, "requeue", job)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", log[-3000:]
    saved = re.search(r"SIGUSR2: checkpoint saved at step (\d+)", log)
    resumed = re.search(r"resumed from step-\d+\.pt: epoch 1, batch (\d+), step (\d+)", log)
    assert saved and resumed and "requeue 1/3" in log, log[-3000:]
    assert resumed.group(2) == saved.group(1) and int(resumed.group(1)) > 11
    client, run = only_run(tmp_path, "demo")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/step_loss")]
    # Each optimizer step logged exactly once, across both runs of the job, and both epochs done.
    assert sorted(steps) == list(range(1, len(steps) + 1)) and len(steps) % 2 == 0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == [1, 2]


def test_sweep_is_a_job_array_of_runs_in_one_experiment_tagged_with_the_sweep_id(slurm_cluster, digits, tmp_path):
    # Two points keep it short; the cartesian product of several --sweep keys is tested in
    # tests/launch/test_submit.py.
    stdout, jobs = submit_demo(tmp_path, digits, "--sweep", "optim.lr=0.05,0.1", "optim.epochs=1",
                               "tracking.experiment=sweep")
    assert len(jobs) == 2 and len({j.split("_")[0] for j in jobs}) == 1, stdout  # one job array
    records = wait_until_done(jobs[0], 300, count=2)
    assert {r["JobState"] for r in records.values()} == {"COMPLETED"}, records

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.info.run_name for r in runs}) == 2
    [sweep_id] = {r.data.tags["sweep_id"] for r in runs}
    assert f"sweep {sweep_id}" in stdout
    assert {r.data.params["optim.lr"] for r in runs} == {"0.05", "0.1"}
