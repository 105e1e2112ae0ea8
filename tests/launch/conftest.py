"""Real Slurm clusters for the launch tests, started by slurm/local-cluster/start in a fresh
directory on free ports and stopped by slurm/local-cluster/stop: one node for the session, two
nodes (network namespaces) for the module that runs a 2-node job. Tests that need one skip, with
the reason, when Slurm is not installed, we are not root, or the cluster does not come up.

`make test` runs the suite on two pytest-xdist workers; every test that uses a cluster is sent to
one of them (`xdist_group`), so one session cluster serves them all and the two-node cluster's
network namespaces are never set up twice at once."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.launch.slurm_jobs import CLUSTER_SCRIPTS, free_port_pair
from tests.train.trainrun import run_module


@dataclass
class Cluster:
    dir: Path
    conf: Path


@contextlib.contextmanager
def local_cluster(nodes: int) -> Iterator[Cluster]:
    """A running cluster with SLURM_CONF pointing at it (sbatch/squeue/scontrol, submitit through
    subprocess, and the jobs all read it from the environment); the previous value comes back."""
    path = os.environ["PATH"] + ":/usr/sbin"
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(b, path=path)]
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster must be started as root")
    # Short path: munge and slurmd sockets live in it.
    cluster_dir = Path(tempfile.mkdtemp(prefix="ss-slurm-", dir="/tmp"))
    env = {**os.environ, "SPIKESCALE_SLURM_DIR": str(cluster_dir), "SPIKESCALE_SLURM_PORT": str(free_port_pair()),
           "SPIKESCALE_SLURM_NODES": str(nodes)}
    started = subprocess.run([CLUSTER_SCRIPTS / "start"], env=env, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        subprocess.run([CLUSTER_SCRIPTS / "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(cluster_dir, ignore_errors=True)
        pytest.skip(f"local {nodes}-node Slurm cluster did not start: "
                    f"{(started.stderr or started.stdout).strip()[-1500:]}")
    conf = cluster_dir / "etc" / "slurm.conf"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield Cluster(cluster_dir, conf)
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        subprocess.run([CLUSTER_SCRIPTS / "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(cluster_dir, ignore_errors=True)


CLUSTER_FIXTURES = {"slurm_cluster", "two_node_cluster"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    with local_cluster(nodes=1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[Cluster]:
    with local_cluster(nodes=2) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The embedded demo dataset as .beton files (built once per session)."""
    out = tmp_path_factory.mktemp("data") / "digits"
    built = run_module("data_pipelines.build", "digits", "--out", str(out), timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    return out
