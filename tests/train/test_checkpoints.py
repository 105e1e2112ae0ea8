"""The checkpoint owner: parts in, parts out; atomic names, newest-K retention (engine shards
too), a complete checkpoint or none (manifest written last, every file's size and sha256 checked
on load: each corruption falls back to the previous one with one warning line), the summary read
without unpickling, another model or another format version refused, a full disk one clear error."""
import json
import random

import numpy as np
import pytest
import torch

from train.checkpoints import (FORMAT_VERSION, CheckpointError, CheckpointFormatError, CheckpointMismatch, CheckpointWriteError,
                               rng_state, set_rng_state)
from train.run_dir import RunDir


def test_keeps_newest_k_and_no_temporary_files(tmp_path):
    ckpt = RunDir(tmp_path).checkpointer(keep=2)
    for step in (5, 10, 15):
        ckpt.write({"step": step, "w": torch.full((3,), float(step))}, step)
    names = [p.name for p in ckpt.paths()]
    assert names == ["step-000000015.pt", "step-000000010.pt"]
    assert sorted(p.name for p in ckpt.dir.iterdir()) == ["step-000000010.json", "step-000000010.pt",
                                                          "step-000000015.json", "step-000000015.pt"]
    state = ckpt.load()
    assert state["step"] == 15 and torch.equal(state["w"], torch.full((3,), 15.0))


def test_the_manifest_lists_every_file_with_its_size_and_sha256_and_the_summary(tmp_path):
    import hashlib
    ckpt = RunDir(tmp_path).checkpointer(parts={}, sharded=Shards())
    path = ckpt.save(4)
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 1 and manifest["step"] == 4
    assert sorted(manifest["files"]) == ["deepspeed/step-000000004/rank0.pt", "step-000000004.pt"]
    for name, entry in manifest["files"].items():
        data = (ckpt.dir / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _flip_a_bit_in_a_tensor(path):
    """One bit of `w`'s payload flipped: same size, still unpickles, another value."""
    data = bytearray(path.read_bytes())
    payload = torch.full((256,), 1.0).numpy().tobytes()
    at = bytes(data).index(payload) + 100
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _corrupt(ckpt, step, how):
    path, manifest = ckpt.dir / f"step-{step:09d}.pt", ckpt.dir / f"step-{step:09d}.json"
    shard = ckpt.dir / "deepspeed" / f"step-{step:09d}" / "rank0.pt"
    if how == "uncommitted":  # killed between the shard and state writes and the manifest
        manifest.unlink()
        return "no manifest"
    if how == "shards only":  # killed after the shards, before the state file and the manifest
        manifest.unlink()
        path.unlink()
        return "no manifest"
    if how == "missing shard":
        shard.unlink()
        return "deepspeed/step-000000002/rank0.pt is missing"
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return "bytes, its manifest says"
    if how == "flipped bit":
        _flip_a_bit_in_a_tensor(path)
        flipped = torch.load(path, weights_only=True)["model"]["w"]  # it still loads, with another value
        assert flipped.shape == (256,) and not torch.equal(flipped, torch.full((256,), 1.0))
        return "step-000000002.pt does not match its manifest's sha256"
    if how == "torn manifest":
        manifest.write_text(manifest.read_text()[:20])
        return "its manifest step-000000002.json is unreadable"
    raise AssertionError(how)


class Shards:
    """An engine that writes a folder per tag (DeepSpeed's shape)."""

    def __init__(self):
        self.loaded = None

    def save_shards(self, folder, tag):
        (folder / tag).mkdir(parents=True)
        (folder / tag / "rank0.pt").write_text(tag)

    def load_shards(self, folder, tag):
        self.loaded = (folder / tag / "rank0.pt").read_text()


class Weights:
    """A part whose state is one 256-float tensor of value `value`."""

    def __init__(self, value=1.0):
        self.w = torch.full((256,), value)

    def state_dict(self):
        return {"w": self.w.clone()}

    def load_state_dict(self, state):
        self.w = state["w"].clone()


@pytest.mark.parametrize("how", ["uncommitted", "shards only", "missing shard", "truncated", "flipped bit",
                                 "torn manifest"])
def test_an_incomplete_or_corrupt_newest_checkpoint_falls_back_to_the_previous_with_one_warning(tmp_path, capsys,
                                                                                              how):
    shards = Shards()
    writer = RunDir(tmp_path).checkpointer(keep=3, parts={"model": Weights(1.0)}, sharded=shards)
    writer.save(1)
    writer.save(2)
    reason = _corrupt(writer, 2, how)
    part = Weights(0.0)
    reader = RunDir(tmp_path).checkpointer(parts={"model": part}, sharded=shards)
    state = reader.load()
    assert reader.loaded.name == "step-000000001.pt" and state["deepspeed_tag"] == "step-000000001"
    assert shards.loaded == "step-000000001" and torch.equal(part.w, torch.full((256,), 1.0))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: checkpoint {tmp_path / 'checkpoints' / 'step-000000002.pt'} is not usable (")
    assert reason in lines[0] and lines[0].endswith("falling back to the previous one")


def test_a_checkpoint_without_the_rng_or_loader_state_is_incomplete(tmp_path, capsys):
    need = frozenset({"rng", "epoch", "batch"})
    RunDir(tmp_path).checkpointer().write({"rng": rng_state(), "epoch": 0, "batch": 3}, 3)
    RunDir(tmp_path).checkpointer().write({"epoch": 0, "batch": 4}, 4)  # a writer that forgot the RNG
    ckpt = RunDir(tmp_path).checkpointer(required=need)
    assert ckpt.load()["batch"] == 3
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "step-000000004.pt is not usable (it lacks rng)" in line


def test_when_every_committed_checkpoint_is_broken_nothing_is_loaded_and_nothing_starts_afresh(tmp_path, capsys):
    ckpt = RunDir(tmp_path).checkpointer()
    for step in (1, 2):
        ckpt.write({"w": torch.full((256,), 1.0)}, step)
        _flip_a_bit_in_a_tensor(ckpt.dir / f"step-{step:09d}.pt")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*checkpoints \(each is named above\)"):
        ckpt.load()
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_debris_of_a_first_checkpoint_never_committed_is_a_fresh_start_with_one_warning(tmp_path, capsys):
    ckpt = RunDir(tmp_path).checkpointer()
    ckpt.write({"w": torch.ones(3)}, 1)
    (ckpt.dir / "step-000000001.json").unlink()
    assert ckpt.load() is None
    assert "no manifest" in capsys.readouterr().err


def test_a_checkpoint_of_a_release_before_manifests_is_refused_and_kept_not_pruned(tmp_path):
    """A whole checkpoint without manifest or format version (written before format 1) must not
    be taken for debris: a fresh start would prune it and lose the run."""
    ckpt = RunDir(tmp_path).checkpointer(keep=1)
    ckpt.dir.mkdir(parents=True)
    legacy = ckpt.dir / "step-000000044.pt"
    torch.save({"model": {"w": torch.ones(3)}, "global_step": 44}, legacy)
    with pytest.raises(CheckpointFormatError) as refused:
        ckpt.load()
    (line,) = str(refused.value).splitlines()
    assert "step-000000044.pt was written before checkpoint format 1" in line and "move" in line
    assert legacy.is_file()


def test_a_step_written_again_after_a_fall_back_replaces_the_broken_one_and_later_debris(tmp_path, capsys):
    ckpt = RunDir(tmp_path).checkpointer(keep=3)
    for step in (2, 3, 5):
        ckpt.write({"w": torch.full((256,), float(step))}, step)
    for step in (3, 5):  # never committed (5: left by a history with another cadence)
        (ckpt.dir / f"step-{step:09d}.json").unlink()
    assert ckpt.load()["w"][0] == 2 and len(capsys.readouterr().err.splitlines()) == 2
    ckpt.write({"w": torch.full((256,), 3.5)}, 3)   # the resumed run writes step 3 again
    assert [p.name for p in ckpt.paths()] == ["step-000000003.pt", "step-000000002.pt"]
    assert not list(ckpt.dir.glob("step-000000005.*"))  # a history the run went back from
    assert ckpt.load()["w"][0] == 3.5 and not capsys.readouterr().err


def test_the_summary_is_read_from_the_manifest_without_unpickling_anything(tmp_path, monkeypatch):
    scalars = {"epoch": 2, "batch": 5, "global_step": 13, "mlflow_run_id": "abc", "config_hash": "f00d",
               "optimizer": {"state": {0: torch.zeros(256)}}, "model": {"w": torch.ones(3)}}
    RunDir(tmp_path).checkpointer().write(scalars, 13)

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load called to read a summary")

    monkeypatch.setattr(torch, "load", no_load)
    summary = RunDir(tmp_path).checkpointer().newest()
    assert (summary.step, summary.epoch, summary.batch, summary.mlflow_run_id, summary.config_hash,
            summary.format_version, summary.holds_model) == (13, 2, 5, "abc", "f00d", 1, True)
    assert summary.path == tmp_path / "checkpoints" / "step-000000013.pt"


def test_a_summary_field_missing_from_the_manifest_is_an_error_not_a_default(tmp_path):
    RunDir(tmp_path).checkpointer().write({"epoch": 2, "batch": 5, "global_step": 13, "config_hash": "f00d"}, 13)
    with pytest.raises(KeyError, match=r"step-000000013.json lacks mlflow_run_id \(format version 1\)"):
        RunDir(tmp_path).checkpointer().newest()


def test_a_format_version_this_release_cannot_read_is_refused_in_one_line_naming_it(tmp_path):
    ckpt = RunDir(tmp_path).checkpointer(parts={"model": Weights()})
    ckpt.save(1)
    manifest = ckpt.dir / "step-000000001.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 99}))
    with pytest.raises(CheckpointFormatError) as refused:
        ckpt.load()
    (line,) = str(refused.value).splitlines()
    assert "step-000000001.json is checkpoint format version 99; this release reads version(s) 1" in line


def test_best_model_is_written_atomically_and_a_failed_write_keeps_the_previous(tmp_path, monkeypatch):
    ckpt = RunDir(tmp_path).checkpointer()
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
    assert RunDir(tmp_path).checkpointer().load() is None and RunDir(tmp_path).checkpointer().newest() is None


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    ckpt = RunDir(tmp_path).checkpointer()
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    ckpt.write({"rng": rng_state()}, 0)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    set_rng_state(ckpt.load()["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class Counter:
    """A stateful part that is not a torch object (the train state's shape)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"counter": self.step}

    def load_state_dict(self, state):
        self.step = state["counter"]


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
    RunDir(tmp_path).checkpointer(parts={"model": model, "optimizer": optimizer, "scheduler": scheduler},
                 train_state=counter).save(7)
    model2, optimizer2, scheduler2 = parts(1)
    counter2 = Counter()
    ckpt = RunDir(tmp_path).checkpointer(parts={"model": model2, "optimizer": optimizer2, "scheduler": scheduler2},
                        train_state=counter2)
    state = ckpt.load()
    assert state["counter"] == 7 and counter2.step == 7 and ckpt.loaded.name == "step-000000007.pt"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert torch.equal(optimizer.state_dict()["state"][0]["momentum_buffer"],
                       optimizer2.state_dict()["state"][0]["momentum_buffer"])
    assert scheduler2.get_last_lr() == scheduler.get_last_lr() == [0.05]


def test_engine_shards_follow_the_manifest_and_are_pruned_with_it(tmp_path):
    shards = Shards()
    ckpt = RunDir(tmp_path).checkpointer(keep=2, parts={}, sharded=shards)
    for step in (1, 2, 3):
        ckpt.save(step)
    assert sorted(p.name for p in (ckpt.dir / "deepspeed").iterdir()) == ["step-000000002", "step-000000003"]
    ckpt.load()
    assert shards.loaded == "step-000000003"


def test_another_models_weights_are_refused_with_the_file_and_the_keys(tmp_path):
    RunDir(tmp_path).checkpointer(parts={"model": torch.nn.Linear(3, 2)}).save(1)
    with pytest.raises(CheckpointMismatch, match=r"step-000000001.pt holds the weights of another model"):
        RunDir(tmp_path).checkpointer(parts={"model": torch.nn.Linear(4, 2)}).load()


def test_an_optional_part_missing_from_an_older_checkpoint_is_left_as_it_is(tmp_path):
    RunDir(tmp_path).checkpointer(parts={"model": torch.nn.Linear(3, 2)}).save(1)
    ema = torch.nn.Linear(3, 2)
    before = ema.weight.clone()
    RunDir(tmp_path).checkpointer(parts={"model": torch.nn.Linear(3, 2), "ema": ema}, optional=frozenset({"ema"})).load()
    assert torch.equal(ema.weight, before)


def test_a_full_disk_is_one_error_naming_the_file_and_the_previous_checkpoint_stands(tmp_path, monkeypatch):
    ckpt = RunDir(tmp_path).checkpointer(parts={"model": torch.nn.Linear(3, 2)})
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
    assert sorted(p.name for p in ckpt.dir.iterdir()) == ["step-000000001.json", "step-000000001.pt"]
    assert ckpt.load()["model"]["weight"].shape == (2, 3)


def test_a_step_written_again_stays_committed_with_its_new_contents(tmp_path):
    """The epoch end saves the step a periodic checkpoint saved just before: with keep=1 there is
    no older one to fall back to, so the rewrite commits by two renames, never uncommitting first."""
    ckpt = RunDir(tmp_path).checkpointer(keep=1)
    ckpt.write({"w": torch.ones(3)}, 4)
    ckpt.write({"w": torch.zeros(3)}, 4)
    assert torch.equal(ckpt.load()["w"], torch.zeros(3))
    assert sorted(p.name for p in ckpt.dir.iterdir()) == ["step-000000004.json", "step-000000004.pt"]
