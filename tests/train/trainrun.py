"""Run the real trainer in subprocesses (one process, or torchrun ranks) for end-to-end tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs/demo_digits.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(*overrides: str, nproc: int = 1, config: str = DEMO) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                     "--master_port", str(free_port())]
    return [*launcher, "-m", "train", "--config", config, *overrides]


def train_env() -> dict[str, str]:
    # DeepSpeed picks its CPU accelerator only when told; OMP threads: 1 per rank on 2 cores.
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train(*overrides: str, nproc: int = 1, timeout: int = 600, env: dict[str, str] | None = None,
          config: str = DEMO) -> subprocess.CompletedProcess:
    """``python -m train --config <config> <overrides>`` (under torchrun for nproc > 1), finished."""
    return subprocess.run(train_command(*overrides, nproc=nproc, config=config), cwd=REPO,
                          env={**train_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)


def metric_history(root: Path, key: str, experiment: str = "demo") -> list[tuple[int, float]]:
    """(step, value) of the only run of `experiment` in the run root's embedded store."""
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    return [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key)]
