"""Where this process sits in the job, the few collective helpers the engine needs, and the
watchdog that ends a job whose ranks stopped making progress.

Rank, world size and local rank come from torchrun's variables, or from Slurm's (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, first host of SLURM_JOB_NODELIST) when the trainer is started by
`srun`. `is_main()` is the one place that decides who logs and writes.
"""
from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

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


def setup(strategy: str, device: str, hang_timeout_s: float = 600.0) -> DistEnv:
    """Initialise the process group when there is more than one rank; pick the device.

    Collectives time out after 2 x `hang_timeout_s`, at least 5 min (the library's default is
    30 min): the `HangWatchdog` acts at `hang_timeout_s` once steps run; this bounds what it does
    not watch (start-up, where rank 0 opening the MLflow run keeps the others waiting in the first
    collective). Under NCCL a timed-out collective tears the communicator down and dumps its
    flight recorder."""
    rank, world, local = env_from_environment()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if use_cuda:  # set before the process group reads them; a user's own settings win
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
            os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
            os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=max(2 * hang_timeout_s, 300.0)))
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


_BACKSTOP_S = 10.0  # faulthandler ends a rank stuck holding the GIL this long after the timeout,
#                    once the others have had time to report it
_GRACE_S = 5.0      # how long a rank whose collective failed waits for its own watchdog to fire


class HangWatchdog:
    """Ends this rank when training stops making progress, naming the rank that stopped.

    The loop calls `beat` as each micro-batch enters its all-reduce and as each optimizer step
    ends (and after the epoch-end validation); each rank's last position goes to the process
    group's store, and a thread of each rank counts up a liveness counter there once a second.
    After `timeout_s` without a beat, the first rank to notice prints one line naming the rank
    that stopped (its counter stands still: SIGSTOPped, or stuck holding the GIL; else the ranks
    behind the others) and the last step every rank finished, and every rank that notices exits
    with `exit_code` (a requeue: the rerun resumes from the newest complete checkpoint). A rank
    stuck holding the GIL runs no Python thread: faulthandler's own thread, which needs no GIL,
    dumps its stacks and ends it 10 s after `timeout_s`. A SIGSTOPped rank runs nothing: its
    launcher ends it once the others have exited.
    """

    def __init__(self, env: DistEnv, timeout_s: float, exit_code: int):
        self.env, self.timeout, self.exit_code = env, float(timeout_s), exit_code
        self.store = dist.PrefixStore("spikescale-progress", dist.distributed_c10d._get_default_store()) \
            if dist.is_initialized() else None
        self.last: float | None = None  # monotonic time of the last beat; None: not armed yet
        self.position = (0, 0, 0)       # (epoch, micro-batch, optimizer steps finished)
        self._done, self._firing = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def beat(self, epoch: int, batch: int, step: int) -> None:
        """Progress: micro-batch `batch` of `epoch` reached, `step` optimizer steps finished."""
        self.position, self.last = (epoch, batch, step), time.monotonic()
        faulthandler.dump_traceback_later(self.timeout + _BACKSTOP_S, exit=True)
        if self.store is not None:
            self.store.set(f"at/{self.env.rank}", " ".join(map(str, self.position)))

    def stop(self) -> None:
        self._done.set()
        faulthandler.cancel_dump_traceback_later()

    def __enter__(self) -> "HangWatchdog":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """A collective that failed because another rank's watchdog ended the job (its exit
        closes the connections this rank waits on) is the hang's consequence: when this rank's
        watchdog fires too (they fire together, within `_GRACE_S`), its exit code stands, not
        the traceback."""
        if isinstance(error, RuntimeError) and self.store is not None and self._firing.wait(_GRACE_S):
            self._thread.join()  # it ends the process
        self.stop()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout / 4)):
            if self.store is not None:
                try:
                    self.store.add(f"alive/{self.env.rank}", 1)
                except RuntimeError:  # the store's host stopped: the timeout below still ends us
                    pass
            if self.last is not None and time.monotonic() - self.last > self.timeout:
                self._firing.set()
                first, line = self._report()
                if first:
                    print(line, file=sys.stderr, flush=True)
                os._exit(self.exit_code)  # the main thread is blocked: no cleanup can run there

    def _report(self) -> tuple[bool, str]:
        """(this rank is the first to report, the line naming who stopped)."""
        tail = f"no training step for {self.timeout:g} s (train.hang_timeout_s)"
        code = f"exiting with {self.exit_code} for requeue"
        if self.store is None:
            return True, f"error: {tail} at step {self.position[2]}; {code}"
        ranks = range(self.env.world_size)
        try:
            self.store.set_timeout(timedelta(seconds=5))
            before = [self.store.add(f"alive/{r}", 0) for r in ranks]
            for _ in range(4):  # 2 s: two of every live rank's ticks, this one's (and reporters') too
                self.store.add(f"alive/{self.env.rank}", 1)
                time.sleep(0.5)
            stopped = [r for r in ranks if self.store.add(f"alive/{r}", 0) == before[r]]
            at = {r: tuple(int(v) for v in self.store.get(f"at/{r}").decode().split())
                  for r in ranks if self.store.check([f"at/{r}"])}
            first = self.store.compare_set("reporter", "", str(self.env.rank)).decode() == str(self.env.rank)
        except RuntimeError:  # the store lives on rank 0 (or the launcher): it may be what stopped
            return True, (f"error: rank {self.env.rank}: {tail}, and the process group's store does not answer: "
                          f"rank 0 (or the launcher) stopped; this rank finished step {self.position[2]}; {code}")
        behind = stopped or [r for r in ranks if at.get(r, (-1, -1, -1)) < max(at.values())]
        who = f"rank {', '.join(map(str, behind))}" if behind else "every rank"
        finished = min(p[2] for p in at.values()) if len(at) == self.env.world_size else 0
        return first, (f"error: {who} stopped making progress: {tail}; the last step every rank finished is "
                       f"{finished}; {code}")
