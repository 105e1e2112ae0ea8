"""Where this process sits in the job, and the few collective helpers the engine needs.

Rank, world size and local rank come from torchrun's variables, or from Slurm's (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, first host of SLURM_JOB_NODELIST) when the trainer is started by
`srun`. `is_main()` is the one place that decides who logs and writes.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # Plain lists ("a,b") and single hosts need no scontrol; ranges do.
        return nodelist.split(",")[0]


def env_from_environment() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, else Slurm, else a single process."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in e and int(e.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"])
        e.setdefault("MASTER_ADDR", _first_slurm_host())
        e.setdefault("MASTER_PORT", str(20000 + int(e.get("SLURM_JOB_ID", "0")) % 20000))
        return rank, world, int(e.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def setup(strategy: str, device: str) -> DistEnv:
    """Initialise the process group when there is more than one rank; pick the device."""
    rank, world, local = env_from_environment()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, local, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op for one process); returns `t`."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (e.g. the MLflow run id)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list for one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
