"""`python -m train.evaluate RUN_DIR [key=value ...]`: measure a finished run for the
functional-roles study (Yin et al. 2024), also under torchrun or srun (each rank takes a shard).

Loads the run's best or last weights (`eval.checkpoint`) and measures, in eval mode:
clean validation top-1/top-5/loss with firing rates, sparsity, SOPs and energy per image; the
training split without augmentation (generalisation gap); top-1 under Gaussian input noise, FGSM
and PGD (white box, through the surrogate gradient and through time) over the `eval.*` grids;
and on temporal data (sequences, DVS frames) the stream top-1, samples fed back to back without
resetting the neurons. Results go to `RUN_DIR/eval.json` (atomically) and, as `eval/...`
metrics at the checkpoint's step, into the run's own MLflow run. The same checkpoint and config
give the same numbers: every random draw is seeded from (run.seed, measurement, batch, rank).

Overrides change the `eval` section (and, e.g., `data.path` when the data moved). Exit codes:
0 done, 2 a user error (no run there, missing data, bad key), one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from data_pipelines.loaders import DataError, create_loader
from train import distributed, measure
from train.checkpoints import Checkpointer, write_atomically
from train.config import Config, ConfigError, load_config, to_dict
from train.tracking import Tracker, resolve_uri

EVAL_FILE = "eval.json"
USER_ERROR_EXIT_CODE = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (runs/<run.name>) holding config.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval.pgd_steps=20")
    args = parser.parse_args(argv)
    try:
        config = args.run_dir / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"{args.run_dir} is not a run directory ({config} is missing); "
                              "give the directory `python -m train` wrote, e.g. runs/demo-digits")
        cfg = load_config(config, args.overrides)
        env = distributed.setup("ddp", cfg.train.device)
        try:
            evaluate_run(cfg, env, args.run_dir)
        finally:
            distributed.teardown()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0


def load_weights(cfg: Config, run_dir: Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any] | None]:
    """(model state dict, what it was read from, the newest step checkpoint or None).

    The step checkpoint also gives the MLflow run id and step; `eval.checkpoint=best` reads
    `best_model.pt` (written atomically by the trainer at each new best validation top-1).
    """
    found = Checkpointer(run_dir).load_latest()
    newest = found[0] if found else None
    if cfg.eval.checkpoint == "best":
        best = run_dir / "best_model.pt"
        if not best.is_file():
            raise ConfigError(f"{best} is missing (the run has not finished an epoch?); "
                              "set eval.checkpoint=last to use the newest step checkpoint")
        try:
            return torch.load(best, map_location="cpu", weights_only=True), best.name, newest
        except Exception as e:  # truncated or foreign file: the user's to fix
            raise ConfigError(f"{best} is unreadable ({type(e).__name__}); set eval.checkpoint=last") from None
    if newest is None:
        raise ConfigError(f"no readable checkpoint in {run_dir / 'checkpoints'}; train the run first")
    if "model" not in newest:  # DeepSpeed keeps weights in its own shards; best_model.pt is whole
        raise ConfigError(f"{found[1]} holds DeepSpeed shards, not a whole model; set eval.checkpoint=best")
    return newest["model"], found[1].name, newest


def evaluate_run(cfg: Config, env: distributed.DistEnv, run_dir: Path) -> dict[str, float]:
    """Every measurement of the study on one run; writes eval.json and logs to MLflow (rank 0).

    Returns the `eval/...` metrics. Distributed: call on every rank (process group set up).
    """
    from train.engine import build_model  # the engine imports this module for eval.after_train

    started = time.perf_counter()
    e, device, seed = cfg.eval, env.device, cfg.run.seed
    weights, source, newest = load_weights(cfg, run_dir)
    args = dict(rank=env.rank, world_size=env.world_size, seed=seed, device=device)
    val = create_loader(cfg.data, "val", **args)
    train = create_loader(cfg.data, "train", augment=False, **args)
    model = build_model(cfg, val.meta)
    model.load_state_dict(weights)
    model.to(device).eval().requires_grad_(False)  # the attacks need input gradients only
    model.set_output("per_step")  # clean top-1 after each step too; the measures average over T
    space = measure.InputSpace.from_meta(val.meta, device)

    def batches(count: int):
        return measure.limit(val.iterate(0), count)

    clean = measure.clean_metrics(model, batches(e.batches), device=device)
    renamed = {"val/loss": "eval/val_loss", "val/top1": "eval/val_top1", "val/top5": "eval/val_top5"}
    metrics = {renamed.get(k, f"eval/{k}"): v for k, v in clean.items()}
    metrics["eval/train_top1"] = measure.top1(model, measure.limit(train.iterate(0), e.train_batches), device=device)
    metrics["eval/generalization_gap"] = metrics["eval/train_top1"] - metrics["eval/val_top1"]
    for sigma in e.noise_sigmas:
        noise = measure.gaussian_noise(space, sigma, seed, env.rank)
        metrics[f"eval/noise_top1_{sigma:g}"] = measure.top1(model, batches(e.batches), noise, device=device)
    for eps in e.epsilons:
        fgsm = measure.fgsm(model, space, eps)
        metrics[f"eval/fgsm_top1_{eps:g}"] = measure.top1(model, batches(e.attack_batches), fgsm, device=device)
        pgd = measure.pgd(model, space, eps, steps=e.pgd_steps, step_size=e.pgd_step_size,
                          random_start=e.pgd_random_start, seed=seed, rank=env.rank,
                          best_iterate=e.pgd_best_iterate)
        metrics[f"eval/pgd_top1_{eps:g}"] = measure.top1(model, batches(e.attack_batches), pgd, device=device)
    if val.meta.get("T"):  # time-major data: sequences or event frames
        metrics["eval/stream_top1"] = measure.stream_top1(model, batches(e.batches), e.stream_length,
                                                          device=device)
    if env.is_main:
        record = {"metrics": metrics, "weights": source, "step": _step(newest), "eval": to_dict(cfg)["eval"],
                  "threat_model": _threat_model(val.meta), "seconds": time.perf_counter() - started}
        write_atomically(run_dir / EVAL_FILE, json.dumps(record, indent=2, sort_keys=True))
        _log(cfg, env, run_dir, metrics, newest)
        print(f"evaluated {run_dir} ({source}): val top-1 {metrics['eval/val_top1']:.4f}, train top-1 "
              f"{metrics['eval/train_top1']:.4f}, firing rate {metrics['eval/firing_rate_mean']:.4f}"
              + (f", stream top-1 {metrics['eval/stream_top1']:.4f}" if "eval/stream_top1" in metrics else "")
              + f"; wrote {run_dir / EVAL_FILE}", flush=True)
    distributed.barrier()
    return metrics


def is_evaluated(cfg: Config, run_dir: Path) -> bool:
    """True when eval.json measured the run's newest checkpoint with this `eval` section."""
    try:
        record = json.loads((run_dir / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return False
    found = Checkpointer(run_dir).load_latest()
    return record.get("eval") == to_dict(cfg)["eval"] and record.get("step") == _step(found[0] if found else None)


def _step(newest: dict[str, Any] | None) -> int:
    return int(newest.get("global_step", 0)) if newest else 0


def _threat_model(meta: dict) -> str:
    if meta["dataset"] == "dvs":
        return ("DVS frames: additive L-inf perturbation of the binned event counts per (frame, "
                "polarity, pixel), eps and sigma in events, counts kept >= 0")
    return (f"additive perturbation in pixel scale, eps and sigma as fractions of the range 0.."
            f"{meta.get('pixel_max', 255)}, clipped to it, then normalised")


def _log(cfg: Config, env: distributed.DistEnv, run_dir: Path, metrics: dict[str, float],
         newest: dict[str, Any] | None) -> None:
    """Into the run's own MLflow run (its id from the newest checkpoint), at its global step."""
    run_id = newest.get("mlflow_run_id") if newest else None
    step = _step(newest)
    tracker = Tracker.start(cfg.tracking, runs_root=run_dir.parent, run_dir=run_dir, run_name=cfg.run.name,
                            run_id=run_id, enabled=env.is_main, tags={})
    tracker.log_metrics(metrics, step)
    tracker.log_artifact(run_dir / EVAL_FILE)
    tracker.close()
    uri = resolve_uri(cfg.tracking, run_dir.parent)
    print(f"MLflow run {tracker.run_id} at {uri}: eval/... metrics at step {step}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
