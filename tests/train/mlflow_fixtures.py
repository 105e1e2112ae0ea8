"""A real `mlflow server` on a free loopback port, for tests that log over HTTP.

Use in a test module with `from tests.train.mlflow_fixtures import mlflow_server` (the fixture
yields the tracking URI, e.g. "http://127.0.0.1:41234", and lives for the module); tests that
stop and restart the server build an `MlflowServer` themselves.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

_MLFLOW = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` with a SQLite backend and proxied artifacts, both under `root`.

    The server runs in its own process group so that `stop` ends it and the workers it forks,
    and nothing else; `start` after `stop` serves the same store on the same port.
    """

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "server.log"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        # --app-name spikescale: MLflow's app as `make mlflow-ui` serves it (train/tracking/ui.py)
        cmd = [str(_MLFLOW), "server", "--app-name", "spikescale", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root.resolve()}/mlflow.db",
               "--artifacts-destination", str(self.root.resolve() / "mlartifacts")]
        log = open(self.log_path, "a")
        # MLFLOW_SERVER_ENABLE_JOB_EXECUTION: the GenAI job workers, a dozen idle processes
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}:\n"
                                   + self.log_path.read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} not healthy after {timeout}s:\n"
                           + self.log_path.read_text()[-3000:])

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)  # the group this object created, only
        self._proc.wait(timeout=30)
        self._proc = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """Tracking URI of a fresh `mlflow server` (SQLite + artifacts in a temporary directory)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    try:
        yield server.uri
    finally:
        server.stop()
