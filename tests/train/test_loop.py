"""The step loop in process, with a fake strategy and loader and a tracker built from the real
one's interface: micro-batches per step, a skipped non-finite step, the stop signal's
save-and-requeue, an exact resume from it, and a checkpoint of every readable format version
(tests/train/fixtures) resuming, another version refused."""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import shutil
import tempfile
from pathlib import Path
from unittest.mock import create_autospec

import pytest
import torch
from torch import nn

import models.zoo  # noqa: F401  (registers the spiking networks with timm)
from data_pipelines.meta import Meta
from train.checkpoints import FORMAT_VERSION, READABLE_VERSIONS, CheckpointFormatError
from train.config import changed_keys, load_config, to_dict
from train.distributed import DistEnv
from train.engine import build_loss, build_model, build_optimizer, build_scheduler
from train.loop import REQUEUE_EXIT_CODE, Parts, Trainer
from train.strategies import TorchStrategy
from train.tracking import Tracker
from train.tracking.protocol import RunTracker
from tests.train.trainrun import DEMO

META = Meta(dataset="digits", num_classes=10, classes=[str(c) for c in range(10)], in_chans=1,
            counts={"train": 32, "val": 32}, height=8, width=8)
BATCHES, BATCH = 8, 4  # micro-batches per epoch, images per micro-batch


class Loader:
    """Seeded batches of 8x8 images: batch i of epoch e is a function of (e, i) only."""

    batches_per_epoch, samples_per_epoch, meta = BATCHES, BATCHES * BATCH, META

    def __init__(self, poison: set[tuple[int, int]] = frozenset()):
        self.poison = poison  # (epoch, batch) whose loss is NaN (NaN images would not do: a NaN
        self.seen: list[tuple[int, int]] = []  # membrane never crosses the threshold)

    def poisoned(self) -> bool:
        return self.seen[-1] in self.poison

    def iterate(self, epoch: int, start_batch: int = 0):
        for i in range(start_batch, BATCHES):
            g = torch.Generator().manual_seed(1000 * epoch + i)
            x = torch.rand(BATCH, 1, 8, 8, generator=g)
            self.seen.append((epoch, i))
            yield x, torch.randint(0, 10, (BATCH,), generator=g)


class Strategy:
    """Plain SGD with the Strategy interface, recording what the loop asks of it."""

    def __init__(self, model: nn.Module):
        self.module = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        self.syncs: list[bool] = []
        self.steps = self.skips = 0

    @contextlib.contextmanager
    def forward(self, model=None, *, sync=True):
        if model is None:
            self.syncs.append(sync)
        yield model or self.module

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.steps += 1
        return {"grad_norm": 1.0}

    def skip_step(self):
        self.optimizer.zero_grad()
        self.skips += 1

    def lr(self):
        return 0.05

    def state(self):
        return {"model": self.module, "optimizer": self.optimizer}, None

    def model_state_dict(self):
        return self.module.state_dict()


class Recorded:
    """A tracker built from the real `Tracker`'s interface (`create_autospec`: a call the real
    one lacks, or with arguments it does not take, fails the test), recording what was logged."""

    def __init__(self):
        self.metrics: dict[int, dict[str, float]] = {}
        self.status = None
        self.tracker = create_autospec(Tracker, instance=True)
        self.tracker.run_id = "fake-run"
        self.tracker.log_metrics.side_effect = lambda metrics, step: self.metrics.setdefault(step, {}).update(metrics)
        self.tracker.close.side_effect = self._close

    def _close(self, status="FINISHED"):
        self.status = status


def test_the_real_tracker_has_every_call_of_the_loops_tracker_protocol_with_its_signature():
    def parameters(f):
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    calls = [n for n, v in vars(RunTracker).items() if not n.startswith("_") and callable(v)]
    assert {"log_metrics", "flush", "close", "log_model"} <= set(calls)
    for name in calls:
        assert parameters(getattr(Tracker, name)) == parameters(getattr(RunTracker, name)), name
    assert isinstance(vars(Tracker)["run_id"], property)


class Stop:
    def __init__(self, after_batches: int | None = None, loader: Loader | None = None):
        self.after, self.loader = after_batches, loader

    @property
    def received(self):
        return "SIGUSR2" if self.after is not None and len(self.loader.seen) >= self.after else None


def trainer(tmp_path, *overrides: str, loader: Loader | None = None, cli_keys: set[str] = frozenset(),
            real_strategy: bool = False):
    """A Trainer on the fake loader and tracker; its strategy the fake one, or with
    `real_strategy` the one `python -m train` builds (SGD, schedule, grad scaler)."""
    cfg = load_config([DEMO], [f"run.root={tmp_path}", "optim.epochs=2", "optim.warmup_epochs=0",
                               "tracking.log_every_steps=1", "train.checkpoint_every_steps=0", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, META)
    tracker = Recorded()
    loader = loader or Loader()
    loss = build_loss(cfg, None)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    if real_strategy:
        optimizer = build_optimizer(cfg, model)
        strategy = TorchStrategy(cfg, env, model, optimizer, build_scheduler(cfg, optimizer, BATCHES))
    else:
        strategy = Strategy(model)
    parts = Parts(model=model, strategy=strategy, train_loader=loader, val_loader=Loader(),
                  train_loss=lambda logits, y: loss(logits, y) * (math.nan if loader.poisoned() else 1.0),
                  open_tracker=lambda run_id, forked: tracker.tracker,
                  fresh_model=lambda: build_model(cfg, META))
    return Trainer(cfg, env, parts, cli_keys), tracker


def test_each_step_runs_its_micro_batches_and_syncs_only_the_last(tmp_path):
    t, tracker = trainer(tmp_path, "optim.accumulate=2")
    assert t.fit(Stop()) == 0
    assert t.p.strategy.syncs == [False, True] * BATCHES  # 2 epochs x 4 steps x 2 micro-batches
    assert t.p.strategy.steps == t.state.global_step == 8 and t.state.epoch == 2
    assert tracker.status == "FINISHED" and sorted(k for k in tracker.metrics if "train/step_loss" in tracker.metrics[k]) == list(range(1, 9))


def test_a_non_finite_micro_batch_skips_its_whole_step_and_is_counted(tmp_path):
    loader = Loader(poison={(0, 3)})  # the second micro-batch of step 2 (accumulate 2)
    t, tracker = trainer(tmp_path, "optim.accumulate=2", loader=loader)
    assert t.fit(Stop()) == 0
    assert t.p.strategy.skips == 1 and t.p.strategy.steps == t.state.global_step == 7
    assert t.state.nonfinite_total == 1 and tracker.metrics[7]["train/nonfinite_steps"] == 1


def test_non_finite_steps_in_a_row_stop_the_run_as_failed(tmp_path):
    loader = Loader(poison={(0, i) for i in range(BATCHES)})
    t, tracker = trainer(tmp_path, "train.max_nonfinite_steps=3", loader=loader)
    assert t.fit(Stop()) == 1
    assert tracker.status == "FAILED" and t.p.strategy.skips == 3 and t.state.global_step == 0


def test_a_stop_signal_saves_and_requeues_and_the_resume_ends_as_an_uninterrupted_run(tmp_path):
    straight, _ = trainer(tmp_path / "straight")
    assert straight.fit(Stop()) == 0
    loader = Loader()
    stopped, tracker = trainer(tmp_path / "stopped", loader=loader)
    assert stopped.fit(Stop(after_batches=11, loader=loader)) == REQUEUE_EXIT_CODE
    assert tracker.status == "KILLED" and stopped.ckpt.paths()[0].name == "step-000000011.pt"
    resumed_loader = Loader()
    resumed, _ = trainer(tmp_path / "stopped", loader=resumed_loader)
    assert resumed.fit(Stop()) == 0
    assert (resumed.state.epoch, resumed.state.global_step) == (2, 16)
    assert loader.seen + resumed_loader.seen == [(e, i) for e in range(2) for i in range(BATCHES)]  # none twice
    a, b = straight.p.model.state_dict(), resumed.p.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("changed", ["optim.lr=0.2"])
def test_resuming_with_a_changed_config_names_the_key(tmp_path, changed):
    first, _ = trainer(tmp_path, "optim.epochs=1")
    assert first.fit(Stop()) == 0
    again, _ = trainer(tmp_path, changed)
    from train.config import ConfigError
    with pytest.raises(ConfigError, match="optim.lr"):
        again.fit(Stop())


# A checkpoint of every format version this release reads, as an older release wrote it: one epoch
# of `trainer` (the demo's spiking_resnet_tiny on the fake loader, the strategy `python -m train`
# builds: model, optimizer, schedule, grad scaler and train state), written by `write_fixture`.
FIXTURES = Path(__file__).parent / "fixtures"


def write_fixture(version: int = FORMAT_VERSION) -> Path:
    """Write the fixture of checkpoint format `version` (this release's) under FIXTURES, from a
    temporary run: `python -c "from tests.train.test_loop import write_fixture; write_fixture()"`."""
    with tempfile.TemporaryDirectory() as tmp:
        t, _ = trainer(Path(tmp), "optim.epochs=1", real_strategy=True)
        assert t.fit(Stop()) == 0
        out = FIXTURES / f"checkpoint-format-{version}" / t.cfg.run.name / "checkpoints"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(t.run.checkpoints, out)
    return out


@pytest.mark.parametrize("version", READABLE_VERSIONS)
def test_a_checkpoint_of_each_readable_format_version_resumes_where_it_stopped(tmp_path, version):
    shutil.copytree(FIXTURES / f"checkpoint-format-{version}", tmp_path, dirs_exist_ok=True)
    loader = Loader()
    saved = torch.load(next((tmp_path / "demo-digits" / "checkpoints").glob("step-*.pt")), weights_only=True)
    # Every key whose value changed since (where it was written, its epochs, new defaults) is named
    # on the command line, as a user resuming after an upgrade does: the format is under test here.
    current = to_dict(load_config([DEMO], [f"run.root={tmp_path}"]))
    t, _ = trainer(tmp_path, loader=loader, cli_keys=set(changed_keys(saved["config"], current)) | {"optim.epochs"},
                   real_strategy=True)
    saved = saved["model"]
    assert t.fit(Stop()) == 0
    assert loader.seen == [(1, i) for i in range(BATCHES)]  # the second epoch only
    assert t.ckpt.loaded.name == "step-000000008.pt" and t.state.global_step == 16
    assert all(torch.isfinite(p).all() for p in t.p.model.parameters())
    assert any(not torch.equal(saved[k], v) for k, v in t.p.model.state_dict().items())  # it trained on


def test_a_checkpoint_of_a_format_version_this_release_cannot_read_is_refused_naming_it(tmp_path):
    shutil.copytree(FIXTURES / f"checkpoint-format-{FORMAT_VERSION}", tmp_path, dirs_exist_ok=True)
    (manifest,) = (tmp_path / "demo-digits" / "checkpoints").glob("step-*.json")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": FORMAT_VERSION + 1}))
    t, _ = trainer(tmp_path, real_strategy=True)
    with pytest.raises(CheckpointFormatError, match=f"is checkpoint format version {FORMAT_VERSION + 1}; "):
        t.fit(Stop())
