"""The training loop: built from parts (`train.engine.build` makes them from the config), so it
runs in process with a fake strategy and loader in tests.

One optimizer step reads top to bottom as in nanoGPT: for each micro-batch, forward, loss,
backward; then step (clip, update, schedule), log, checkpoint. Checkpoints are the unit of
reliability: one every `train.checkpoint_every_steps`, at each epoch end and when SIGTERM/SIGUSR2
arrives (then the run exits with `REQUEUE_EXIT_CODE` so a launcher requeues it); a rerun of the
same run directory resumes from the newest one, in the same MLflow run.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from timm.utils import ModelEmaV3
from torch import nn

from models.firing import capture_spike_totals, mean_firing_rate
from train import distributed, measure
from train.checkpoints import Checkpointer, CheckpointWriteError, rng_state, set_rng_state, write_atomically
from train.config import Config, ConfigError, changed_keys, config_hash, to_dict
from train.run_dir import RunDir
from train.strategies import Strategy
from train.tracking.protocol import RunTracker

REQUEUE_EXIT_CODE = 3   # "stopped on purpose after saving: requeue me"


@dataclass
class TrainState:
    """Where the run is and what it has seen: the checkpoint's top-level scalars."""
    cfg: Config
    rank: int = 0
    epoch: int = 0
    batch: int = 0                 # micro-batches of `epoch` consumed (the loader's resume point)
    global_step: int = 0
    best_top1: float = -1.0
    nonfinite_total: int = 0
    firing_history: dict[int, dict[str, float]] = field(default_factory=dict)
    totals: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))  # this rank's
    #                              loss sum, correct, images of the epoch so far (on the device)
    mlflow_run_id: str | None = None
    saved_config: dict[str, Any] | None = None  # the config of the checkpoint loaded, if any

    # What a checkpoint must hold to be resumed (the RNG and loader state among them); one
    # without them is incomplete, and the checkpointer falls back to the previous one.
    REQUIRED = frozenset({"epoch", "batch", "global_step", "rng", "loader_seed", "mlflow_run_id", "config",
                          "config_hash", "best_top1", "nonfinite_total", "firing_history", "epoch_totals"})

    def state_dict(self) -> dict[str, Any]:
        """Plain values (they load with weights_only=True); gathers every rank's RNG state."""
        return {"epoch": self.epoch, "batch": self.batch, "global_step": self.global_step,
                "rng": distributed.all_gather_object(rng_state()), "loader_seed": self.cfg.run.seed,
                "mlflow_run_id": self.mlflow_run_id, "config": to_dict(self.cfg),
                "config_hash": config_hash(self.cfg), "best_top1": self.best_top1,
                "nonfinite_total": self.nonfinite_total, "firing_history": self.firing_history,
                "epoch_totals": distributed.all_gather_object(self.totals.tolist())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch, self.global_step = state["epoch"], state["batch"], state["global_step"]
        self.best_top1, self.nonfinite_total = state["best_top1"], state["nonfinite_total"]
        self.firing_history = {int(k): v for k, v in state["firing_history"].items()}
        self.mlflow_run_id, self.saved_config = state["mlflow_run_id"], state["config"]
        rngs = state["rng"]
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        totals = state["epoch_totals"]
        self.totals = torch.tensor(totals[self.rank] if self.rank < len(totals) else [0.0] * 3,
                                   dtype=torch.float64, device=self.totals.device)


class BatchLoader(Protocol):
    """What the loop reads batches from (`data_pipelines.loaders.EpochLoader`)."""

    batches_per_epoch: int  # this rank's micro-batches per epoch

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start_batch`.. of `epoch`: (inputs, labels `[B]`), a function of (seed, epoch, rank)."""


class StopFlag(Protocol):
    """`train.engine.StopSignal`: the name of the stop signal received, or None."""

    received: str | None


@dataclass
class Parts:
    """What the loop trains with; `train.engine.build` makes them from the config."""
    model: nn.Module
    strategy: Strategy
    train_loader: BatchLoader
    val_loader: BatchLoader
    train_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    open_tracker: Callable[[str | None, str | None], RunTracker]  # (run id to continue, forked from)
    fresh_model: Callable[[], nn.Module]    # an unwrapped model for the MLflow model artifact
    mixup: Callable | None = None
    ema: ModelEmaV3 | None = None


class Stopped(Exception):
    """The run ends early: the exit code, the MLflow status and the line that says why."""

    def __init__(self, code: int, status: str, message: str):
        super().__init__(message)
        self.code, self.status = code, status


class Trainer:
    def __init__(self, cfg: Config, env: distributed.DistEnv, parts: Parts, cli_keys: set[str] = frozenset()):
        self.cfg, self.env, self.p, self.cli_keys = cfg, env, parts, cli_keys
        self.run = RunDir.of(cfg)
        self.steps_per_epoch = parts.train_loader.batches_per_epoch // cfg.optim.accumulate
        self.state = TrainState(cfg, rank=env.rank, totals=torch.zeros(3, dtype=torch.float64, device=env.device))
        states, sharded = parts.strategy.state()
        states |= {"ema": parts.ema.module} if parts.ema is not None else {}
        self.ckpt = self.run.checkpointer(keep=cfg.train.keep_checkpoints, parts=states, train_state=self.state,
                                          sharded=sharded, optional=frozenset({"ema"}),
                                          required=TrainState.REQUIRED, is_main=env.is_main)
        self.val_criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        self.tracker: RunTracker | None = None  # opened by fit, once the run to continue is known
        self.nonfinite_run = 0    # optimizer steps in a row skipped for a non-finite loss

    def fit(self, stop: StopFlag) -> int:
        """Resume, train to `optim.epochs`, evaluate; returns the exit code."""
        run_id, forked_from = resume(self.ckpt, self.state, self.cli_keys, self.env)
        s = self.state
        if s.epoch >= self.cfg.optim.epochs and self.run.final_metrics.exists():
            log(self.env, already_complete(self.cfg, self.run, s, run_id))
            return 0
        self.tracker = self.p.open_tracker(run_id, forked_from)
        self.watchdog = distributed.HangWatchdog(self.env, self.cfg.train.hang_timeout_s, REQUEUE_EXIT_CODE)
        with self.watchdog:  # stopped on the way out; an error that a hang caused waits for its line
            try:
                while s.epoch < self.cfg.optim.epochs:
                    self.train_epoch(stop)
                    self.end_epoch()  # advances s.epoch, saves
                    stopping = any_rank(stop.received is not None, self.env.device)
                    if stopping and s.epoch < self.cfg.optim.epochs:
                        raise requeue(stop, s.global_step)  # the signal came during the evaluation
                self.finish()
            except Stopped as e:
                log(self.env, str(e))
                self.tracker.close(status=e.status)
                return e.code
            except BaseException:
                self.tracker.close(status="FAILED")
                raise
        self.tracker.close()
        return 0

    def train_epoch(self, stop: StopFlag) -> None:
        cfg, s, st = self.cfg, self.p.strategy, self.state
        accumulate, reg = cfg.optim.accumulate, cfg.optim.firing_reg
        self.p.model.train()
        if st.batch == 0:  # a mid-epoch resume goes on with the checkpoint's sums
            st.totals.zero_()
        batches = iter(self.p.train_loader.iterate(st.epoch, st.batch))
        progress = Progress(self.env, st.epoch, cfg.optim.epochs, self.steps_per_epoch, st.batch // accumulate)
        tick, seen = time.perf_counter(), 0
        for _ in range(st.batch // accumulate, self.steps_per_epoch):
            finite, stopping = True, False
            for micro in range(accumulate):
                x, y = next(batches)
                x, target = self.p.mixup(x, y) if self.p.mixup else (x, y)
                with s.forward(sync=micro == accumulate - 1) as forward, \
                        capture_spike_totals(self.p.model) if reg > 0 else nullcontext() as spikes:
                    logits = forward(x)
                    loss = self.p.train_loss(logits.float(), target)
                    if reg > 0:  # a sparsity penalty, through the surrogate gradient
                        penalty = reg * (mean_firing_rate(spikes) - cfg.optim.firing_target) ** 2
                        loss = loss + penalty
                self.watchdog.beat(st.epoch, st.batch, st.global_step)
                ok, stop_seen = agree(loss, stop, self.env.world_size)  # a micro-batch's one host sync
                finite, stopping = finite and ok, stopping or stop_seen
                if ok:
                    s.backward(loss)
                    st.totals += counts(loss, logits, y)
                seen += len(y)
                st.batch += 1
            progress.advance()
            if not finite:  # no update: the step's gradients are dropped, the step not counted
                s.skip_step()
                self.nonfinite_run += 1
                st.nonfinite_total += 1
                if self.nonfinite_run >= cfg.train.max_nonfinite_steps:
                    progress.close()
                    raise Stopped(1, "FAILED", f"{self.nonfinite_run} non-finite losses in a row: stopping; the "
                                               f"last good checkpoint is kept in {self.ckpt.dir}")
            else:
                stats = s.step()
                self.nonfinite_run = 0
                st.global_step += 1
                self.watchdog.beat(st.epoch, st.batch, st.global_step)
                if self.p.ema is not None:
                    self.p.ema.update(s.module, step=st.global_step)
                if st.global_step % max(1, cfg.tracking.log_every_steps) == 0:
                    if reg > 0:
                        stats["train/firing_reg_loss"] = float(penalty)
                    self.log_step(loss, stats, seen / (time.perf_counter() - tick), progress)
                    tick, seen = time.perf_counter(), 0
            every = cfg.train.checkpoint_every_steps
            if stopping or (finite and every and st.global_step % every == 0):
                self.save()
            if stopping:
                progress.close()
                raise requeue(stop, st.global_step)
        progress.close()

    def log_step(self, loss: torch.Tensor, stats: dict[str, float], rate: float, progress: "Progress") -> None:
        step_loss = float(distributed.all_reduce_sum(loss.detach().double().reshape(1)) / self.env.world_size)
        lr, images_per_s = self.p.strategy.lr(), rate * self.env.world_size
        self.tracker.log_metrics({"train/step_loss": step_loss, "train/lr": lr, "train/images_per_s": images_per_s,
                                  "train/nonfinite_steps": self.state.nonfinite_total, **stats}, self.state.global_step)
        progress.report(step_loss, lr, images_per_s)

    def save(self) -> None:
        """Metrics first: a run killed after this checkpoint resumes past the steps logged so far,
        so they must be in the store (or, while it is failing, in the fallback file)."""
        self.tracker.flush()
        self.state.mlflow_run_id = self.tracker.run_id  # known once the store answered
        on_every_rank(lambda: self.ckpt.save(self.state.global_step), self.env, self.ckpt.dir)

    def end_epoch(self) -> None:
        st = self.state
        metrics = validate(self.p, self.state.epoch, self.env.device, self.val_criterion)
        self.watchdog.beat(st.epoch, st.batch, st.global_step)  # a validation counts apart from the step
        loss_sum, correct, n = distributed.all_reduce_sum(st.totals.clone()).tolist()
        if n:
            metrics.update({"train/loss": loss_sum / n, "train/top1": correct / n})
        st.firing_history[st.epoch + 1] = {k.split("/", 1)[1]: v for k, v in metrics.items()
                                           if k.startswith("firing_rate/")}
        is_best = metrics["val/top1"] > st.best_top1
        st.best_top1 = max(st.best_top1, metrics["val/top1"])
        st.epoch, st.batch = st.epoch + 1, 0
        self.tracker.log_metrics({**metrics, "epoch": st.epoch}, step=st.epoch)
        self.tracker.log_firing_chart(st.firing_history)
        if is_best:  # every rank: ZeRO-3 gathers the weights; rank 0 writes them
            on_every_rank(lambda: self.ckpt.save_best(self.p.strategy.model_state_dict()), self.env, self.run.path)
        self.save()
        log(self.env, epoch_line(st.epoch, self.cfg.optim.epochs, metrics))

    def finish(self) -> None:
        """Final metrics, artifacts and the summary line a researcher looks for."""
        st = self.state
        final = validate(self.p, st.epoch, self.env.device, self.val_criterion) if st.epoch else {}
        final["best_val_top1"] = st.best_top1
        if self.env.is_main:
            path = self.run.final_metrics
            write_atomically(path, json.dumps(final, indent=2, sort_keys=True))
            self.tracker.log_artifact(path)
            self.tracker.log_latency_chart(final)
            if self.run.best_model.exists():
                self.tracker.log_model(best_model(self.run, self.p.fresh_model), name="best_model")
        self.tracker.flush()
        log(self.env, summary(self.cfg, st, final.get("val/top1", math.nan), self.tracker.run_id))


def already_complete(cfg: Config, run: RunDir, state: TrainState, run_id: str | None) -> str:
    top1 = json.loads(run.final_metrics.read_text()).get("val/top1", math.nan)  # none after 0 epochs
    return (f"run already complete ({state.epoch} epochs; raise optim.epochs to train on)\n"
            + summary(cfg, state, top1, run_id))


def on_every_rank(write: Callable[[], Any], env: distributed.DistEnv, where: Path) -> None:
    """Rank 0 writes, every rank waits for it; a failed write (a full disk) stops every rank,
    where a bare barrier would leave the others waiting for a rank that has left."""
    failed = None
    try:
        write()
    except CheckpointWriteError as e:
        failed = e
    if any_rank(failed is not None, env.device):
        raise failed or CheckpointWriteError(f"rank 0 could not write to {where} (its log says why)")


def best_model(run: RunDir, fresh_model: Callable[[], nn.Module]) -> nn.Module:
    """The run's best weights in a fresh module: the trained one may carry DDP/DeepSpeed hooks
    that do not pickle."""
    clean = fresh_model()
    clean.load_state_dict(torch.load(run.best_model, map_location="cpu", weights_only=True))
    return clean


def resume(ckpt: Checkpointer, state: TrainState, cli_keys: set[str], env: distributed.DistEnv) -> tuple[str | None, str | None]:
    """Restore the newest valid checkpoint if any: (MLflow run to continue, run forked from)."""
    cfg = state.cfg
    if cfg.train.resume != "auto" or ckpt.load(map_location=env.device) is None:
        return None, None
    differ = [k for k in changed_keys(state.saved_config, to_dict(cfg)) if k not in cli_keys]
    if differ:
        raise ConfigError(f"{RunDir.of(cfg).path} was started with a different config ({', '.join(differ)}); name "
                          "these keys on the command line to accept the change, or choose a new run.name")
    log(env, f"resumed from {ckpt.loaded.name}: epoch {state.epoch}, batch {state.batch}, step {state.global_step}")
    saved_name = state.saved_config["run"]["name"]
    if saved_name == cfg.run.name:
        return state.mlflow_run_id, None
    # A run directory copied under a new run.name is a fork: it keeps the weights and the
    # position, but its history goes into a new MLflow run, not the original's.
    log(env, f"run.name {cfg.run.name!r} resumes a checkpoint of run {saved_name!r}: a new MLflow run, "
             f"tagged forked_from={state.mlflow_run_id}")
    return None, state.mlflow_run_id


def requeue(stop: StopFlag, step: int) -> Stopped:
    return Stopped(REQUEUE_EXIT_CODE, "KILLED", f"{stop.received or 'stop'}: checkpoint saved at step {step}; "
                                                f"exiting with {REQUEUE_EXIT_CODE} for requeue")


def agree(loss: torch.Tensor, stop: StopFlag, world_size: int) -> tuple[bool, bool]:
    """(loss finite on every rank, a stop signal reached any rank), in one all-reduce, so no rank
    runs a backward or a save that another skips."""
    flags = torch.stack([torch.isfinite(loss.detach()).double(),
                         torch.tensor(float(stop.received is not None), dtype=torch.float64, device=loss.device)])
    finite, stops = distributed.all_reduce_sum(flags).tolist()
    return finite == world_size, stops > 0


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on some rank (an all-reduce: every rank calls it)."""
    return distributed.all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64, device=device)).item() > 0


def counts(loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[loss sum, correct, n] of a micro-batch, on its device (summed over the epoch, no sync)."""
    correct = (measure.mean_over_time(logits).argmax(1) == y).sum()
    return torch.stack([loss.detach().double() * len(y), correct.double(),
                        torch.tensor(len(y), dtype=torch.float64, device=y.device)])


def validate(p: Parts, epoch: int, device: torch.device, criterion: nn.Module) -> dict[str, float]:
    """Validation metrics of the model, and of its EMA (keys `val_ema/...`) when enabled."""
    metrics = validate_model(p, p.strategy.module, epoch, device, criterion)
    if p.ema is not None:
        ema = validate_model(p, p.ema.module, epoch, device, criterion)
        metrics.update({f"val_ema/{k.split('/', 1)[1]}": v for k, v in ema.items() if k.startswith("val/")})
    return metrics


def validate_model(p: Parts, model: nn.Module, epoch: int, device: torch.device,
                   criterion: nn.Module) -> dict[str, float]:
    """Val loss, top-1/top-5 (also after each step t: `val/top1_t<t>`) and per-layer firing,
    summed over ranks before dividing."""
    output = model.output
    model.set_output("per_step")
    try:
        with p.strategy.forward(model) as forward:
            return measure.clean_metrics(model, p.val_loader.iterate(epoch), device=device, forward=forward,
                                         criterion=criterion)
    finally:
        model.set_output(output)


def summary(cfg: Config, state: TrainState, top1: float, run_id: str | None) -> str:
    """The lines a researcher looks for at the end of a job log."""
    from train.tracking import resolve_uri
    uri = resolve_uri(cfg.tracking, Path(cfg.run.root))
    return (f"final validation top-1: {top1:.4f} (best {state.best_top1:.4f}) after {state.epoch} epochs\n"
            f"run directory: {RunDir.of(cfg).path}\n"
            f"MLflow run: {run_id} in experiment '{cfg.tracking.experiment}' at {uri} (browse with `make mlflow-ui`)")


def epoch_line(epoch: int, epochs: int, m: dict[str, float]) -> str:
    return (f"epoch {epoch}/{epochs}  train loss {m.get('train/loss', 0):.4f} top1 {m.get('train/top1', 0):.4f} | "
            f"val loss {m['val/loss']:.4f} top1 {m['val/top1']:.4f} top5 {m['val/top5']:.4f} | "
            f"firing rate {m['firing_rate_mean']:.4f}")


class Progress:
    """Rank 0's console within an epoch, for job logs that otherwise stay silent between epoch
    lines: a tqdm bar on a terminal; else one line per `tracking.log_every_steps` steps with
    epoch, step, loss, lr, images/s and the time left in the epoch (no carriage returns)."""

    def __init__(self, env: distributed.DistEnv, epoch: int, epochs: int, steps: int, done: int):
        self.enabled = env.is_main
        self.epoch, self.epochs, self.steps, self.done = epoch + 1, epochs, steps, done
        self.started, self.start_step = time.perf_counter(), done
        self.bar = None
        if self.enabled and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=steps, initial=done, desc=f"epoch {self.epoch}/{epochs}", leave=False,
                            dynamic_ncols=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def report(self, loss: float, lr: float, images_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{images_per_s:.0f}")
            return
        rate = (self.done - self.start_step) / max(time.perf_counter() - self.started, 1e-9)
        left = (self.steps - self.done) / rate if rate > 0 else 0.0
        print(f"epoch {self.epoch}/{self.epochs} step {self.done}/{self.steps}  loss {loss:.4f}  lr {lr:.4g}  "
              f"{images_per_s:.0f} img/s  epoch ends in {time.strftime('%H:%M:%S', time.gmtime(left))}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def log(env: distributed.DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg, flush=True)
