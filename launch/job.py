"""What runs inside a Slurm (or local) job: one `TrainJob` per task, each starting the trainer.

Every task runs `python -m train --config ... overrides` as a child process, with the
distributed environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) taken from submitit's
JobEnvironment. The trainer's checkpoints carry all state; this object only carries the command
and how many times the job was requeued.

Why a child process and not `train.main()` in this process: the trainer and submitit both want
SIGUSR2. submitit's handler (installed before `__call__` runs) calls `checkpoint()` and then
requeues the job at once; the trainer's handler only sets a flag and saves at the next step
boundary. In one process one of them would replace the other. With the trainer in a child,
each keeps its own handler: this process forwards USR2/TERM to the trainer (on every rank, so
all ranks stop at a checkpoint together even when only the task processes were signalled), and
on rank 0 `checkpoint()` waits for the trainer to exit after saving before submitit calls
`scontrol requeue`. It also keeps torch and the models out of the launcher's process.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import zlib
from typing import Any

import submitit

# train.REQUEUE_EXIT_CODE, repeated so this process never imports torch (train/__init__ does);
# tests/launch asserts the two agree.
REQUEUE_EXIT_CODE = 3


class JobSetupError(RuntimeError):
    """The job landed in an environment the trainer cannot use (message says what to change)."""


class TrainerStopped(RuntimeError):
    """The trainer saved a checkpoint and stopped on a signal; whoever sent it requeues the job."""


class TrainerFailed(RuntimeError):
    """The trainer exited with an error; its stderr is in this task's log."""


def master_port(job_id: str) -> int:
    """TCP port for the rendezvous, in [20000, 40000), derived from the job id so that jobs
    sharing a node (sweep elements) do not collide and every task computes the same one.
    Numeric Slurm ids map as in `train.distributed` (20000 + id % 20000)."""
    key = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return 20000 + key % 20000


def distributed_environment(job: Any, gpus_per_node: int, environ: dict[str, str]) -> dict[str, str]:
    """torchrun-style variables for one task of `job` (a submitit JobEnvironment).

    GPUs: Slurm gives every task of a `--gpus-per-node` job all of its node's GPUs in
    CUDA_VISIBLE_DEVICES and LOCAL_RANK picks one (what DeepSpeed and torch DDP expect). A
    cluster that binds one GPU per task breaks DeepSpeed's `set_device(LOCAL_RANK)`; that is
    reported instead of silently training on the wrong device.
    """
    tasks_per_node = job.num_tasks // max(job.num_nodes, 1)
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if gpus_per_node and 0 < len(visible) < tasks_per_node:
        raise JobSetupError(
            f"task {job.global_rank} sees CUDA_VISIBLE_DEVICES={','.join(visible)} but there are "
            f"{tasks_per_node} tasks per node: the cluster binds GPUs per task; DeepSpeed needs every "
            "task to see all of its node's GPUs (ask for --gpus-per-node without per-task GPU binding)")
    return {
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_RANK": str(job.local_rank),
        "LOCAL_WORLD_SIZE": str(tasks_per_node),
        "NODE_RANK": str(job.node),
        "MASTER_ADDR": job.hostnames[0],
        "MASTER_PORT": str(master_port(job.raw_job_id)),
    }


class TrainJob(submitit.helpers.Checkpointable):
    """`python -m train --config <config> <overrides>` as a requeueable submitit job.

    config: path of the YAML the job reads (the launcher's frozen copy).
    overrides: dotted `key=value` strings, `run.name=...` included so every requeue finds the
        same run directory and MLflow run.
    max_requeues: requeues allowed after signals (time limit, preemption); then the job ends
        and the run stays resumable by resubmitting the same command.
    gpus_per_node: 0 on CPU; used to check the GPU visibility the trainer needs.
    requeues: how many times this job has been requeued so far (carried in the resubmission).
    """

    def __init__(self, config: str, overrides: list[str], max_requeues: int, gpus_per_node: int = 0,
                 requeues: int = 0):
        self.config = config
        self.overrides = list(overrides)
        self.max_requeues = max_requeues
        self.gpus_per_node = gpus_per_node
        self.requeues = requeues
        self._child: subprocess.Popen | None = None
        self._returncode: int | None = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "train", "--config", self.config, *self.overrides]

    def __call__(self) -> str:
        """Runs the trainer for this task; returns the run name once training is done."""
        job = submitit.JobEnvironment()
        env = {**os.environ, **distributed_environment(job, self.gpus_per_node, os.environ),
               "PYTHONUNBUFFERED": "1"}
        print(f"launch: {job}, requeue {self.requeues}/{self.max_requeues}: {' '.join(self.command)}", flush=True)
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._forwarding(signal.getsignal(sig)))
        self._child = subprocess.Popen(self.command, env=env)
        rc = self._wait_trainer()
        if rc == 0:
            return self.run_name
        if rc == REQUEUE_EXIT_CODE:
            raise TrainerStopped(f"trainer (rank {job.global_rank}) saved a checkpoint and stopped on a signal; "
                                 "the job is requeued by rank 0 or by Slurm")
        raise TrainerFailed(f"trainer (rank {job.global_rank}) exited with {rc}: see this task's log")

    @property
    def run_name(self) -> str:
        return next(o.partition("=")[2] for o in reversed(self.overrides) if o.startswith("run.name="))

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit's USR2 handler on rank 0 only, right before it requeues the job.

        Blocks until the trainer has saved its checkpoint and exited, so the requeue never cuts
        a save short. Returns the resubmission (this job, one more requeue counted), or None to
        end the job instead when --max-requeues is used up. If training finished meanwhile, the
        job ends as completed.
        """
        rc = self._wait_trainer() if self._child is not None else None
        if rc == 0:
            self._finish_as_done()
        if self.requeues >= self.max_requeues:
            print(f"launch: not requeued: all {self.max_requeues} requeues (--max-requeues) are used; submit the "
                  "same command again to continue from the last checkpoint", flush=True)
            return None
        print(f"launch: trainer exited with {rc} after the signal; requeue {self.requeues + 1}/{self.max_requeues}",
              flush=True)
        again = TrainJob(self.config, self.overrides, self.max_requeues, self.gpus_per_node, self.requeues + 1)
        return submitit.helpers.DelayedSubmission(again)

    def _finish_as_done(self) -> None:
        """Training ended (exit 0) while the signal was on its way: the job is done, not to be
        requeued. submitit's handler can only requeue or fail the job, so end it here the way
        submitit ends a successful one: result file, exit 0."""
        print("launch: the trainer finished before the signal arrived; nothing to requeue", flush=True)
        result = submitit.JobEnvironment().paths.result_pickle
        with submitit.core.utils.temporary_save_path(result) as tmp:
            submitit.core.utils.cloudpickle_dump(("success", self.run_name), tmp)
        sys.exit(0)

    def _forwarding(self, previous: Any):
        """A handler that passes the signal to the trainer, then runs `previous` (submitit's)."""
        def handler(signum: int, frame: Any) -> None:
            if self._child is not None and self._returncode is None:  # not reaped: still our child
                os.kill(self._child.pid, signum)
            if callable(previous):
                previous(signum, frame)
        return handler

    def _wait_trainer(self) -> int:
        """The trainer's exit code (negative: killed by that signal).

        os.waitpid rather than Popen.wait: this is also called from a signal handler that
        interrupts a pending call of itself, and Popen.wait holds a non-reentrant lock there.
        Whichever call reaps the child records the code; the other then finds it.
        """
        while self._returncode is None:
            try:
                _, status = os.waitpid(self._child.pid, 0)
            except ChildProcessError:
                if self._returncode is None:
                    raise
                break
            self._returncode = os.waitstatus_to_exitcode(status)
            self._child.returncode = self._returncode
        return self._returncode

    def __getstate__(self) -> dict[str, Any]:
        # The child process belongs to this run of the job, not to the pickle of the next one.
        return {**self.__dict__, "_child": None, "_returncode": None}
