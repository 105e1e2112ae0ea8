"""MLflow experiment tracking on rank 0: batched, asynchronous, resumable, and never fatal.

Every logging call on the training thread only appends a record (a small JSON-able dict) to an
in-memory journal; one background thread sends the journal to MLflow in order, merging metric
records into `log_batch` calls. When the store is unreachable or slow, records stay queued and
the thread retries with exponential backoff; training neither blocks nor crashes. At `close`,
whatever is still unsent is written to `<run_dir>/mlflow-fallback.jsonl` with a warning; the
next `Tracker.start` in that run directory sends it first, or `python -m train.tracking replay
<run_dir>` sends it by hand. Sending is idempotent: metrics keep their original timestamps (the
SQL store drops exact duplicates) and a metric whose step is not above the last step stored for
its key is skipped, so a resumed run continues its curves without duplicates or regressions.

The MLflow calls go through `MlflowClient` (never the fluent, process-global API) so that
several trackers can live in one process, e.g. in tests.
"""
from __future__ import annotations

import argparse
import atexit
import copy
import fcntl
import itertools
import json
import logging
import os
import posixpath
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

log = logging.getLogger(__name__)

FALLBACK_NAME = "mlflow-fallback.jsonl"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's log_batch limits per request.
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_VALUE_LENGTH = 6000
_MAX_KEY_LENGTH = 250
_VALID_KEY = re.compile(r"^[/\w.\- :]+$")  # what MLflow accepts for metric and param names

# Error codes that mean "this record will never be accepted": retrying cannot help, so the
# record is dropped with a warning instead of blocking everything queued behind it.
_REJECTED_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS",
                   "INVALID_STATE"}


@dataclass
class TrackingConfig:
    """Where and how rank 0 logs to MLflow.

    uri: tracking URI; None means $MLFLOW_TRACKING_URI if set, else the embedded SQLite store
        `sqlite:///<run.root>/mlflow.db` with artifacts in `<run.root>/mlartifacts`.
    experiment: MLflow experiment name (created on first use).
    log_every_steps: the trainer logs step metrics (loss, lr, images/s, ...) every this many steps.
    system_metrics: also log CPU/GPU memory and utilisation as `system/*` metrics.
    system_metrics_interval_s: seconds between system-metric samples.
    flush_interval_s: the background sender wakes at least this often (seconds) to send a batch.
    request_timeout_s: HTTP timeout of one MLflow request (seconds); a slow server costs the
        background thread at most this per attempt, never the training loop.
    retry_max_backoff_s: ceiling of the exponential backoff between retries while unreachable.
    start_timeout_s: how long `Tracker.start` waits for the run to be created (seconds); when it
        is not, the run is created in the background as soon as the store answers.
    close_timeout_s: how long `close` waits for the queue to drain before writing the fallback.
    tags: extra run tags, e.g. `tracking.tags.sweep_id=...` set by the Slurm launcher.
    """
    uri: Optional[str] = None
    experiment: str = "spikescale"
    log_every_steps: int = 50
    system_metrics: bool = False
    system_metrics_interval_s: float = 10.0
    flush_interval_s: float = 2.0
    request_timeout_s: int = 5
    retry_max_backoff_s: float = 30.0
    start_timeout_s: float = 30.0
    close_timeout_s: float = 15.0
    tags: Dict[str, str] = field(default_factory=dict)


#: The experiment tag MLflow 3's UI reads to open runs in its model-training view, not the GenAI one.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


class TrackingError(Exception):
    """A tracking problem the user fixes (deleted experiment, replay against a dead server)."""


# --------------------------------------------------------------------------------------------
# Configuration and environment helpers


def resolve_uri(cfg: TrackingConfig, runs_root: Path) -> str:
    """The tracking URI: config, then $MLFLOW_TRACKING_URI, then the embedded SQLite store."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(runs_root).resolve()}/mlflow.db"


def _artifact_location(uri: str) -> str | None:
    """Artifact root for experiments this tracker creates in a local SQLite store.

    `mlartifacts/` next to the database, the layout `make mlflow-ui` serves; None for servers,
    which choose (and proxy) their own artifact store.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):]).resolve()
    return (db.parent / "mlartifacts").as_uri()


def _create_sqlite_store(client, db: Path) -> None:
    """Touch the store under a file lock: processes that open a new SQLite store at once (the
    elements of a sweep) otherwise race on creating its tables and can leave it unusable."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client.search_experiments(max_results=1)
        except Exception as e:  # the sender's own retries deal with a store that stays broken
            log.warning("could not open the MLflow store %s: %s", db, e)


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {dotted key: string value}, e.g. {"model": {"T": 4}} -> {"model.T": "4"}.

    Accepts plain dicts and OmegaConf DictConfigs (resolved first). Lists and tuples stay one
    value (their JSON text), enums log their value, None logs as "None".
    """
    if not isinstance(d, Mapping):
        from omegaconf import DictConfig, OmegaConf  # only when handed a DictConfig
        if isinstance(d, DictConfig):
            d = OmegaConf.to_container(d, resolve=True)
        else:
            raise TypeError(f"flatten_config needs a mapping, got {type(d).__name__}")
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.update(flatten_config(value, prefix=f"{name}."))
        else:
            out[name] = _param_text(value)
    return out


def _param_text(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return json.dumps([v.value if isinstance(v, Enum) else v for v in value], default=str)
    return str(value)


def _git_commit() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


_VERSIONED_PACKAGES = ("spikescale", "torch", "torchvision", "timm", "ffcv", "deepspeed", "mlflow",
                       "numpy", "submitit", "tonic")


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
    """Tags every run gets: git commit (shown by the UI) and Slurm job / array ids when present."""
    tags = {"mlflow.source.git.commit": _git_commit()}
    for env, tag in (("SLURM_JOB_ID", "slurm.job_id"), ("SLURM_ARRAY_JOB_ID", "slurm.array_job_id"),
                     ("SLURM_ARRAY_TASK_ID", "slurm.array_task_id")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def _check_key(key: str, kind: str) -> str:
    if (not isinstance(key, str) or not key or len(key) > _MAX_KEY_LENGTH
            or not _VALID_KEY.match(key) or posixpath.normpath(key) != key
            or key.startswith(("/", "..")) or key == "."):
        raise ValueError(f"{kind} name {key!r} is not a valid MLflow key: use at most "
                         f"{_MAX_KEY_LENGTH} letters, digits, '_', '-', '.', ' ', ':' and single "
                         "'/' separators, e.g. 'firing_rate/layer3.1.lif2'")
    return key


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------------
# The sender: the only code that talks to MLflow


@dataclass
class _RunState:
    run_id: str
    floors: dict[str, int]  # metric key -> highest step already stored
    params: dict[str, str]  # params already stored (MLflow forbids changing one)


class _Sender:
    """Applies journal records to one tracking store, strictly in order.

    Record kinds (all carry `handle`, the id of the Tracker session that wrote them):
      start    {experiment, artifact_location, run_name, run_id | None, tags}: attach the handle
               to run `run_id` (resume) or to a new run
      tags     {tags}
      params   {params}
      metrics  {step, ts (ms), metrics}
      artifact {path, artifact_path, cleanup | None}: upload a file or a directory's contents;
               `cleanup` is a staging directory removed once uploaded
      end      {status}
    """

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        if uri.startswith("sqlite:///"):
            _create_sqlite_store(self.client, Path(uri[len("sqlite:///"):]))
        self.starts: dict[str, dict] = {}  # handle -> its start record, run_id filled in
        self.runs: dict[str, _RunState] = {}  # run id -> state

    def run_id(self, handle: str) -> str | None:
        start = self.starts.get(handle)
        return start["run_id"] if start else None

    def send_next(self, records: list[dict]) -> int:
        """Send the first record, merged with the metric records right behind it.

        Returns how many records were consumed (sent, or dropped because MLflow rejects them).
        Raises when the store is unreachable or fails; then nothing was consumed.
        """
        head = records[0]
        if head["op"] == "metrics":
            n = 1
            while (n < len(records) and records[n]["op"] == "metrics"
                   and records[n]["handle"] == head["handle"]):
                n += 1
            group = records[:n]
        else:
            group = [head]
        try:
            getattr(self, f"_{head['op']}")(group)
        except Exception as e:
            if getattr(e, "error_code", None) in _REJECTED_CODES and head["op"] != "start":
                log.warning("MLflow rejected %d %s record(s), dropped: %s", len(group), head["op"], e)
            else:
                raise
        return len(group)

    def unsent(self, records: list[dict]) -> list[dict]:
        """`records` preceded by start records for the handles they need that already attached,
        so that a replay reattaches to the same runs instead of creating new ones."""
        pending_starts = {r["handle"] for r in records if r["op"] == "start"}
        needed = dict.fromkeys(r["handle"] for r in records if r["handle"] not in pending_starts)
        return [self.starts[h] for h in needed if h in self.starts] + list(records)

    def _state(self, handle: str) -> _RunState:
        return self.runs[self.starts[handle]["run_id"]]

    def _start(self, group: list[dict]) -> None:
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException
        rec = group[0]
        state = self.runs.get(rec.get("run_id") or "")
        if state is None and rec.get("run_id"):
            try:
                run = self.client.get_run(rec["run_id"])
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                run = None
            if run is None or run.info.lifecycle_stage == "deleted":
                log.warning("MLflow run %s is missing or deleted in %s; logging to a new run",
                            rec["run_id"], self.uri)
            else:
                # The latest metric per key carries the highest step stored: the floor below
                # which a resumed trainer's re-logged steps are duplicates.
                floors = {m.key: m.step for m in run.data._metric_objs}
                state = _RunState(run.info.run_id, floors, dict(run.data.params))
        if state is None:
            experiment_id = self._experiment(rec["experiment"], rec.get("artifact_location"))
            run = self.client.create_run(experiment_id, run_name=rec["run_name"], tags=rec["tags"])
            state = _RunState(run.info.run_id, {}, {})
        else:
            tags = [RunTag(k, str(v)) for k, v in rec["tags"].items()]
            for chunk in _chunks(tags, _MAX_PARAMS_PER_BATCH):
                self.client.log_batch(state.run_id, tags=chunk)
            self.client.update_run(state.run_id, status="RUNNING")
        self.runs[state.run_id] = state
        self.starts[rec["handle"]] = dict(rec, run_id=state.run_id)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location,
                                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException as e:  # another job created it between our two calls
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment '{name}' is deleted in {self.uri}: restore it "
                                f"(`mlflow experiments restore`) or set tracking.experiment")
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            # Without it MLflow 3's UI guesses, and shows a run's page in its GenAI view.
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id

    def _dataset(self, group: list[dict]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag
        rec = group[0]
        dataset = Dataset(name=rec["name"], digest=rec["digest"], source_type="local",
                          source=json.dumps({"uri": rec["source"]}))
        self.client.log_inputs(self._state(rec["handle"]).run_id,
                               datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", rec["context"])])])

    def _tags(self, group: list[dict]) -> None:
        from mlflow.entities import RunTag
        state = self._state(group[0]["handle"])
        tags = [RunTag(k, str(v)) for k, v in group[0]["tags"].items()]
        for chunk in _chunks(tags, _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(state.run_id, tags=chunk)

    def _params(self, group: list[dict]) -> None:
        from mlflow.entities import Param
        state = self._state(group[0]["handle"])
        new, changed = {}, []
        for key, value in group[0]["params"].items():
            if key not in state.params:
                new[key] = value
            elif state.params[key] != value:
                changed.append(key)
        if changed:  # MLflow params are write-once; a resumed run keeps the first values
            log.warning("run %s already has different values for params %s; keeping the "
                        "stored ones", state.run_id, ", ".join(sorted(changed)))
        items = [Param(k, v) for k, v in new.items()]
        for chunk in _chunks(items, _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(state.run_id, params=chunk)
        state.params.update(new)

    def _metrics(self, group: list[dict]) -> None:
        from mlflow.entities import Metric
        state = self._state(group[0]["handle"])
        floors = dict(state.floors)
        batch = []
        for rec in group:
            for key, value in rec["metrics"].items():
                if rec["step"] <= floors.get(key, -1):
                    continue  # already stored: a resumed trainer re-logging steps
                floors[key] = rec["step"]
                batch.append(Metric(key, value, rec["ts"], rec["step"]))
        for chunk in _chunks(batch, _MAX_METRICS_PER_BATCH):
            self.client.log_batch(state.run_id, metrics=chunk)
        state.floors = floors

    def _artifact(self, group: list[dict]) -> None:
        rec = group[0]
        state = self._state(rec["handle"])
        path = Path(rec["path"])
        if not path.exists():
            log.warning("artifact %s is gone; not uploaded", path)
        elif path.is_dir():
            self.client.log_artifacts(state.run_id, str(path), rec["artifact_path"])
        else:
            self.client.log_artifact(state.run_id, str(path), rec["artifact_path"])
        if rec.get("cleanup"):
            shutil.rmtree(rec["cleanup"], ignore_errors=True)

    def _end(self, group: list[dict]) -> None:
        self.client.set_terminated(self._state(group[0]["handle"]).run_id, group[0]["status"])


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


# --------------------------------------------------------------------------------------------
# Fallback file


def _read_fallback(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a crash mid-write
                log.warning("%s:%d is not a JSON record; skipped", path, line_no)
    return records


def _write_fallback(path: Path, records: list[dict]) -> None:
    """Atomically replace `path` with `records`, one JSON object a line."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replay(run_dir: Path, uri: str | None = None) -> int:
    """Send `<run_dir>/mlflow-fallback.jsonl` to MLflow and delete it; returns records sent.

    uri: where to send; default the URI the records were meant for. Raises TrackingError when
    the store fails midway; the file then holds exactly what is still unsent.
    """
    path = Path(run_dir) / FALLBACK_NAME
    records = _read_fallback(path)
    if not records:
        return 0
    if uri and uri != records[0]["uri"]:  # sent elsewhere: artifacts follow that store's layout
        for rec in records:
            if rec["op"] == "start":
                rec["artifact_location"] = _artifact_location(uri)
    uri = uri or records[0]["uri"]
    sent = 0
    sender = None
    try:
        sender = _Sender(uri)
        while records:
            n = sender.send_next(records)
            del records[:n]
            sent += n
    except Exception as e:
        _write_fallback(path, sender.unsent(records) if sender else records)
        raise TrackingError(f"replay of {path} to {uri} stopped after {sent} records "
                            f"({type(e).__name__}: {e}); run it again when the store answers") from e
    path.unlink()
    return sent


# --------------------------------------------------------------------------------------------
# The background worker


class _Worker:
    """Owns the journal and the thread that drains it through a `_Sender`."""

    def __init__(self, cfg: TrackingConfig, uri: str, handle: str, records: list[dict],
                 carried: int, fallback: Path):
        self.cfg = cfg
        self.handle = handle  # the live session's handle; system metrics go to its run
        self.uri = uri
        self.fallback = fallback
        self._cond = threading.Condition()
        self._pending = records
        self._carried = carried  # leading records that came from the fallback file
        self._sender: _Sender | None = None
        self._stop = False
        self._abandoned = False
        self._busy = False
        self._wake = False
        self._failing: str | None = None  # why the last attempt failed; None while healthy
        self.latest_step: int | None = None
        # CUDA's current device is per thread: take the trainer's, here on its thread
        self._cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        if cfg.system_metrics:
            import psutil
            psutil.cpu_percent()  # the first reading only sets the baseline for the next
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
        self._thread.start()

    def submit(self, rec: dict) -> None:
        with self._cond:
            self._pending.append(rec)
            # a full batch goes out before the flush interval, unless the store is failing
            if len(self._pending) >= _MAX_METRICS_PER_BATCH and self._failing is None:
                self._cond.notify()

    def run_id(self, handle: str) -> str | None:
        return self._sender.run_id(handle) if self._sender else None

    def wait_started(self, handle: str, timeout: float) -> None:
        """Wait until `handle` is attached to a run or an attempt to reach the store failed."""
        deadline = time.monotonic() + timeout
        while self.run_id(handle) is None and self._failing is None and time.monotonic() < deadline:
            time.sleep(0.02)

    def flush(self, timeout: float) -> None:
        """Wait until everything queued is sent, unless the store is failing (then return)."""
        with self._cond:
            self._wake = True
            self._cond.notify()
            self._cond.wait_for(lambda: (not self._pending and not self._busy and not self._wake)
                                or self._failing is not None, timeout=timeout)

    def close(self, timeout: float) -> list[dict]:
        """Stop the thread after a last attempt; return what is still unsent."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)
        with self._cond:
            self._abandoned = True  # a thread stuck in a request must not send any more
            remaining = list(self._pending)
            self._pending.clear()
        if not remaining:
            return []
        return self._sender.unsent(remaining) if self._sender else remaining

    def _loop(self) -> None:
        backoff = 1.0
        sampling = self.cfg.system_metrics
        next_sample = time.monotonic()
        while True:
            with self._cond:
                if self._failing:  # back off; only close or flush cut the wait short
                    self._cond.wait_for(lambda: self._stop or self._wake, timeout=backoff)
                elif not (self._stop or self._wake or len(self._pending) >= _MAX_METRICS_PER_BATCH):
                    self._cond.wait(self.cfg.flush_interval_s)
                stopping = self._stop
                self._wake = False
                self._busy = True
            if sampling and time.monotonic() >= next_sample:
                next_sample = time.monotonic() + self.cfg.system_metrics_interval_s
                try:
                    self._sample_system()
                except Exception as e:  # a sensor failing must not take the logging down
                    log.warning("system metrics disabled: %s: %s", type(e).__name__, e)
                    sampling = False
            ok = self._drain()
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            backoff = 1.0 if ok else min(2 * backoff, self.cfg.retry_max_backoff_s)
            if stopping or self._abandoned:
                return

    def _drain(self) -> bool:
        """Send until the journal is empty (True) or the store fails (False)."""
        try:
            if self._sender is None:
                self._sender = _Sender(self.uri)
            while True:
                with self._cond:
                    if self._abandoned or not self._pending:
                        break
                    batch = self._pending[:4 * _MAX_METRICS_PER_BATCH]
                n = self._sender.send_next(batch)
                with self._cond:
                    del self._pending[:n]
                if self._carried:
                    self._carried = max(0, self._carried - n)
                    if self._carried == 0:  # the previous session's leftovers are all in
                        self.fallback.unlink(missing_ok=True)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            if self._failing is None:
                log.warning("MLflow at %s is not taking records (%s); %d queued, retrying in the "
                            "background", self.uri, reason.splitlines()[0][:300], len(self._pending))
            self._failing = reason
            return False
        if self._failing is not None:
            log.warning("MLflow at %s is back; queued records sent", self.uri)
            self._failing = None
        return True

    def _sample_system(self) -> None:
        """Queue one sample of CPU/GPU memory and utilisation at the latest training step."""
        if self.latest_step is None:
            return
        import psutil
        vm = psutil.virtual_memory()
        metrics = {"system/cpu_utilization_percentage": psutil.cpu_percent(),
                   "system/system_memory_usage_megabytes": (vm.total - vm.available) / 2**20,
                   "system/system_memory_usage_percentage": vm.percent,
                   "system/process_rss_megabytes": psutil.Process().memory_info().rss / 2**20}
        if torch.cuda.is_initialized():  # never create a CUDA context for a CPU run
            device = self._cuda_device if self._cuda_device is not None else torch.cuda.current_device()
            metrics["system/gpu_memory_allocated_megabytes"] = torch.cuda.memory_allocated(device) / 2**20
            metrics["system/gpu_memory_reserved_megabytes"] = torch.cuda.memory_reserved(device) / 2**20
            try:
                metrics["system/gpu_utilization_percentage"] = float(torch.cuda.utilization(device))
            except Exception:  # needs pynvml / NVML; memory figures above are still useful
                pass
        with self._cond:
            self._pending.append({"op": "metrics", "handle": self.handle, "step": self.latest_step,
                                  "ts": _now_ms(), "metrics": metrics})


# --------------------------------------------------------------------------------------------
# The tracker


class Tracker:
    """Rank-0 MLflow logging. On other ranks every method is a cheap no-op."""

    def __init__(self, worker: _Worker | None = None, handle: str = "", run_dir: Path | None = None,
                 resume_run_id: str | None = None, cfg: TrackingConfig | None = None):
        self._worker = worker
        self._handle = handle
        self._run_dir = run_dir
        self._resume_run_id = resume_run_id
        self._cfg = cfg
        self._closed = worker is None
        self._staged = itertools.count()
        if worker is not None:
            atexit.register(self._close_at_exit)

    @classmethod
    def start(cls, cfg: TrackingConfig, *, runs_root: Path, run_dir: Path, run_name: str,
              run_id: str | None, enabled: bool, tags: dict[str, str]) -> "Tracker":
        """Start a new MLflow run, or continue `run_id` (resume). Never raises for an unreachable server.

        runs_root: the runs directory (home of the default SQLite store); run_dir: this run's
            directory (fallback file, staged artifact copies under `tracking/`).
        run_id: the id stored in the checkpoint being resumed, or None for a new run.
        enabled: False on every rank but 0; the tracker then does nothing.
        tags: run tags (model, dataset, T, neuron variant, strategy, ...); the git commit and
            Slurm ids are added here.
        Waits at most `cfg.start_timeout_s` for the run to exist. Records left in
        `<run_dir>/mlflow-fallback.jsonl` by an earlier session are sent first.
        """
        if not enabled:
            return cls()
        uri = resolve_uri(cfg, runs_root)
        # One HTTP attempt per request with a short timeout: the worker owns retrying, with
        # backoff, so MLflow's own retries (minutes by default) would only delay the journal.
        # These are process-wide MLflow settings; only the tracking process logs to MLflow.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(cfg.request_timeout_s))
        run_dir = Path(run_dir)
        (run_dir / "tracking").mkdir(parents=True, exist_ok=True)
        fallback = run_dir / FALLBACK_NAME
        carried = _read_fallback(fallback)
        if carried and carried[0].get("uri") != uri:
            warnings.warn(f"{fallback} holds records for {carried[0].get('uri')}, not {uri}; left "
                          f"as is (send them with `python -m train.tracking replay {run_dir}`)",
                          stacklevel=2)
            carried = []
        _remove_orphan_staging(run_dir, carried)

        records = list(carried)
        tags = {**environment_tags(), **{k: str(v) for k, v in tags.items()}}
        # A run that an earlier session never managed to create (store down all along) is the
        # run this session continues when the trainer has no run id to give.
        orphan = next((r for r in carried if r["op"] == "start" and not r.get("run_id")), None)
        if run_id is None and orphan is not None:
            handle = orphan["handle"]
            # the earlier session's end is not the run's end: this session goes on with it
            carried = [r for r in carried if not (r["op"] == "end" and r["handle"] == handle)]
            records = carried + [{"op": "tags", "handle": handle, "tags": tags}]
        else:
            handle = uuid.uuid4().hex
            records.append({"op": "start", "handle": handle, "uri": uri,
                            "experiment": cfg.experiment, "artifact_location": _artifact_location(uri),
                            "run_name": run_name, "run_id": run_id, "tags": tags})
        worker = _Worker(cfg, uri, handle, records, carried=len(carried), fallback=fallback)
        worker.wait_started(handle, cfg.start_timeout_s)
        return cls(worker, handle, run_dir, run_id, cfg)

    @property
    def enabled(self) -> bool:
        return self._worker is not None

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (store it in checkpoints); None until the run exists, or if disabled."""
        if self._worker is None:
            return None
        return self._worker.run_id(self._handle) or self._resume_run_id

    def log_params(self, params: dict[str, object]) -> None:
        """Log params (nested dicts are flattened to dotted keys, values stringified)."""
        if self._closed:
            return
        flat = flatten_config(params)
        for key in flat:
            _check_key(key, "param")
        for key, value in flat.items():
            if len(value) > _MAX_PARAM_VALUE_LENGTH:
                warnings.warn(f"param {key} is {len(value)} characters; MLflow keeps "
                              f"{_MAX_PARAM_VALUE_LENGTH}, the rest is cut", stacklevel=2)
                flat[key] = value[:_MAX_PARAM_VALUE_LENGTH]
        self._submit({"op": "params", "params": flat})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics at global step `step` (returns at once; sent in batches).

        Steps must increase per key; a step at or below one already stored for a key (e.g.
        re-logged after resuming from an older checkpoint) is dropped. Values may be floats or
        0-d tensors (a device tensor costs a synchronisation: prefer floats in the hot loop).
        """
        if self._closed:
            return
        values = {}
        for key, value in metrics.items():
            _check_key(key, "metric")
            values[key] = float(value.item() if isinstance(value, torch.Tensor) else value)
        step = int(step)
        self._worker.latest_step = step
        self._submit({"op": "metrics", "step": step, "ts": _now_ms(), "metrics": values})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory under `artifact_path` of the run's artifacts.

        The content is copied now, so later changes to `path` are not uploaded, and the copy
        survives a store outage until it is sent.
        """
        if self._closed:
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        staging = self._staging_dir()
        copy_path = staging / path.name
        if path.is_dir():
            shutil.copytree(path, copy_path)
            # a directory lands as <artifact_path>/<its name>/..., as MlflowClient.log_artifact does
            artifact_path = f"{artifact_path}/{path.name}" if artifact_path else path.name
        else:
            shutil.copy2(path, copy_path)
        self._submit({"op": "artifact", "path": str(copy_path), "artifact_path": artifact_path,
                      "cleanup": str(staging)})

    def log_firing_chart(self, history: dict[int, dict[str, float]]) -> None:
        """Render epoch -> {layer: firing rate} to `charts/firing_rates.png` in the artifacts
        (one chart holding every epoch so far; each call replaces the previous one)."""
        if self._closed or not history:
            return
        from train.charts import plot_firing_rates
        staging = self._staging_dir()
        png = plot_firing_rates(history, staging / "firing_rates.png")
        self._submit({"op": "artifact", "path": str(png), "artifact_path": "charts",
                      "cleanup": str(staging)})

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None:
        """Record the run's data set as an MLflow dataset input (the UI's Dataset column)."""
        if self._closed:
            return
        self._submit({"op": "dataset", "name": name, "digest": digest, "source": source, "context": context})

    def log_latency_chart(self, metrics: dict[str, float]) -> None:
        """Render `val/top1_t<k>` of `metrics` to `charts/latency.png` in the artifacts."""
        top1 = {int(k.rpartition("_t")[2]): v for k, v in metrics.items() if k.startswith("val/top1_t")}
        if self._closed or not top1:
            return
        from train.charts import plot_latency
        staging = self._staging_dir()
        png = plot_latency(top1, staging / "latency.png")
        self._submit({"op": "artifact", "path": str(png), "artifact_path": "charts", "cleanup": str(staging)})

    def log_model(self, model: torch.nn.Module, name: str = "best_model") -> None:
        """Save `model` as an MLflow PyTorch model under artifact `name`.

        Load it back with `mlflow.pytorch.load_model(f"runs:/{run_id}/{name}")`. DDP /
        DeepSpeed / torch.compile wrappers are unwrapped; weights are copied to CPU without
        allocating device memory, so a CPU-only machine can load it.
        """
        if self._closed:
            return
        import mlflow.pytorch
        model = _unwrap(model)
        staging = self._staging_dir()
        mlflow_pytorch_log = logging.getLogger("mlflow.pytorch")
        level = mlflow_pytorch_log.level
        mlflow_pytorch_log.setLevel(logging.ERROR)  # its pickle-safety notice, on every epoch
        try:
            mlflow.pytorch.save_model(
                _cpu_copy(model), str(staging / name),
                # pickle, not the torch.export 'pt2' default: that needs an input example and
                # cannot trace data-dependent spiking dynamics or custom kernels
                serialization_format="pickle",
                # inferring requirements imports the model in a subprocess (slow); torch suffices
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        finally:
            mlflow_pytorch_log.setLevel(level)
        self._submit({"op": "artifact", "path": str(staging / name), "artifact_path": name,
                      "cleanup": str(staging)})

    def flush(self) -> None:
        """Send everything queued; returns early (never blocks long) if the store is failing."""
        if self._closed:
            return
        self._worker.flush(timeout=self._cfg.close_timeout_s)

    def close(self, status: str = "FINISHED") -> None:
        """Flush, end the run with `status` (FINISHED, FAILED or KILLED); idempotent.

        Whatever the store did not take within `close_timeout_s` goes to the fallback file.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
        if self._closed:
            return
        self._submit({"op": "end", "status": status})
        self._closed = True
        atexit.unregister(self._close_at_exit)
        unsent = self._worker.close(timeout=self._cfg.close_timeout_s)
        fallback = self._run_dir / FALLBACK_NAME
        if unsent:
            _write_fallback(fallback, unsent)
            warnings.warn(f"MLflow at {self._worker.uri} did not take {len(unsent)} records "
                          f"({self._worker._failing}); saved to {fallback}. They are sent at the "
                          f"next start of this run, or by `python -m train.tracking replay "
                          f"{self._run_dir}`", stacklevel=2)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FINISHED" if exc_type is None else
                   "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _close_at_exit(self) -> None:
        # The trainer closes explicitly; reaching exit with the run open means it died.
        self.close("FAILED")

    def _submit(self, rec: dict) -> None:
        rec["handle"] = self._handle
        self._worker.submit(rec)

    def _staging_dir(self) -> Path:
        path = self._run_dir / "tracking" / "staged" / f"{next(self._staged):05d}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP / DataParallel / DeepSpeed / torch.compile wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) \
                or type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Deep copy of `model` with every parameter and buffer on CPU.

    Pre-seeding deepcopy's memo with CPU tensors means the device tensors are never duplicated
    on the device (a plain deepcopy would, which can OOM a GPU in the middle of training).
    """
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        cpu = t.detach().to("cpu", copy=True)
        memo[id(t)] = torch.nn.Parameter(cpu, t.requires_grad) if isinstance(t, torch.nn.Parameter) else cpu
    return copy.deepcopy(model, memo).eval()


def _remove_orphan_staging(run_dir: Path, carried: list[dict]) -> None:
    """Delete staged artifact copies that no pending record refers to (left by a killed process)."""
    staged = run_dir / "tracking" / "staged"
    if not staged.is_dir():
        return
    keep = {Path(r["cleanup"]).name for r in carried if r.get("cleanup")}
    for d in staged.iterdir():
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m train.tracking replay RUN_DIR [--uri URI]`: send a run's fallback records."""
    parser = argparse.ArgumentParser(prog="python -m train.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("replay", help=f"send <run_dir>/{FALLBACK_NAME} to MLflow")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument("--uri", default=None, help="tracking URI (default: the one recorded)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if not args.run_dir.is_dir():
        print(f"error: run directory {args.run_dir} does not exist", file=sys.stderr)
        return 2
    try:
        sent = replay(args.run_dir, args.uri)
    except TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"sent {sent} records from {args.run_dir / FALLBACK_NAME}" if sent
          else f"nothing to replay in {args.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
