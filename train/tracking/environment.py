"""Where a run ran: git commit, package versions, devices, Slurm ids.

MLflow's run-context tags (user, entry point) are taken as they are; what MLflow does not
record, package versions and Slurm ids, is added here, because a run nobody can reproduce or
trace back to its job is noise.
"""
from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

_VERSIONED_PACKAGES = ("spikescale", "torch", "torchvision", "timm", "ffcv", "deepspeed", "mlflow",
                       "numpy", "submitit", "tonic")


def _git_commit() -> str:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def environment_params(world_size: int, device: str) -> dict[str, str]:
    """Params describing where a run ran: git commit, package versions, world size, device."""
    params = {"env.git_commit": _git_commit(), "env.world_size": str(world_size),
              "env.device": device, "env.python": sys.version.split()[0]}
    if device.startswith("cuda") and torch.cuda.is_available():
        params["env.gpu"] = torch.cuda.get_device_name(torch.device(device))
    for package in _VERSIONED_PACKAGES:
        try:
            params[f"env.version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    # the wheel's local tag (+cu130, +cpu) and CUDA runtime matter for reproducing speed
    params["env.version.torch"] = torch.__version__
    params["env.version.cuda"] = str(torch.version.cuda)
    return params


def environment_tags() -> dict[str, str]:
    """Tags every run gets: MLflow's run context (user, source), the git commit (shown by the UI)
    and Slurm job / array ids when present."""
    from mlflow.tracking.context.registry import resolve_tags
    # MLflow finds the commit from the entry script (pytest, `python -c`: none); this file is
    # always in the repository whose code runs.
    tags = {**resolve_tags(), "mlflow.source.git.commit": _git_commit()}
    for env, tag in (("SLURM_JOB_ID", "slurm.job_id"), ("SLURM_ARRAY_JOB_ID", "slurm.array_job_id"),
                     ("SLURM_ARRAY_TASK_ID", "slurm.array_task_id")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags
