"""Checkpoint files: atomic names, newest-K retention, a corrupt newest one is skipped."""
import random

import numpy as np
import pytest
import torch

from train.checkpoints import Checkpointer, rng_state, set_rng_state


def test_keeps_newest_k_and_no_temporary_files(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (5, 10, 15):
        ckpt.save({"step": step, "w": torch.full((3,), float(step))}, step)
    names = [p.name for p in ckpt.paths()]
    assert names == ["step-000000015.pt", "step-000000010.pt"]
    assert not list(ckpt.dir.glob("*.tmp"))
    state, path = ckpt.load_latest()
    assert state["step"] == 15 and torch.equal(state["w"], torch.full((3,), 15.0))


def test_truncated_newest_checkpoint_falls_back_to_previous_with_one_line(tmp_path, capsys):
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save({"step": 1}, 1)
    newest = ckpt.save({"step": 2, "big": torch.zeros(1000)}, 2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    state, path = ckpt.load_latest()
    assert state["step"] == 1 and path.name == "step-000000001.pt" and ckpt.loaded == path
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: checkpoint {newest} is unreadable")


def test_best_model_is_written_atomically_and_a_failed_write_keeps_the_previous(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path)
    path = ckpt.save_best({"w": torch.ones(3)})
    assert path == tmp_path / "best_model.pt"

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        ckpt.save_best({"w": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pt"]  # no temporary left


def test_no_checkpoint_gives_none(tmp_path):
    assert Checkpointer(tmp_path).load_latest() is None


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path)
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    ckpt.save({"rng": rng_state()}, 0)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    set_rng_state(ckpt.load_latest()[0]["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
