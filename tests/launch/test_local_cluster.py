"""slurm/local-cluster/{start,status,stop}: a second cluster beside the session's one, to show
that start is idempotent and stop ends exactly the daemons start recorded."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.launch.slurm_jobs import CLUSTER_SCRIPTS, free_port_pair

pytestmark = pytest.mark.slow  # starts Slurm clusters


def run(script: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([CLUSTER_SCRIPTS / script], env=env, capture_output=True, text=True, timeout=180)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is ended all the same.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_second_cluster_starts_once_reports_status_and_stops_only_its_daemons(slurm_cluster, tmp_path_factory):
    cluster_dir = Path(tmp_path_factory.mktemp("c2", numbered=True))
    env = {**os.environ, "SPIKESCALE_SLURM_DIR": str(cluster_dir), "SPIKESCALE_SLURM_PORT": str(free_port_pair())}
    env.pop("SLURM_CONF")
    session_pids = [int((slurm_cluster.dir / "pids" / f"{d}.pid").read_text()) for d in ("munged", "slurmctld", "slurmd")]
    started = run("start", env)
    try:
        assert started.returncode == 0, started.stderr
        pids = {d: int((cluster_dir / "pids" / f"{d}.pid").read_text()) for d in ("munged", "slurmctld", "slurmd")}
        assert f"SLURM_CONF={cluster_dir}/etc/slurm.conf" in (cluster_dir / "env.sh").read_text()

        again = run("start", env)
        assert again.returncode == 0 and "already running" in again.stdout
        assert {d: int((cluster_dir / "pids" / f"{d}.pid").read_text()) for d in pids} == pids

        status = run("status", env)
        assert status.returncode == 0, status.stdout
        assert "debug*" in status.stdout and "idle" in status.stdout
    finally:
        stopped = run("stop", env)
    assert stopped.returncode == 0
    assert not any(alive(p) for p in pids.values())
    assert all(alive(p) for p in session_pids)
    assert run("status", env).returncode == 1
