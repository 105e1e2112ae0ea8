"""`RunTracker`: what the training loop calls on a tracker, as a Protocol.

`train.tracking.Tracker` is the implementation; the loop is typed against this, and the loop's
in-process tests build their fake from `Tracker` itself (`unittest.mock.create_autospec`), so a
renamed or re-signed call fails them (tests/train/test_loop.py also checks that every method
here exists on `Tracker` with the same signature).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import nn


class RunTracker(Protocol):
    """Rank 0's MLflow run of one training run (every call a no-op on the other ranks)."""

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (stored in checkpoints); None until the store answered."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """`metrics` at `step` (global optimizer step, or epoch for the epoch metrics)."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_firing_chart(self, history: dict[int, dict[str, float]]) -> None:
        """history: epoch -> layer -> firing rate (spikes per neuron and step)."""

    def log_latency_chart(self, metrics: dict[str, float]) -> None:
        """metrics: the final validation's, with `val/top1_t<t>` after each step t."""

    def log_model(self, model: nn.Module, name: str = "best_model") -> None: ...

    def flush(self) -> None:
        """Block until every record so far is in the store (or, while it fails, in the fallback file)."""

    def close(self, status: str = "FINISHED") -> None: ...
