"""The step loop in process, with a fake strategy, loader and tracker: micro-batches per step,
a skipped non-finite step, the stop signal's save-and-requeue, and an exact resume from it."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

import models.zoo  # noqa: F401  (registers the spiking networks with timm)
from train.config import load_config
from train.distributed import DistEnv
from train.engine import build_loss, build_model
from train.loop import REQUEUE_EXIT_CODE, Parts, Trainer
from tests.train.trainrun import DEMO

META = {"num_classes": 10, "in_chans": 1, "image_size": 8}
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


class Tracker:
    run_id = "fake-run"

    def __init__(self):
        self.metrics: dict[int, dict[str, float]] = {}
        self.status = None

    def log_metrics(self, metrics, step):
        self.metrics.setdefault(step, {}).update(metrics)

    def close(self, status="FINISHED"):
        self.status = status

    def __getattr__(self, name):  # flush, log_artifact, log_model, charts: nothing to record
        return lambda *args, **kwargs: None


class Stop:
    def __init__(self, after_batches: int | None = None, loader: Loader | None = None):
        self.after, self.loader = after_batches, loader

    @property
    def received(self):
        return "SIGUSR2" if self.after is not None and len(self.loader.seen) >= self.after else None


def trainer(tmp_path, *overrides: str, loader: Loader | None = None):
    cfg = load_config([DEMO], [f"run.root={tmp_path}", "optim.epochs=2", "optim.warmup_epochs=0",
                               "tracking.log_every_steps=1", "train.checkpoint_every_steps=0", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, META)
    tracker = Tracker()
    loader = loader or Loader()
    loss = build_loss(cfg, None)
    parts = Parts(model=model, strategy=Strategy(model), train_loader=loader, val_loader=Loader(),
                  train_loss=lambda logits, y: loss(logits, y) * (math.nan if loader.poisoned() else 1.0),
                  open_tracker=lambda run_id, forked: tracker,
                  fresh_model=lambda: build_model(cfg, META))
    return Trainer(cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), parts), tracker


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
