"""Requeue mechanics of launch/ on the real local Slurm cluster, with a stand-in trainer
(tests/launch/fake_trainer: same command line and signal contract as `python -m train`, no
torch), so a signal lands mid-training at a known point and each check takes seconds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch.slurm_jobs import scancel_usr2, submit, wait_for, wait_until_done

FAKE = Path(__file__).parent / "fake_trainer"


def steps(run_dir: Path, rank: int) -> list[int]:
    log = run_dir / f"steps-{rank}.log"
    return [int(x) for x in log.read_text().split()] if log.exists() else []


@pytest.mark.slow
def test_usr2_saves_requeues_and_every_rank_resumes_without_repeating_steps(slurm_cluster, tmp_path):
    out, [job] = submit("--config", "fake.yaml", "--cluster", "slurm", "--tasks-per-node", "2",
                        "--cpus-per-task", "1", f"run.root={tmp_path}", "run.name=two-ranks", "steps=40",
                        cwd=FAKE)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "two-ranks"
    wait_for(lambda: min(len(steps(run, 0)), len(steps(run, 1))) >= 5, 90, "both ranks to train 5 steps")

    scancel_usr2(job)
    [record] = wait_until_done(job, 120).values()

    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", record
    for rank in (0, 1):
        # Every step exactly once: the save finished before the requeue, the resume started after it.
        assert steps(run, rank) == list(range(1, 41)), f"rank {rank}"
    log = (run / "submitit" / f"{job}_0_log.out").read_text()
    assert "requeue 1/3" in log and "start at step 0" in log
    assert "saved at step" in log and "start at step 0" not in log.split("saved at step")[1]
    env = json.loads((run / "env-1.json").read_text())["dist"]
    assert env == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "localhost", "MASTER_PORT": str(20000 + int(job) % 20000)}


@pytest.mark.slow
def test_job_past_max_requeues_ends_with_its_checkpoint_kept(slurm_cluster, tmp_path):
    out, [job] = submit("--config", "fake.yaml", "--cluster", "slurm", "--max-requeues", "0",
                        f"run.root={tmp_path}", "run.name=no-requeue", "steps=200", cwd=FAKE)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "no-requeue"
    wait_for(lambda: len(steps(run, 0)) >= 3, 90, "3 training steps")

    scancel_usr2(job)
    [record] = wait_until_done(job, 60).values()

    assert record["Restarts"] == "0" and record["JobState"] != "COMPLETED", record
    assert "not requeued: all 0 requeues" in (run / "submitit" / f"{job}_0_log.out").read_text()
    saved = json.loads((run / "state-0.json").read_text())["step"]
    assert 3 <= saved < 200 and steps(run, 0)[-1] == saved  # resumable by resubmitting


@pytest.mark.slow
def test_sweep_is_one_job_array_with_a_run_per_grid_point_tagged_with_the_sweep_id(slurm_cluster, tmp_path):
    out, jobs = submit("--config", "fake.yaml", "--cluster", "slurm", "--sweep", "steps=3,4",
                       "--sweep", "step_s=0.1,0.2", "--array-parallelism", "2", f"run.root={tmp_path}",
                       cwd=FAKE)
    assert out.returncode == 0, out.stderr
    assert len(jobs) == 4 and len({j.split("_")[0] for j in jobs}) == 1, out.stdout  # one array
    records = wait_until_done(jobs[0], 120, count=4)
    assert {r["JobState"] for r in records.values()} == {"COMPLETED"}

    runs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("fake-*/env-0.json"))]
    assert len(runs) == 4
    sweep_ids = {r["tags"]["sweep_id"] for r in runs}
    assert len(sweep_ids) == 1 and sweep_ids.pop() in out.stdout
    grid = {tuple(a for a in r["argv"] if a.startswith(("steps=", "step_s="))) for r in runs}
    assert grid == {("steps=3", "step_s=0.1"), ("steps=3", "step_s=0.2"),
                    ("steps=4", "step_s=0.1"), ("steps=4", "step_s=0.2")}


@pytest.mark.slow
def test_local_cluster_runs_the_job_without_slurm(tmp_path):
    out, [job] = submit("--config", "fake.yaml", "--cluster", "local", "--tasks-per-node", "2",
                        f"run.root={tmp_path}", "run.name=local", "steps=3", cwd=FAKE)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "local"
    wait_for(lambda: all((run / f"state-{r}.json").exists() for r in (0, 1)), 60, "both local ranks to finish")
    assert steps(run, 0) == steps(run, 1) == [1, 2, 3]
    assert json.loads((run / "env-1.json").read_text())["dist"]["WORLD_SIZE"] == "2"


@pytest.mark.slow
def test_signal_after_the_last_step_completes_the_job_instead_of_requeueing_it(slurm_cluster, tmp_path):
    out, [job] = submit("--config", "fake.yaml", "--cluster", "slurm", f"run.root={tmp_path}", "run.name=late",
                        "steps=2", "finish_s=6", cwd=FAKE)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "late"
    log = run / "submitit" / f"{job}_0_log.out"
    wait_for(lambda: log.exists() and "last step done" in log.read_text(), 90, "the final phase")

    scancel_usr2(job)
    [record] = wait_until_done(job, 60).values()

    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "0", log.read_text()
    assert "nothing to requeue" in log.read_text() and steps(run, 0) == [1, 2]
