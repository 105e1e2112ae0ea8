"""slurm/train.sbatch on the local cluster, with the stand-in trainer (tests/launch/fake_trainer):
2 ranks under plain srun, and the template's own requeue on the trainer's exit code 3."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.slurm_jobs import scancel_usr2, wait_for, wait_until_done

pytestmark = pytest.mark.slow  # submits to a Slurm cluster

REPO = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).parent / "fake_trainer"


def sbatch(*args: str, out: Path, max_requeues: int = 3) -> str:
    env = {**os.environ, "PYTHON": sys.executable, "MAX_REQUEUES": str(max_requeues)}
    done = subprocess.run(["sbatch", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={out}",
                           str(REPO / "slurm" / "train.sbatch"), *args],
                          cwd=FAKE, env=env, capture_output=True, text=True, timeout=60, check=True)
    return re.search(r"Submitted batch job (\d+)", done.stdout).group(1)


def steps(run_dir: Path, rank: int) -> list[int]:
    log = run_dir / f"steps-{rank}.log"
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def test_template_requeues_on_exit_code_3_and_the_rerun_resumes(slurm_cluster, tmp_path):
    job = sbatch("fake.yaml", f"run.root={tmp_path}", "run.name=tpl", "steps=30", out=tmp_path / "job.out")
    run = tmp_path / "tpl"
    wait_for(lambda: min(len(steps(run, 0)), len(steps(run, 1))) >= 4, 90, "both ranks to train 4 steps")

    scancel_usr2(job)
    [record] = wait_until_done(job, 120).values()

    log = (tmp_path / "job.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", log
    assert "requeueing job" in log and "(requeue 1/3)" in log
    for rank in (0, 1):
        assert steps(run, rank) == list(range(1, 31)), f"rank {rank}"
