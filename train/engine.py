"""`python -m train`: build every part of a run from the config, then hand them to the loop.

`main` parses and checks the config (`train.config`), `run` sets up the process group and the
stop signals, `build` makes the parts (loaders, model, optimizer, schedule, strategy, losses,
mixup, EMA, the MLflow tracker) with the small factories below, and `train.loop.Trainer` trains.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn import functional as F

from data_pipelines.common import available_cores
from data_pipelines.loaders import DataError, create_loader
from models.tdbn import convert_sync_tdbn
from train import distributed, measure
from train.build import build_model
from train.checkpoints import CheckpointError, CheckpointWriteError, write_atomically
from train.config import Config, ConfigError, flat_items, load_config, to_dict, to_yaml
from train.evaluate import evaluate_run, is_evaluated
from train.loop import REQUEUE_EXIT_CODE, Parts, Trainer, log  # noqa: F401  (REQUEUE_EXIT_CODE: `train` exports it)
from train.run_dir import RunDir
from train.strategies import build_strategy, cpu_precision_warning
from train.tracking import Tracker, environment_params

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
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return run_reporting_errors(cfg, cli_keys={o.partition("=")[0] for o in args.overrides})


def run_reporting_errors(cfg: Config, cli_keys: set[str] = frozenset()) -> int:
    """`run`, with an error the user can act on as one line on stderr and its exit code (2 for the
    config, the data, another model's or release's checkpoint; 1 for a full disk) instead of a traceback."""
    try:
        return run(cfg, cli_keys)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except CheckpointWriteError as e:  # disk full: not the config's fault, and nothing is lost
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(cfg: Config, cli_keys: set[str] = frozenset()) -> int:
    stop = StopSignal()  # first, so a signal during start-up is not fatal either
    env = distributed.setup(cfg.train.strategy, cfg.train.device, cfg.train.hang_timeout_s)
    try:
        code = Trainer(cfg, env, build(cfg, env), cli_keys).fit(stop)
        if code == 0 and cfg.eval.after_train:
            run_dir = RunDir.of(cfg)
            if is_evaluated(cfg, run_dir.path):
                log(env, f"eval.after_train: {run_dir.eval_results} is up to date")
            else:
                evaluate_run(cfg, env, run_dir.path)
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


def build_mixup(cfg: Config, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix for image batches `[B, C, H, W]` (load_config keeps it off event data)."""
    o = cfg.optim
    if o.mixup_alpha <= 0 and o.cutmix_alpha <= 0:
        return None
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


def build(cfg: Config, env: distributed.DistEnv) -> Parts:
    """Every part of the run, from the config (loaders first: the model takes the data's shape)."""
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
    train_loader = create_loader(cfg.data, "train", **loader_args)
    val_loader = create_loader(cfg.data, "val", **loader_args)
    check_data_fits(cfg, env, train_loader)
    # On CUDA the loaders deliver channels-last images; conv weights in the same layout spare
    # cuDNN a weight conversion per convolution and step.
    layout = torch.channels_last if env.device.type == "cuda" else torch.preserve_format
    model = build_model(cfg, train_loader.meta).to(env.device, memory_format=layout)
    if cfg.train.sync_bn and env.world_size > 1:
        converted = convert_sync_tdbn(model)
        log(env, f"train.sync_bn: {converted} tdBN layers take their statistics over all {env.world_size} ranks")
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, train_loader.batches_per_epoch // cfg.optim.accumulate)
    strategy = build_strategy(cfg, env, model, optimizer, scheduler)
    mixup = build_mixup(cfg, model.num_classes)
    ema = ModelEmaV3(model, decay=cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    if cfg.train.compile:
        # In place, after the EMA's copy (which stays eager): the strategy's wrappers call
        # the compiled forward, and parameter names (hence checkpoints) are unchanged. With
        # activation checkpointing the model compiles each block alone (SpikingResNet.compile).
        model.compile()
        region = "the model" if cfg.train.checkpointing == "none" else "each block"
        log(env, f"train.compile: torch.compile (Inductor) compiles {region} in its first training step "
                 "and again in its first evaluation; those two take longer")
    return Parts(model=model, strategy=strategy, train_loader=train_loader, val_loader=val_loader,
                 train_loss=build_loss(cfg, mixup), mixup=mixup, ema=ema,
                 open_tracker=partial(open_tracker, cfg, env), fresh_model=partial(build_model, cfg, train_loader.meta))


def check_data_fits(cfg: Config, env: distributed.DistEnv, loader) -> None:
    """One optimizer step's batches fit in this rank's share of the training set (load_config
    checked the whole set; the share needs the world size)."""
    if loader.batches_per_epoch // cfg.optim.accumulate == 0:
        raise ConfigError(f"config key 'data.batch_size': {cfg.data.batch_size} x {env.world_size} ranks "
                          f"x accumulate {cfg.optim.accumulate} exceeds the training set "
                          f"({loader.samples_per_epoch} samples)")


def open_tracker(cfg: Config, env: distributed.DistEnv, run_id: str | None, forked_from: str | None) -> Tracker:
    """Rank 0's MLflow run: continued when `run_id` is given, else started with the resolved
    config (also written to the run directory), the environment and the data set as inputs."""
    run_dir = RunDir.of(cfg)
    if env.is_main:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        write_atomically(run_dir.config, to_yaml(cfg))
    n = cfg.model.neuron
    tags = {"model": cfg.model.name, "dataset": cfg.data.dataset, "T": str(cfg.model.T),
            "neuron": f"leak_{_value(n.leak)}-reset_{_value(n.reset)}-rec_{_value(n.recurrence)}",
            "strategy": cfg.train.strategy, "precision": cfg.train.precision, **cfg.tracking.tags,
            **({"forked_from": forked_from} if forked_from else {})}
    tracker = Tracker.start(cfg.tracking, runs_root=Path(cfg.run.root), run_dir=run_dir.path, run_name=cfg.run.name,
                            run_id=run_id, enabled=env.is_main, tags=tags)
    if run_id is None:
        tracker.log_params({**flat_items(to_dict(cfg)), **environment_params(env.world_size, str(env.device))})
        tracker.log_artifact(run_dir.config)
        data = Path(cfg.data.path).resolve()
        digest = hashlib.sha256((data / "meta.json").read_bytes()).hexdigest()[:16]
        tracker.log_dataset(f"{cfg.data.dataset}:{data.name}", digest, str(data))
    return tracker


def _value(x) -> str:
    return getattr(x, "value", x)
