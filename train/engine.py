"""`python -m train`: build everything from the config, then one plain loop.

The step reads top to bottom — forward, loss, backward, step, log — and the strategy
(single/DDP/DeepSpeed) hides how. Checkpoints are the unit of reliability: one is written every
`train.checkpoint_every_steps`, at each epoch end and when SIGTERM/SIGUSR2 arrives (then the run
exits with `REQUEUE_EXIT_CODE` so a launcher requeues it); a rerun of the same run directory
resumes from the newest one, in the same MLflow run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn import functional as F

import models  # noqa: F401  (registers the spiking networks with timm)
from data_pipelines.common import available_cores
from data_pipelines.loaders import DataError, create_loader
from models.firing import capture_spike_totals, mean_firing_rate
from models.tdbn import convert_sync_tdbn
from train import distributed, measure
from train.checkpoints import Checkpointer, rng_state, set_rng_state, write_atomically
from train.config import Config, ConfigError, changed_keys, config_hash, flat_items, load_config, to_dict, to_yaml
from train.strategies import build_strategy, cpu_precision_warning
from train.tracking import Tracker, environment_params, resolve_uri

REQUEUE_EXIT_CODE = 3   # "stopped on purpose after saving: requeue me"
USER_ERROR_EXIT_CODE = 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m train --config FILE [key=value ...]`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, action="append",
                        help="YAML experiment file (configs/*.yaml); repeat to add blocks, later ones win")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.05")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        return run(cfg, cli_keys={o.partition("=")[0] for o in args.overrides})
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


def run(cfg: Config, cli_keys: set[str] = frozenset()) -> int:
    stop = StopSignal()  # first, so a signal during start-up is not fatal either
    env = distributed.setup(cfg.train.strategy, cfg.train.device)
    try:
        code = Trainer(cfg, env, cli_keys).fit(stop)
        if code == 0 and cfg.eval.after_train:
            from train.evaluate import evaluate_run, is_evaluated
            run_dir = Path(cfg.run.root) / cfg.run.name
            if is_evaluated(cfg, run_dir):
                log(env, f"eval.after_train: {run_dir / 'eval.json'} is up to date")
            else:
                evaluate_run(cfg, env, run_dir)
        return code
    finally:
        stop.ignore()  # training is over: a late USR2/TERM must not kill the shutdown
        distributed.teardown()


class StopSignal:
    """SIGTERM/SIGUSR2 only set a flag: the loop saves at the next step boundary, then exits."""

    def __init__(self):
        self.received: str | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR2):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def ignore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR2):
                signal.signal(sig, signal.SIG_IGN)


def model_kwargs(cfg: Config, meta: dict[str, Any]) -> dict[str, Any]:
    """The factory arguments of `cfg.model.name` (`timm.create_model(name, **these)`)."""
    return dict(T=cfg.model.T, neuron=cfg.model.neuron, num_classes=cfg.model.num_classes or meta["num_classes"],
                in_chans=cfg.model.in_chans or meta["in_chans"], **cfg.model.args)


def build_model(cfg: Config, meta: dict[str, Any]) -> nn.Module:
    name = cfg.model.name
    if name not in models.model_names():
        known = ", ".join(models.model_names())
        raise ConfigError(f"config key 'model.name': unknown model {name!r}; registered: {known}")
    try:
        model = timm.create_model(name, **model_kwargs(cfg, meta))
    except (TypeError, ValueError) as e:  # the factories name the argument in one line
        raise ConfigError(f"config key 'model.args': {str(e).splitlines()[0]}") from None
    model.set_checkpointing(cfg.train.checkpointing, cfg.train.time_chunk)
    model.set_output(cfg.model.output)
    return model


def build_mixup(cfg: Config, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix for image batches `[B, C, H, W]` (not event frames)."""
    o = cfg.optim
    if o.mixup_alpha <= 0 and o.cutmix_alpha <= 0:
        return None
    if cfg.data.dataset == "dvs":
        raise ConfigError("config keys 'optim.mixup_alpha'/'optim.cutmix_alpha': mixup applies to image "
                          "data sets, not dvs; set them to 0")
    if cfg.data.batch_size % 2:
        raise ConfigError(f"config key 'data.batch_size': mixup needs an even batch size, got {cfg.data.batch_size}")
    return Mixup(mixup_alpha=o.mixup_alpha, cutmix_alpha=o.cutmix_alpha,
                 label_smoothing=o.label_smoothing, num_classes=num_classes)


def tet_loss(logits: torch.Tensor, target: torch.Tensor, criterion: nn.Module, lam: float, phi: float) -> torch.Tensor:
    """Temporal Efficient Training (Deng et al., ICLR 2022): the loss of every step's output,
    averaged over T, plus lam * MSE between the outputs and phi (their reference code's
    `(1 - lamb) * L_TET + lamb * L_MSE`). logits `[T, B, classes]`; target labels or soft targets."""
    per_step = torch.stack([criterion(step, target) for step in logits]).mean()
    return (1 - lam) * per_step + lam * F.mse_loss(logits, torch.full_like(logits, phi))


def build_loss(cfg: Config, mixup: Mixup | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss on the model's output: cross-entropy of the mean logits (mixup makes
    soft targets, label smoothing included), or TET on per-step logits."""
    criterion = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    if cfg.optim.loss == "tet":
        return partial(tet_loss, criterion=criterion, lam=cfg.optim.tet_lambda, phi=cfg.optim.tet_phi)
    return lambda logits, target: criterion(measure.mean_over_time(logits), target)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # 1-d tensors are tdBN scales/shifts, biases, thresholds and decays.
            (no_decay if o.no_decay_norm_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.betas_1, o.betas_2))


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    """Linear warmup to `optim.lr`, then cosine to `optim.min_lr`, stepped per optimizer step."""
    o = cfg.optim
    total = max(1, o.epochs * steps_per_epoch)
    warmup = int(o.warmup_epochs * steps_per_epoch)
    floor = o.min_lr / o.lr if o.lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    def __init__(self, cfg: Config, env: distributed.DistEnv, cli_keys: set[str]):
        self.cfg, self.env, self.cli_keys = cfg, env, cli_keys
        self.run_dir = Path(cfg.run.root) / cfg.run.name
        warning = cpu_precision_warning(cfg.train.precision, env.device)
        if warning:
            log(env, warning)
        if env.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # This rank's share of the cores for the model's arithmetic, whatever data.num_workers
            # is (the bits of a CPU run depend on the thread count, not on the decode threads).
            torch.set_num_threads(available_cores())
        torch.manual_seed(cfg.run.seed)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        loader_args = dict(rank=env.rank, world_size=env.world_size, seed=cfg.run.seed, device=env.device)
        self.train_loader = create_loader(cfg.data, "train", **loader_args)
        self.val_loader = create_loader(cfg.data, "val", **loader_args)
        steps = self.train_loader.meta.get("T")
        if steps and steps != cfg.model.T:  # sequences run their own T: the logged T must be it
            raise ConfigError(f"config key 'model.T': {cfg.model.T}, but {cfg.data.path} holds sequences of "
                              f"{steps} steps; set model.T={steps} (or rebuild the data with {cfg.model.T} steps)")
        # On CUDA the loaders deliver channels-last images; conv weights in the same layout spare
        # cuDNN a weight conversion per convolution and step.
        layout = torch.channels_last if env.device.type == "cuda" else torch.preserve_format
        self.model = build_model(cfg, self.train_loader.meta).to(env.device, memory_format=layout)
        self.steps_per_epoch = self.train_loader.batches_per_epoch // cfg.optim.accumulate
        if self.steps_per_epoch == 0:
            raise ConfigError(f"config key 'data.batch_size': {cfg.data.batch_size} x {env.world_size} ranks "
                              f"x accumulate {cfg.optim.accumulate} exceeds the training set "
                              f"({self.train_loader.samples_per_epoch} samples)")
        if cfg.train.sync_bn and env.world_size > 1:
            converted = convert_sync_tdbn(self.model)
            log(env, f"train.sync_bn: {converted} tdBN layers take their statistics over all {env.world_size} ranks")
        optimizer = build_optimizer(cfg, self.model)
        scheduler = build_scheduler(cfg, optimizer, self.steps_per_epoch)
        self.strategy = build_strategy(cfg, env, self.model, optimizer, scheduler)
        self.ckpt = Checkpointer(self.run_dir, cfg.train.keep_checkpoints)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)  # scores validation
        self.mixup = build_mixup(cfg, self.model.num_classes)
        self.train_criterion = build_loss(cfg, self.mixup)
        self.ema = ModelEmaV3(self.model, decay=cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        if cfg.train.compile:
            # In place, after the EMA's copy (which stays eager): the strategy's wrappers call
            # the compiled forward, and parameter names (hence checkpoints) are unchanged. With
            # activation checkpointing the model compiles each block alone (SpikingResNet.compile).
            self.model.compile()
            region = "the model" if cfg.train.checkpointing == "none" else "each block"
            log(env, f"train.compile: torch.compile (Inductor) compiles {region} in its first training step "
                     "and again in its first evaluation; those two take longer")
        # What a checkpoint carries besides model/optimizer/scheduler/scaler.
        self.epoch, self.batch, self.global_step = 0, 0, 0
        self.best_top1, self.nonfinite_total = -1.0, 0
        self.firing_history: dict[int, dict[str, float]] = {}
        self.forked_from: str | None = None  # MLflow run of the run directory this one was copied from

    # ----------------------------------------------------------------------------- state
    def client_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "global_step": self.global_step,
                "rng": distributed.all_gather_object(rng_state()),
                "loader_seed": self.cfg.run.seed, "mlflow_run_id": self.tracker.run_id,
                "config": to_dict(self.cfg), "config_hash": config_hash(self.cfg),
                "best_top1": self.best_top1, "nonfinite_total": self.nonfinite_total,
                "firing_history": self.firing_history,
                **({"ema": self.ema.module.state_dict()} if self.ema is not None else {})}

    def save(self) -> None:
        # Metrics first: a run killed after this checkpoint resumes past the steps logged so far,
        # so they must be in the store. While the store is failing, flush returns at once and the
        # unsent records stay in memory until exit (a kill then loses them: noted in #16).
        self.tracker.flush()
        self.strategy.save(self.ckpt, self.global_step, self.client_state())
        distributed.barrier()

    def resume(self) -> str | None:
        """Load the newest valid checkpoint if any; returns its MLflow run id."""
        state = self.strategy.load(self.ckpt) if self.cfg.train.resume == "auto" else None
        if state is None:
            return None
        differ = [k for k in changed_keys(state["config"], to_dict(self.cfg)) if k not in self.cli_keys]
        if differ:
            raise ConfigError(
                f"{self.run_dir} was started with a different config ({', '.join(differ)}); name these keys "
                "on the command line to accept the change, or choose a new run.name")
        self.epoch, self.batch, self.global_step = state["epoch"], state["batch"], state["global_step"]
        self.best_top1, self.nonfinite_total = state["best_top1"], state["nonfinite_total"]
        self.firing_history = {int(k): v for k, v in state["firing_history"].items()}
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])
        rngs = state["rng"]
        set_rng_state(rngs[self.env.rank] if self.env.rank < len(rngs) else rngs[0])
        log(self.env, f"resumed from {self.ckpt.loaded.name}: epoch {self.epoch}, batch {self.batch}, "
                      f"step {self.global_step}")
        if state["config"]["run"]["name"] != self.cfg.run.name:
            # A run directory copied under a new run.name is a fork: it keeps the weights and
            # position, but its history goes into a new MLflow run, not the original's.
            self.forked_from = state["mlflow_run_id"]
            log(self.env, f"run.name {self.cfg.run.name!r} resumes a checkpoint of run {state['config']['run']['name']!r}: "
                          f"a new MLflow run, tagged forked_from={self.forked_from}")
            return None
        return state["mlflow_run_id"]

    # ----------------------------------------------------------------------------- loop
    def fit(self, stop: StopSignal) -> int:
        cfg, env = self.cfg, self.env
        run_id = self.resume()
        final = self.run_dir / "final_metrics.json"
        if self.epoch >= cfg.optim.epochs and final.exists():
            top1 = json.loads(final.read_text()).get("val/top1", float("nan"))
            log(env, f"run already complete ({self.epoch} epochs; raise optim.epochs to train on)")
            self.summary(top1, run_id)
            return 0
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.run_dir / "config.yaml", to_yaml(cfg))
        n = cfg.model.neuron
        tags = {"model": cfg.model.name, "dataset": cfg.data.dataset, "T": str(cfg.model.T),
                "neuron": f"{'lif' if n.leak else 'if'}-reset_{_value(n.reset)}-rec_{_value(n.recurrence)}",
                "strategy": cfg.train.strategy, "precision": cfg.train.precision, **cfg.tracking.tags,
                **({"forked_from": self.forked_from} if self.forked_from else {})}
        self.tracker = Tracker.start(cfg.tracking, runs_root=Path(cfg.run.root), run_dir=self.run_dir,
                                     run_name=cfg.run.name, run_id=run_id, enabled=env.is_main, tags=tags)
        if run_id is None:
            self.tracker.log_params({**flat_items(to_dict(cfg)), **environment_params(env.world_size, str(env.device))})
            self.tracker.log_artifact(self.run_dir / "config.yaml")
            data = Path(cfg.data.path).resolve()
            digest = hashlib.sha256((data / "meta.json").read_bytes()).hexdigest()[:16]
            self.tracker.log_dataset(f"{cfg.data.dataset}:{data.name}", digest, str(data))
        try:
            for epoch in range(self.epoch, cfg.optim.epochs):
                self.epoch = epoch
                if self.train_epoch(stop) == "stopped":
                    log(env, f"{stop.received or 'stop'}: checkpoint saved at step {self.global_step}; exiting "
                             f"with {REQUEUE_EXIT_CODE} for requeue")
                    self.tracker.close(status="KILLED")
                    return REQUEUE_EXIT_CODE
                if self.nonfinite_run >= cfg.train.max_nonfinite_steps:
                    log(env, f"{self.nonfinite_run} non-finite losses in a row: stopping; the last good "
                             f"checkpoint is kept in {self.ckpt.dir}")
                    self.tracker.close(status="FAILED")
                    return 1
                self.end_epoch(epoch)
            self.finish()
        except BaseException:
            self.tracker.close(status="FAILED")
            raise
        self.tracker.close()
        return 0

    def train_epoch(self, stop: StopSignal) -> str:
        cfg, s = self.cfg, self.strategy
        accumulate = cfg.optim.accumulate
        last_batch = self.steps_per_epoch * accumulate  # leftover micro-batches would break alignment
        self.model.train()
        totals = torch.zeros(3, dtype=torch.float64, device=self.env.device)  # loss sum, correct, n
        self.nonfinite_run, tick, seen = 0, time.perf_counter(), 0
        progress = Progress(self.env, self.epoch, cfg.optim.epochs, self.steps_per_epoch, self.batch // accumulate)
        for i, (x, y) in enumerate(self.train_loader.iterate(self.epoch, self.batch), start=self.batch):
            if i >= last_batch:
                break
            boundary = (i + 1) % accumulate == 0
            target = y
            if self.mixup:
                x, target = self.mixup(x, y)
            regularise = cfg.optim.firing_reg > 0
            with s.forward_context(boundary), capture_spike_totals(self.model) if regularise else nullcontext() as spikes:
                logits = s.model(s.prepare_input(x))
                loss = self.train_criterion(logits.float(), target)
                if regularise:  # a sparsity penalty, through the surrogate gradient
                    penalty = cfg.optim.firing_reg * (mean_firing_rate(spikes) - cfg.optim.firing_target) ** 2
                    loss = loss + penalty
            finite, stopping = self.agree(loss, stop)
            if not finite:
                self.nonfinite_run += 1
                self.nonfinite_total += 1
                s.zero_grad()
                if self.nonfinite_run >= cfg.train.max_nonfinite_steps:
                    return "failed"
                continue
            self.nonfinite_run = 0
            s.backward(loss)
            totals += torch.stack([loss.detach().double() * len(y),
                                   (measure.mean_over_time(logits).argmax(1) == y).sum().double(), torch.tensor(len(y), dtype=torch.float64,
                                                                                        device=y.device)])
            seen += len(y)
            self.batch = i + 1
            if not boundary:
                continue
            stats = s.step()
            self.global_step += 1
            if self.ema is not None:
                self.ema.update(s.module, step=self.global_step)
            progress.advance()
            if self.global_step % max(1, cfg.tracking.log_every_steps) == 0:
                elapsed = time.perf_counter() - tick
                step_loss = float(distributed.all_reduce_sum(loss.detach().double().reshape(1)) / self.env.world_size)
                lr, images_per_s = s.scheduler.get_last_lr()[0], seen * self.env.world_size / elapsed
                if regularise:
                    stats["train/firing_reg_loss"] = float(penalty)
                self.tracker.log_metrics({"train/step_loss": step_loss, "train/lr": lr,
                                          "train/images_per_s": images_per_s,
                                          "train/nonfinite_steps": self.nonfinite_total, **stats}, self.global_step)
                progress.report(step_loss, lr, images_per_s)
                tick, seen = time.perf_counter(), 0
            every = cfg.train.checkpoint_every_steps
            if stopping or (every and self.global_step % every == 0):
                self.save()
            if stopping:
                progress.close()
                return "stopped"
        progress.close()
        distributed.all_reduce_sum(totals)
        self.train_totals = totals
        return "done"

    def agree(self, loss: torch.Tensor, stop: StopSignal) -> tuple[bool, bool]:
        """(loss finite on every rank, a stop signal reached any rank), in one all-reduce, so
        no rank runs a backward or a save that another skips."""
        flags = torch.stack([torch.isfinite(loss.detach()).double(),
                             torch.tensor(float(stop.received is not None), dtype=torch.float64,
                                          device=loss.device)])
        finite, stops = distributed.all_reduce_sum(flags).tolist()
        return finite == self.env.world_size, stops > 0

    def end_epoch(self, epoch: int) -> None:
        metrics = self.evaluate()
        loss_sum, correct, n = self.train_totals.tolist()
        if n:
            metrics.update({"train/loss": loss_sum / n, "train/top1": correct / n})
        self.firing_history[epoch + 1] = {k.split("/", 1)[1]: v for k, v in metrics.items()
                                          if k.startswith("firing_rate/")}
        is_best = metrics["val/top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, metrics["val/top1"])
        self.epoch, self.batch = epoch + 1, 0
        self.tracker.log_metrics({**metrics, "epoch": epoch + 1}, step=epoch + 1)
        self.tracker.log_firing_chart(self.firing_history)
        if is_best:
            weights = self.strategy.model_state_dict()
            if self.env.is_main:
                self.ckpt.save_best(weights)
        self.save()
        log(self.env, f"epoch {epoch + 1}/{self.cfg.optim.epochs}  train loss {metrics.get('train/loss', 0):.4f} "
                      f"top1 {metrics.get('train/top1', 0):.4f} | val loss {metrics['val/loss']:.4f} "
                      f"top1 {metrics['val/top1']:.4f} top5 {metrics['val/top5']:.4f} | "
                      f"firing rate {metrics['firing_rate_mean']:.4f}")

    def evaluate(self) -> dict[str, float]:
        """Validation metrics of the model, and of its EMA (keys `val_ema/...`) when enabled."""
        metrics = self.evaluate_model(self.strategy.module)
        if self.ema is not None:
            ema = self.evaluate_model(self.ema.module)
            metrics.update({f"val_ema/{k.split('/', 1)[1]}": v for k, v in ema.items() if k.startswith("val/")})
        return metrics

    def evaluate_model(self, model: nn.Module) -> dict[str, float]:
        """Val loss, top-1/top-5 and per-layer firing, summed over ranks before dividing."""
        s = self.strategy

        def forward(x: torch.Tensor) -> torch.Tensor:
            with s.forward_context(True):
                return model(s.prepare_input(x))

        # Per-step logits also give the top-1 had inference stopped after t steps (val/top1_t<t>).
        output = model.output
        model.set_output("per_step")
        try:
            return measure.clean_metrics(model, self.val_loader.iterate(self.epoch), device=self.env.device,
                                         forward=forward, criterion=self.criterion)
        finally:
            model.set_output(output)

    def finish(self) -> None:
        """Final metrics, artifacts and the summary line a researcher looks for."""
        final = self.evaluate() if self.epoch else {}
        final["best_val_top1"] = self.best_top1
        if self.env.is_main:
            path = self.run_dir / "final_metrics.json"
            write_atomically(path, json.dumps(final, indent=2, sort_keys=True))
            self.tracker.log_artifact(path)
            self.tracker.log_latency_chart(final)
            best = self.run_dir / "best_model.pt"
            if best.exists():
                # A fresh module: the trained one may carry DDP/DeepSpeed hooks that do not pickle.
                clean = build_model(self.cfg, self.train_loader.meta)
                clean.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
                self.tracker.log_model(clean, name="best_model")
        self.tracker.flush()
        self.summary(final.get("val/top1", float("nan")), self.tracker.run_id)

    def summary(self, top1: float, run_id: str | None) -> None:
        uri = resolve_uri(self.cfg.tracking, Path(self.cfg.run.root))
        log(self.env, f"final validation top-1: {top1:.4f} (best {self.best_top1:.4f}) after {self.epoch} epochs")
        log(self.env, f"run directory: {self.run_dir}")
        log(self.env, f"MLflow run: {run_id} in experiment '{self.cfg.tracking.experiment}' at {uri} "
                      "(browse with `make mlflow-ui`)")


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


def _value(x) -> str:
    return getattr(x, "value", x)


def log(env: distributed.DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg, flush=True)
