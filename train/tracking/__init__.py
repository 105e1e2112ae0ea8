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

  config.py       TrackingConfig, constants, the tracking URI (stdlib only: the config schema's)
  tracker.py      Tracker, what the trainer calls
  protocol.py     RunTracker, the Protocol the training loop is typed against (Tracker is it)
  worker.py       the journal and its background thread (backoff, flush, close)
  sender.py       the only code that talks to MLflow
  fallback.py     the fallback file, its replay and `python -m train.tracking replay`
  staging.py      copies of logged artifacts, kept until they are sent
  system.py       system metrics from MLflow's monitors, through the journal
  environment.py  git commit, package versions and Slurm ids as params and tags

Importing this package costs no torch or MLflow (seconds each): the config schema, launchers
and the report import it; the heavy names below load on first use (PEP 562).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from train.tracking.config import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, FALLBACK_NAME, RUN_STATUSES,
                                   TrackingConfig, TrackingError, resolve_uri)

if TYPE_CHECKING:
    from train.tracking.environment import environment_params, environment_tags
    from train.tracking.fallback import main, replay
    from train.tracking.tracker import Tracker

_LAZY = {"Tracker": "tracker", "environment_params": "environment", "environment_tags": "environment",
         "replay": "fallback", "main": "fallback"}

__all__ = ["EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "FALLBACK_NAME", "RUN_STATUSES", "TrackingConfig",
           "TrackingError", "resolve_uri", "Tracker", "environment_params", "environment_tags", "replay",
           "main"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
