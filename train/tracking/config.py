"""What the config schema needs from tracking, importable without torch or MLflow.

`train.config` composes `TrackingConfig` into the one schema, and `launch` and `study` resolve
the tracking URI before any training starts; none of them should pay for importing torch or
MLflow (seconds) to read a dataclass. Stdlib only, and a test keeps it so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

FALLBACK_NAME = "mlflow-fallback.jsonl"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

#: The experiment tag MLflow 3's UI reads to open runs in its model-training view, not the GenAI one.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


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
    # "minimum": the bound train.config checks (this module stays stdlib-only, like the schema)
    uri: Optional[str] = None
    experiment: str = "spikescale"
    log_every_steps: int = field(default=50, metadata={"minimum": 1})
    system_metrics: bool = False
    system_metrics_interval_s: float = field(default=10.0, metadata={"minimum": 0.1})
    flush_interval_s: float = field(default=2.0, metadata={"minimum": 0.01})
    request_timeout_s: int = field(default=5, metadata={"minimum": 1})
    retry_max_backoff_s: float = field(default=30.0, metadata={"minimum": 0.0})
    start_timeout_s: float = field(default=30.0, metadata={"minimum": 0.0})
    close_timeout_s: float = field(default=15.0, metadata={"minimum": 0.0})
    tags: Dict[str, str] = field(default_factory=dict)


class TrackingError(Exception):
    """A tracking problem the user fixes (deleted experiment, replay against a dead server)."""


def resolve_uri(cfg: TrackingConfig, runs_root: Path) -> str:
    """The tracking URI: config, then $MLFLOW_TRACKING_URI, then the embedded SQLite store."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(runs_root).resolve()}/mlflow.db"


def artifact_location(uri: str) -> str | None:
    """Artifact root for experiments this tracker creates in a local SQLite store.

    `mlartifacts/` next to the database, the layout `make mlflow-ui` serves; None for servers,
    which choose (and proxy) their own artifact store.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):]).resolve()
    return (db.parent / "mlartifacts").as_uri()
