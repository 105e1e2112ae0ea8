"""Run the real trainer for end-to-end tests: forked from a warm process, or under torchrun.

`python -m train` spends ~7 s importing torch, timm, FFCV and MLflow before its first step, and
the suite starts it about sixty times. Single-process runs are therefore forked from one
multiprocessing fork server that imported the trainer once (`train.engine`, `train.evaluate`);
each child is a fresh process that runs `train/__main__.py` exactly as `python -m train` does,
with its own argv, environment, working directory, stdout and stderr, and its own PID (so tests
signal and SIGKILL it as before). The fork server runs no torch op before forking, so no OpenMP
or loader threads are copied into the children. Ranked runs (nproc > 1) use torchrun as users do,
and a few tests still start `python -m train` itself (`train_command`) to keep that path tested.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs/demo_digits.yaml")
_PRELOAD = ["train.engine", "train.evaluate", "study.run", "data_pipelines.build", "tests.train.trainrun"]


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


def _run_python_m(module: str, argv: list[str], env: dict[str, str], out: str, err: str) -> None:
    """The child: become `python -m <module> <argv>` in `env`, output into the files `out`/`err`."""
    os.chdir(REPO)
    os.environ.clear()
    os.environ.update(env)
    for path, fd in ((out, 1), (err, 2)):
        with open(path, "a") as f:  # created empty by the parent, which may be reading it already
            os.dup2(f.fileno(), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    if "OMP_NUM_THREADS" in env:  # read by torch at import, i.e. in the fork server: apply it here
        import torch
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [f"python -m {module}", *argv]
    # The fork server imported `module` already (preload); `python -m` would not have, so runpy's
    # note that it runs a second copy as __main__ is ours to silence, not the user's to read.
    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package",
                            category=RuntimeWarning)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    import atexit
    atexit._run_exitfuncs()  # what interpreter exit would run: the tracker's close, logging
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Started:
    """A forked `python -m <module>`, with the part of `subprocess.Popen`'s interface tests use."""

    _context = None

    def __init__(self, module: str, argv: list[str], env: dict[str, str]):
        if Started._context is None:
            Started._context = multiprocessing.get_context("forkserver")
            Started._context.set_forkserver_preload(_PRELOAD)
        self._dir = tempfile.TemporaryDirectory(prefix="trainrun-")
        self._out, self._err = (os.path.join(self._dir.name, n) for n in ("stdout", "stderr"))
        for path in (self._out, self._err):
            open(path, "w").close()
        self.stdout_path = self._out  # for tests that read the output as it comes
        self._process = Started._context.Process(target=_run_python_m,
                                                 args=(module, argv, env, self._out, self._err))
        self._module = module
        self._process.start()
        self.pid = self._process.pid
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        # One thread at a time: multiprocessing reads the exit code from the fork server's pipe,
        # and a second thread reading it at once (a test's stdout reader polls while the test
        # waits) finds the pipe empty and records 255.
        with self._lock:
            if self.returncode is None and not self._process.is_alive():
                self._process.join()
                self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        multiprocessing.connection.wait([self._process.sentinel], timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(f"python -m {self._module}", timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        return self.output()

    def output(self) -> tuple[str, str]:
        """stdout and stderr so far (empty if the child died before opening them)."""
        return tuple(Path(p).read_text() if os.path.exists(p) else "" for p in (self._out, self._err))


def start(*overrides: str, env: dict[str, str] | None = None, config: str = DEMO) -> Started:
    """`python -m train --config <config> <overrides>` forked from the warm server, running."""
    return Started("train", ["--config", config, *overrides], {**train_env(), **(env or {})})


def run_module(module: str, *argv: str, env: dict[str, str] | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m <module> <argv>` forked from the warm server (train_env() + env), finished."""
    run = Started(module, list(argv), {**train_env(), **(env or {})})
    out, err = run.communicate(timeout)
    return subprocess.CompletedProcess(["python", "-m", module, *argv], run.returncode, out, err)


def train(*overrides: str, nproc: int = 1, timeout: int = 600, env: dict[str, str] | None = None,
          config: str = DEMO) -> subprocess.CompletedProcess:
    """`python -m train --config <config> <overrides>` (under torchrun for nproc > 1), finished."""
    if nproc > 1:
        return subprocess.run(train_command(*overrides, nproc=nproc, config=config), cwd=REPO,
                              env={**train_env(), **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
    return run_module("train", "--config", config, *overrides, env=env, timeout=timeout)


def metric_history(root: Path, key: str, experiment: str = "demo") -> list[tuple[int, float]]:
    """(step, value) of the only run of `experiment` in the run root's embedded store."""
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    return [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key)]
