"""The run directory: one layout, one reader of what its checkpoints hold (the summary from the
manifest without unpickling, the weights on request without the optimizer's tensors)."""
from pathlib import Path

import pytest
import torch

from train.config import ConfigError, load_config
from train.run_dir import RunDir
from train.tracking import FALLBACK_NAME
from tests.train.trainrun import DEMO

SCALARS = {"epoch": 1, "batch": 0, "global_step": 9, "mlflow_run_id": "run-1", "config_hash": "abc"}


def test_the_layout_is_named_in_one_place(tmp_path):
    cfg = load_config([DEMO], [f"run.root={tmp_path}", "run.name=r"])
    run = RunDir.of(cfg)
    assert run.path == tmp_path / "r"
    assert (run.config, run.checkpoints, run.best_model, run.final_metrics, run.eval_results, run.export_dir,
            run.fallback_journal) == tuple(tmp_path / "r" / name for name in (
                "config.yaml", "checkpoints", "best_model.pt", "final_metrics.json", "eval.json", "export",
                FALLBACK_NAME))


def test_a_directory_without_its_config_is_not_a_run_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"is not a run directory \(.*config.yaml is missing\)"):
        RunDir(tmp_path).require()


def test_the_newest_checkpoints_step_and_run_id_come_without_unpickling_and_weights_on_request(tmp_path,
                                                                                              monkeypatch):
    run = RunDir(tmp_path)
    model, optimizer = {"w": torch.arange(4.0)}, {"state": {0: {"momentum_buffer": torch.ones(4)}}}
    run.checkpointer().write({**SCALARS, "model": model, "optimizer": optimizer}, 9)
    real_load = torch.load
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    newest = run.newest_checkpoint()
    assert (newest.step, newest.epoch, newest.mlflow_run_id, newest.config_hash) == (9, 1, "run-1", "abc")
    assert not loads  # the manifest alone
    weights, source, summary = run.weights("last")
    assert torch.equal(weights["w"], torch.arange(4.0)) and source == newest.path and summary == newest
    assert loads == [{"map_location": "cpu", "weights_only": True, "mmap": True}]  # tensors read when used


def test_weights_name_what_is_missing_in_one_line(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(ConfigError, match="best_model.pt is missing"):
        run.weights("best")
    with pytest.raises(ConfigError, match="no complete checkpoint in"):
        run.weights("last")
    run.checkpointer().write({**SCALARS, "deepspeed_tag": "step-000000009"}, 9)
    with pytest.raises(ConfigError, match="holds DeepSpeed shards, not a whole model"):
        run.weights("last")
    Path(run.best_model).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="best_model.pt is unreadable"):
        run.weights("best")
