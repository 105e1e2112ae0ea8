"""`Tracker`: what the trainer calls; every call only appends a record to the outage journal.

Validation that the caller can act on (metric and param names, param lengths) happens here, at
the call, with MLflow's own rules; everything that talks to the store happens on the journal's
thread (`worker.py`, `sender.py`), so a slow or dead store never costs the training loop.
"""
from __future__ import annotations

import atexit
import copy
import functools
import itertools
import json
import logging
import os
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from train.tracking.config import (FALLBACK_NAME, RUN_STATUSES, TrackingConfig, artifact_location,
                                   resolve_uri)
from train.tracking.environment import environment_tags
from train.tracking.fallback import carried_records
from train.tracking.staging import Staging
from train.tracking.worker import Worker, now_ms


def _rank0(method: Callable) -> Callable:
    """The one gate for rank-0-only logging: `method` does nothing on a tracker that is disabled
    (every rank but 0) or closed."""
    @functools.wraps(method)
    def logging_method(self: "Tracker", *args, **kwargs):
        if not self._closed:
            return method(self, *args, **kwargs)
    return logging_method


class Tracker:
    """Rank-0 MLflow logging. On other ranks every method is a cheap no-op."""

    def __init__(self, worker: Worker | None = None, handle: str = "", run_dir: Path | None = None,
                 resume_run_id: str | None = None):
        self._worker = worker
        self._handle = handle
        self._resume_run_id = resume_run_id
        self._closed = worker is None
        self._staging = Staging(run_dir) if run_dir else None
        if worker is not None:  # the trainer closes explicitly: open at exit means it died
            atexit.register(self.close, "FAILED")

    @classmethod
    def start(cls, cfg: TrackingConfig, *, runs_root: Path, run_dir: Path, run_name: str,
              run_id: str | None, enabled: bool, tags: dict[str, str]) -> "Tracker":
        """Start a new MLflow run, or continue `run_id` (resume). Never raises for an unreachable server.

        runs_root: the runs directory (home of the default SQLite store); run_dir: this run's
            directory (fallback file, staged artifact copies under `tracking/`).
        run_id: the id stored in the checkpoint being resumed, or None for a new run.
        enabled: False on every rank but 0; the tracker then does nothing.
        tags: run tags (model, dataset, T, neuron variant, strategy, ...); MLflow's run context
            (user, entry point), the git commit and Slurm ids are added here.
        Waits at most `cfg.start_timeout_s` for the run to exist. Records left in
        `<run_dir>/mlflow-fallback.jsonl` by an earlier session are sent first.
        """
        if not enabled:
            return cls()
        run_dir = Path(run_dir)
        handle, worker = _start_worker(cfg, resolve_uri(cfg, runs_root), run_dir, run_name, run_id, tags)
        return cls(worker, handle, run_dir, run_id)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (store it in checkpoints); None until the run exists, or if disabled."""
        if self._worker is None:
            return None
        return self._worker.run_id(self._handle) or self._resume_run_id

    @_rank0
    def log_params(self, params: Mapping[str, object]) -> None:
        """Log params given as {dotted key: value} (`train.config.flat_items` of the resolved
        config); values are logged as text, lists and tuples as JSON, enums as their value."""
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
        # MLflow cuts long values too, but where the store runs and as its settings say: a
        # server that does not would reject the whole batch, and its warning is in its own log.
        flat = {_check_key(key, "param"): _param_text(key, value) for key, value in params.items()}
        for key, value in flat.items():
            if len(value) > MAX_PARAM_VAL_LENGTH:
                warnings.warn(f"param {key} is {len(value)} characters; MLflow keeps "
                              f"{MAX_PARAM_VAL_LENGTH}, the rest is cut", stacklevel=3)
                flat[key] = value[:MAX_PARAM_VAL_LENGTH]
        self._submit({"op": "params", "params": flat})

    @_rank0
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics at global step `step` (returns at once; sent in batches).

        Steps must increase per key; a step at or below one already stored for a key (e.g.
        re-logged after resuming from an older checkpoint) is dropped. Values may be floats or
        0-d tensors (a device tensor costs a synchronisation: prefer floats in the hot loop).
        """
        values = {_check_key(key, "metric"): float(value.item() if isinstance(value, torch.Tensor) else value)
                  for key, value in metrics.items()}
        step = int(step)
        self._worker.latest_step = step
        self._submit({"op": "metrics", "step": step, "ts": now_ms(), "metrics": values})

    @_rank0
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory under `artifact_path` of the run's artifacts.

        The content is copied now, so later changes to `path` are not uploaded, and the copy
        survives a store outage until it is sent.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        if path.is_dir():
            # a directory lands as <artifact_path>/<its name>/..., as MlflowClient.log_artifact does
            artifact_path = f"{artifact_path}/{path.name}" if artifact_path else path.name
        self._submit_staged(self._staging.copy(path), artifact_path)

    @_rank0
    def log_firing_chart(self, history: dict[int, dict[str, float]]) -> None:
        """Render epoch -> {layer: firing rate} to `charts/firing_rates.png` in the artifacts
        (one chart holding every epoch so far; each call replaces the previous one)."""
        if history:
            from train.charts import plot_firing_rates
            self._log_chart(plot_firing_rates, history, "firing_rates.png")

    @_rank0
    def log_latency_chart(self, metrics: dict[str, float]) -> None:
        """Render `val/top1_t<k>` of `metrics` to `charts/latency.png` in the artifacts."""
        top1 = {int(k.rpartition("_t")[2]): v for k, v in metrics.items() if k.startswith("val/top1_t")}
        if top1:
            from train.charts import plot_latency
            self._log_chart(plot_latency, top1, "latency.png")

    @_rank0
    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None:
        """Record the run's data set as an MLflow dataset input (the UI's Dataset column)."""
        self._submit({"op": "dataset", "name": name, "digest": digest, "source": source, "context": context})

    @_rank0
    def log_model(self, model: torch.nn.Module, name: str = "best_model") -> None:
        """Save `model` (a plain module, not a DDP/DeepSpeed/compiled wrapper) as an MLflow
        PyTorch model under artifact `name`; load it back with
        `mlflow.pytorch.load_model(f"runs:/{run_id}/{name}")`, on a CPU-only machine too."""
        path = self._staging.new_dir() / name
        _save_pytorch_model(model, path)
        self._submit_staged(path, name)

    @_rank0
    def flush(self) -> None:
        """Send everything queued; returns early (never blocks long) if the store is failing."""
        self._worker.flush()

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
        atexit.unregister(self.close)
        unsent = self._worker.close()
        if unsent:
            fallback = self._worker.fallback
            warnings.warn(f"MLflow at {self._worker.uri} did not take {unsent} records "
                          f"({self._worker.failing}); saved to {fallback}. They are sent at the next "
                          f"start of this run, or by `python -m train.tracking replay {fallback.parent}`",
                          stacklevel=2)

    def _submit(self, rec: dict) -> None:
        rec["handle"] = self._handle
        self._worker.submit(rec)

    def _submit_staged(self, path: Path, artifact_path: str | None) -> None:
        """Queue the upload of staged `path`; its staging directory goes once it is uploaded."""
        self._submit({"op": "artifact", "path": str(path), "artifact_path": artifact_path,
                      "cleanup": str(path.parent)})

    def _log_chart(self, plot: Callable[[Any, Path], Path], data: Any, filename: str) -> None:
        self._submit_staged(plot(data, self._staging.new_dir() / filename), "charts")


def _start_worker(cfg: TrackingConfig, uri: str, run_dir: Path, run_name: str, run_id: str | None,
                  tags: dict[str, str]) -> tuple[str, Worker]:
    """(handle, worker) of a session whose journal begins with `run_dir`'s fallback records and
    this session's start record; waits at most `cfg.start_timeout_s` for the run to exist."""
    # One HTTP attempt per request with a short timeout: the worker owns retrying, with
    # backoff, so MLflow's own retries (minutes by default) would only delay the journal.
    # These are process-wide MLflow settings; only the tracking process logs to MLflow.
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(cfg.request_timeout_s))
    (run_dir / "tracking").mkdir(parents=True, exist_ok=True)
    start = {"op": "start", "uri": uri, "experiment": cfg.experiment,
             "artifact_location": artifact_location(uri), "run_name": run_name, "run_id": run_id,
             "tags": {**environment_tags(), **{k: str(v) for k, v in tags.items()}}}
    handle, records, carried = carried_records(run_dir, start)
    worker = Worker(cfg, uri, handle, records, carried=carried, fallback=run_dir / FALLBACK_NAME)
    worker.wait_started(handle, cfg.start_timeout_s)
    return handle, worker


@functools.cache
def _check_key(key: str, kind: str) -> str:
    """`key`, if MLflow accepts it as a metric or param name; else a ValueError naming the rule.
    Cached: the training loop logs the same few keys at every step."""
    from mlflow.utils.validation import (MAX_ENTITY_KEY_LENGTH, path_not_unique,
                                         validate_param_and_metric_name)
    if not (isinstance(key, str) and key and len(key) <= MAX_ENTITY_KEY_LENGTH
            and validate_param_and_metric_name(key) and not path_not_unique(key)):
        raise ValueError(f"{kind} name {key!r} is not a valid MLflow key: use at most "
                         f"{MAX_ENTITY_KEY_LENGTH} letters, digits, '_', '-', '.', ' ', ':' and "
                         "single '/' separators, e.g. 'firing_rate/layer3.1.lif2'")
    return key


def _param_text(key: str, value: Any) -> str:
    if isinstance(value, Mapping):
        raise TypeError(f"param {key} is a mapping; log_params takes dotted keys "
                        f"(flatten with train.config.flat_items)")
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return json.dumps([v.value if isinstance(v, Enum) else v for v in value], default=str)
    return str(value)


def _save_pytorch_model(model: torch.nn.Module, path: Path) -> None:
    """`mlflow.pytorch.save_model` of a CPU copy of `model`, pickled, torch its one requirement."""
    import mlflow.pytorch
    mlflow_pytorch_log = logging.getLogger("mlflow.pytorch")
    level = mlflow_pytorch_log.level
    mlflow_pytorch_log.setLevel(logging.ERROR)  # its pickle-safety notice, on every epoch
    try:
        mlflow.pytorch.save_model(
            _cpu_copy(model), str(path),
            # pickle, not the torch.export 'pt2' default: that needs an input example and
            # cannot trace data-dependent spiking dynamics or custom kernels
            serialization_format="pickle",
            # inferring requirements imports the model in a subprocess (slow); torch suffices
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    finally:
        mlflow_pytorch_log.setLevel(level)


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
