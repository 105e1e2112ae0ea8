"""Submitting through `python -m launch.submit` and watching jobs on the local cluster.

No slurmdbd, so no sacct: job states come from `scontrol show job`, which keeps finished jobs
for MinJobAge (120 s on the local cluster) — long enough for these polls.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPTS = REPO / "slurm" / "local-cluster"
DEMO = str(REPO / "configs" / "demo_digits.yaml")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def submit(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs the launcher; returns its result and the job ids it printed (A_i for array elements)."""
    out = subprocess.run([sys.executable, "-m", "launch.submit", *args], cwd=cwd, capture_output=True,
                         text=True, timeout=300)
    return out, re.findall(r"^  job (\S+)", out.stdout, re.M)


def submit_demo(root: Path, digits: Path, *args: str) -> tuple[str, list[str]]:
    """The demo through the launcher on Slurm, small and on CPU; returns its output and job ids."""
    out, jobs = submit("--config", DEMO, "--cluster", "slurm", *args, f"data.path={digits}", f"run.root={root}",
                       "data.num_workers=1", cwd=REPO)
    assert out.returncode == 0 and jobs, out.stdout + out.stderr
    return out.stdout, jobs


def log_of(root: Path, run: str, job: str, task: int = 0) -> str:
    """stdout + stderr of one task of a single-run job (its submitit folder is <run dir>/submitit)."""
    folder = root / run / "submitit"
    return "".join(p.read_text() for p in (folder / f"{job}_{task}_log.out", folder / f"{job}_{task}_log.err")
                   if p.exists())


def job_records(job_id: str) -> dict[str, dict[str, str]]:
    """`scontrol show job` as {element id: fields}; element id is A_i for array elements."""
    base = job_id.split("_")[0]
    out = subprocess.run(["scontrol", "-o", "show", "job", base], capture_output=True, text=True, timeout=30)
    records = {}
    for line in out.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        task = fields.get("ArrayTaskId")
        key = f"{fields['ArrayJobId']}_{task}" if task and task != "N/A" else fields["JobId"]
        records[key] = fields
    return records


def wait_until_done(job_id: str, timeout_s: float, count: int = 1) -> dict[str, dict[str, str]]:
    """Polls until `count` elements of the job are in a final state; returns their records."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, dict[str, str]] = {}
    while time.monotonic() < deadline:
        for key, fields in job_records(job_id).items():
            if fields.get("JobState") in TERMINAL and re.fullmatch(r"\d+(_\d+)?", key):
                seen[key] = fields
        if len(seen) >= count:
            return seen
        time.sleep(1)
    raise AssertionError(f"job {job_id} not done after {timeout_s} s: {job_records(job_id)}")


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.3)


def scancel_usr2(job_id: str) -> None:
    """What Slurm sends before the time limit (and submitit's preemption test helper sends)."""
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)


def free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (slurmctld, slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")
