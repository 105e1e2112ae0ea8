"""A run directory: the one place that knows its layout, and the one reader of its checkpoints.

    <run.root>/<run.name>/
        config.yaml              the resolved config the run was started with
        checkpoints/             step checkpoints and their manifests (`train.checkpoints`)
        best_model.pt            the weights of the best validation top-1 so far (a state dict)
        final_metrics.json       the last validation, written when training ends
        eval.json                `python -m train.evaluate`'s measurements
        export/                  `python -m train.export`'s files
        mlflow-fallback.jsonl    MLflow records a session could not send (`train.tracking`)

The trainer (`train.loop`), `train.evaluate`, `train.export` and the study ask a `RunDir` for
these paths, and for what the newest checkpoint holds (`newest_checkpoint`: its step, epoch and
MLflow run id from the manifest, without unpickling the optimizer; `weights`, on request).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from train.checkpoints import CheckpointSummary, Checkpointer
from train.config import Config, ConfigError
from train.tracking.config import FALLBACK_NAME


@dataclass(frozen=True)
class RunDir:
    """The run directory at `path` (it need not exist yet)."""
    path: Path

    @classmethod
    def of(cls, cfg: Config) -> "RunDir":
        """The directory `cfg` trains in: `<run.root>/<run.name>`."""
        return cls(Path(cfg.run.root) / cfg.run.name)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best_model(self) -> Path:
        return self.path / "best_model.pt"

    @property
    def final_metrics(self) -> Path:
        return self.path / "final_metrics.json"

    @property
    def eval_results(self) -> Path:
        return self.path / "eval.json"

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    @property
    def fallback_journal(self) -> Path:
        return self.path / FALLBACK_NAME

    def require(self) -> "RunDir":
        """This directory, once it is known to be a run directory (ConfigError otherwise: the
        user gave another path)."""
        if not self.config.is_file():
            raise ConfigError(f"{self.path} is not a run directory ({self.config} is missing); "
                              "give the directory `python -m train` wrote, e.g. runs/demo-digits")
        return self

    def checkpointer(self, **kwargs) -> Checkpointer:
        """The owner of this run's checkpoint files (`train.checkpoints.Checkpointer` arguments)."""
        return Checkpointer(self.checkpoints, best=self.best_model, **kwargs)

    def newest_checkpoint(self) -> CheckpointSummary | None:
        """The newest complete checkpoint's step, epoch, MLflow run id, config hash and format
        version, from its manifest (no tensor read); None when the run has none. Incomplete or
        corrupt ones are skipped with one warning line each."""
        return self.checkpointer().newest()

    def weights(self, which: str) -> tuple[dict[str, torch.Tensor], Path, CheckpointSummary | None]:
        """(the model's state dict, the file it came from, the newest checkpoint or None).

        which: "best" reads `best_model.pt`; "last" the newest complete step checkpoint's
        "model" entry (memory-mapped: the optimizer's tensors are not read). ConfigError when
        the file is missing or unreadable, or the weights live in DeepSpeed's shards.
        """
        ckpt = self.checkpointer()
        newest = ckpt.newest()
        if which == "best":
            if not self.best_model.is_file():
                raise ConfigError(f"{self.best_model} is missing (the run has not finished an epoch?); "
                                  "set eval.checkpoint=last to use the newest step checkpoint")
            try:
                return torch.load(self.best_model, map_location="cpu", weights_only=True), self.best_model, newest
            except Exception as e:  # truncated or foreign file: the user's to fix
                raise ConfigError(f"{self.best_model} is unreadable ({type(e).__name__}); "
                                  "set eval.checkpoint=last") from None
        if which != "last":
            raise ValueError(f"which={which!r}: 'best' or 'last'")
        if newest is None:
            raise ConfigError(f"no complete checkpoint in {self.checkpoints}; train the run first")
        if not newest.holds_model:  # DeepSpeed keeps weights in its own shards; best_model.pt is whole
            raise ConfigError(f"{newest.path} holds DeepSpeed shards, not a whole model; set eval.checkpoint=best")
        return ckpt.read(newest)["model"], newest.path, newest
