"""The checkpoint owner: parts in, parts out; atomic names, newest-K retention (engine shards
too), a corrupt newest file skipped, another model refused, a full disk one clear error."""
import random

import numpy as np
import pytest
import torch

from train.checkpoints import CheckpointMismatch, CheckpointWriteError, Checkpointer, rng_state, set_rng_state


def test_keeps_newest_k_and_no_temporary_files(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (5, 10, 15):
        ckpt.write({"step": step, "w": torch.full((3,), float(step))}, step)
    names = [p.name for p in ckpt.paths()]
    assert names == ["step-000000015.pt", "step-000000010.pt"]
    assert not list(ckpt.dir.glob("*.tmp"))
    state, path = ckpt.load_latest()
    assert state["step"] == 15 and torch.equal(state["w"], torch.full((3,), 15.0))


def test_truncated_newest_checkpoint_falls_back_to_previous_with_one_line(tmp_path, capsys):
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.write({"step": 1}, 1)
    newest = ckpt.write({"step": 2, "big": torch.zeros(1000)}, 2)
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
    ckpt.write({"rng": rng_state()}, 0)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    set_rng_state(ckpt.load_latest()[0]["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class Counter:
    """A stateful part that is not a torch object (the train state's shape)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"counter": self.step}

    def load_state_dict(self, state):
        self.step = state["counter"]


class Shards:
    """An engine that writes a folder per tag (DeepSpeed's shape)."""

    def __init__(self):
        self.loaded = None

    def save_shards(self, folder, tag):
        (folder / tag).mkdir(parents=True)
        (folder / tag / "rank0.pt").write_text(tag)

    def load_shards(self, folder, tag):
        self.loaded = (folder / tag / "rank0.pt").read_text()


def parts(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_every_part_saved_is_every_part_restored(tmp_path):
    model, optimizer, scheduler = parts(0)
    counter = Counter()
    counter.step = 7
    Checkpointer(tmp_path, parts={"model": model, "optimizer": optimizer, "scheduler": scheduler},
                 train_state=counter).save(7)
    model2, optimizer2, scheduler2 = parts(1)
    counter2 = Counter()
    ckpt = Checkpointer(tmp_path, parts={"model": model2, "optimizer": optimizer2, "scheduler": scheduler2},
                        train_state=counter2)
    state = ckpt.load()
    assert state["counter"] == 7 and counter2.step == 7 and ckpt.loaded.name == "step-000000007.pt"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert torch.equal(optimizer.state_dict()["state"][0]["momentum_buffer"],
                       optimizer2.state_dict()["state"][0]["momentum_buffer"])
    assert scheduler2.get_last_lr() == scheduler.get_last_lr() == [0.05]


def test_engine_shards_follow_the_manifest_and_are_pruned_with_it(tmp_path):
    shards = Shards()
    ckpt = Checkpointer(tmp_path, keep=2, parts={}, sharded=shards)
    for step in (1, 2, 3):
        ckpt.save(step)
    assert sorted(p.name for p in (ckpt.dir / "deepspeed").iterdir()) == ["step-000000002", "step-000000003"]
    ckpt.load()
    assert shards.loaded == "step-000000003"


def test_another_models_weights_are_refused_with_the_file_and_the_keys(tmp_path):
    Checkpointer(tmp_path, parts={"model": torch.nn.Linear(3, 2)}).save(1)
    with pytest.raises(CheckpointMismatch, match=r"step-000000001.pt holds the weights of another model"):
        Checkpointer(tmp_path, parts={"model": torch.nn.Linear(4, 2)}).load()


def test_an_optional_part_missing_from_an_older_checkpoint_is_left_as_it_is(tmp_path):
    Checkpointer(tmp_path, parts={"model": torch.nn.Linear(3, 2)}).save(1)
    ema = torch.nn.Linear(3, 2)
    before = ema.weight.clone()
    Checkpointer(tmp_path, parts={"model": torch.nn.Linear(3, 2), "ema": ema}, optional=frozenset({"ema"})).load()
    assert torch.equal(ema.weight, before)


def test_a_full_disk_is_one_error_naming_the_file_and_the_previous_checkpoint_stands(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, parts={"model": torch.nn.Linear(3, 2)})
    ckpt.save(1)
    real_save = torch.save

    def disk_full(obj, f):  # as torch.save reports it: its zip writer's error, raised over the OSError
        f.write(b"partial")
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from None

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"could not write .*step-000000002.pt \(No space left"):
        ckpt.save(2)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in ckpt.dir.iterdir()] == ["step-000000001.pt"]
    assert ckpt.load()["model"]["weight"].shape == (2, 3)
