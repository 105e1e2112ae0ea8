"""`python -m train.evaluate RUN_DIR [key=value ...]`: measure a finished run for the
functional-roles study (Yin et al. 2024), also under torchrun or srun (each rank takes a shard).

Loads the run's best or last weights (`eval.checkpoint`) and measures, in eval mode:
clean validation top-1/top-5/loss with firing rates, sparsity, SOPs and energy per image; the
training split without augmentation (generalisation gap); top-1 under Gaussian input noise, FGSM
and PGD (white box, through the surrogate gradient and through time) over the `eval.*` grids,
PGD through another surrogate (transfer), the per-sample worst case over them all at each eps,
and on event/spike input a gradient-guided spike flip that keeps the input valid; top-1 on the
data set's extra validation splits at other frame durations (the paper's resolution shift);
the loss landscape along filter-normalised directions (curve, surface, sharpness) and a t-SNE
of the penultimate features (plots in `RUN_DIR/eval_plots/`); and on temporal data (sequences,
DVS frames) the stream top-1, samples fed back to back without resetting the neurons. Results
go to `RUN_DIR/eval.json` (atomically) and, as `eval/...` metrics at the checkpoint's step, into
the run's own MLflow run. The same checkpoint and config give the same numbers: every random
draw is seeded from (run.seed, measurement, batch, rank).

Overrides change the `eval` section (and, e.g., `data.path` when the data moved). Exit codes:
0 done, 2 a user error (no run there, missing data, bad key), one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_pipelines.loaders import DataError, create_loader
from data_pipelines.meta import Meta
from models.foreign import ForeignModel
from models.neuron_config import Surrogate
from train import distributed, landscape, measure, tsne
from train.build import build_model
from train.checkpoints import CheckpointError, CheckpointSummary, write_atomically
from train.config import Config, ConfigError, EvalConfig, load_config, to_dict
from train.run_dir import RunDir
from train.tracking import Tracker, resolve_uri

USER_ERROR_EXIT_CODE = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (runs/<run.name>) holding config.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval.pgd_steps=20")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(RunDir(args.run_dir).require().config, args.overrides)
        env = distributed.setup("ddp", cfg.train.device)
        try:
            evaluate_run(cfg, env, args.run_dir)
        finally:
            distributed.teardown()
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0


def load_weights(cfg: Config, run_dir: Path) -> tuple[dict[str, torch.Tensor], str, CheckpointSummary | None]:
    """(model state dict, the name of the file it was read from, the newest step checkpoint or
    None): `best_model.pt` or, with `eval.checkpoint=last`, the newest complete step checkpoint.
    The step checkpoint also gives the MLflow run id and step."""
    weights, source, newest = RunDir(run_dir).weights(cfg.eval.checkpoint)
    return weights, source.name, newest


def evaluate_run(cfg: Config, env: distributed.DistEnv, run_dir: Path) -> dict[str, float]:
    """Every measurement of the study on one run; writes eval.json and logs to MLflow (rank 0).

    Returns the `eval/...` metrics. Distributed: call on every rank (process group set up).
    """
    started = time.perf_counter()
    e, device, seed = cfg.eval, env.device, cfg.run.seed
    transfer = transfer_surrogate(cfg)  # a config error: before anything is loaded
    weights, source, newest = load_weights(cfg, run_dir)
    args = dict(rank=env.rank, world_size=env.world_size, seed=seed, device=device)
    val = create_loader(cfg.data, "val", **args)
    train = create_loader(cfg.data, "train", augment=False, **args)
    model = build_model(cfg, val.meta)
    model.load_state_dict(weights)
    model.to(device).eval().requires_grad_(False)  # the attacks need input gradients only
    model.set_output("per_step")  # clean top-1 after each step too; the measures average over T
    space = measure.InputSpace.from_meta(val.meta, device)
    budgets = attack_budgets(e, space)

    def batches(count: int, loader=val):
        return measure.limit(loader.iterate(0), count)

    clean = measure.clean_metrics(model, batches(e.batches), device=device)
    renamed = {"val/loss": "eval/val_loss", "val/top1": "eval/val_top1", "val/top5": "eval/val_top5"}
    metrics = {renamed.get(k, f"eval/{k}"): v for k, v in clean.items()}
    metrics["eval/train_top1"] = measure.top1(model, measure.limit(train.iterate(0), e.train_batches), device=device)
    metrics["eval/generalization_gap"] = metrics["eval/train_top1"] - metrics["eval/val_top1"]
    for sigma in e.noise_sigmas:
        noise = measure.gaussian_noise(space, sigma, seed, env.rank)
        metrics[f"eval/noise_top1_{sigma:g}"] = measure.top1(model, batches(e.batches), noise, device=device)
    attacks = _attacks(model, space, e, budgets, transfer, seed, env.rank)
    metrics.update(_attack_metrics(model, batches(e.attack_batches), attacks, budgets, device))
    for split, shifted in val.meta.eval_splits.items():  # the same checkpoint at other frame durations
        ms = float(shifted["frame_ms"])
        name = f"shift_top1_{ms:g}ms" if ms != val.meta.frame_ms else f"{split}_top1"
        loader = create_loader(cfg.data, split, **args)
        metrics[f"eval/{name}"] = measure.top1(model, batches(e.batches, loader), device=device)
    if any(float(s["frame_ms"]) != val.meta.frame_ms for s in val.meta.eval_splits.values()):
        # the trained duration, beside the others (not for SSC's `test`, a split at the same one)
        metrics[f"eval/shift_top1_{val.meta.frame_ms:g}ms"] = metrics["eval/val_top1"]
    if val.meta.T:  # time-major data: sequences or event frames
        metrics["eval/stream_top1"] = measure.stream_top1(model, batches(e.batches), e.stream_length,
                                                          device=device)
    extra: dict = {}
    plots = run_dir / PLOTS_DIR
    if env.is_main:
        plots.mkdir(exist_ok=True)
        for old in plots.glob("*.png"):  # a plot this evaluation does not draw must not outlive it
            old.unlink()
    if e.landscape_points:
        extra["landscape"] = _landscape(model, cfg, [(x.clone(), y.clone()) for x, y in batches(e.landscape_batches)],
                                        plots if env.is_main else None, device)
        metrics["eval/sharpness"] = extra["landscape"]["sharpness"]
    if e.tsne_samples and env.is_main:  # a picture: rank 0's own samples
        features, labels = tsne.penultimate_features(model, batches(0), e.tsne_samples)
        if len(features) >= 2 and np.ptp(features, axis=0).any():
            tsne.plot(tsne.embedding(features, seed), labels, plots / "tsne.png",
                      f"{cfg.run.name}: t-SNE of the features before the classifier ({len(labels)} samples)")
        else:  # t-SNE of identical points is undefined (scikit-learn fails on them)
            extra["tsne"] = f"not drawn: the {len(labels)} samples' features before the classifier are all equal"
    if env.is_main:
        record = {"metrics": metrics, "weights": source, "step": _step(newest), "eval": to_dict(cfg)["eval"],
                  "threat_model": _threat_model(val.meta, space, transfer), "seconds": time.perf_counter() - started,
                  "plots": sorted(p.name for p in plots.glob("*.png")), **extra}
        write_atomically(RunDir(run_dir).eval_results, json.dumps(record, indent=2, sort_keys=True))
        _log(cfg, env, run_dir, metrics, newest, sorted(plots.glob("*.png")))
        print(f"evaluated {run_dir} ({source}): val top-1 {metrics['eval/val_top1']:.4f}, train top-1 "
              f"{metrics['eval/train_top1']:.4f}, firing rate {metrics['eval/firing_rate_mean']:.4f}"
              + (f", stream top-1 {metrics['eval/stream_top1']:.4f}" if "eval/stream_top1" in metrics else "")
              + f"; wrote {RunDir(run_dir).eval_results}", flush=True)
    distributed.barrier()
    return metrics


def is_evaluated(cfg: Config, run_dir: Path) -> bool:
    """True when eval.json measured the run's newest checkpoint with this `eval` section."""
    try:
        record = json.loads(RunDir(run_dir).eval_results.read_text())
    except (OSError, ValueError):
        return False
    newest = RunDir(run_dir).newest_checkpoint()  # its manifest: no tensor is read
    return record.get("eval") == to_dict(cfg)["eval"] and record.get("step") == _step(newest)


def _step(newest: CheckpointSummary | None) -> int:
    """The step an evaluation is logged at: the newest checkpoint's (0 for a run that has none,
    only best_model.pt)."""
    return newest.step if newest else 0


#: The field's usual image setting (HoSNN, arXiv 2308.10373, among others): eps 8/255, PGD
#: 7 steps of 2/255, i.e. a step of 1.75 x eps / steps in `eval.pgd_step_size`'s units.
IMAGE_ATTACK = (8 / 255, 7, (2 / 255) / (8 / 255 / 7))
#: Plots of an evaluation (loss landscape, t-SNE), under the run directory.
PLOTS_DIR = "eval_plots"


def attack_budgets(e: EvalConfig, space: measure.InputSpace) -> list[tuple[float, int, float]]:
    """(eps, PGD steps, PGD step size in multiples of eps / steps) of every FGSM/PGD/transfer
    attack: the `eval.epsilons` grid, and the image setting with `eval.image_attack`."""
    budgets = [(eps, e.pgd_steps, e.pgd_step_size) for eps in e.epsilons]
    if e.image_attack:
        if space.counts:
            raise ConfigError("config key 'eval.image_attack': eps 8/255 is an image setting and this data set's "
                              "input is event/spike counts; set it false (eval.flip_budgets attacks such input)")
        if any(f"{eps:g}" == f"{IMAGE_ATTACK[0]:g}" for eps in e.epsilons):
            raise ConfigError(f"config key 'eval.epsilons': {IMAGE_ATTACK[0]:g} is eval.image_attack's eps; "
                              "drop it from the grid")
        budgets.append(IMAGE_ATTACK)
    return budgets


def transfer_surrogate(cfg: Config) -> tuple[Surrogate, float]:
    """The surrogate (and width) the transfer attack takes its gradients through: not the one
    the model trained with (`eval.transfer_surrogate`; auto = atan, or sigmoid for an atan model)."""
    e, trained = cfg.eval, cfg.model.neuron
    if e.transfer_surrogate == "auto":
        kind = Surrogate.sigmoid if trained.surrogate is Surrogate.atan else Surrogate.atan
    else:
        kind = Surrogate(e.transfer_surrogate)
    width = e.transfer_surrogate_width or measure.USUAL_WIDTH[kind]
    if kind is trained.surrogate and width == trained.surrogate_width:
        raise ConfigError(f"config key 'eval.transfer_surrogate': {kind.value} of width {width:g} is the surrogate "
                          f"the model trained with; choose another (or another eval.transfer_surrogate_width)")
    return kind, width


def _attacks(model, space: measure.InputSpace, e: EvalConfig, budgets: list[tuple[float, int, float]],
             transfer: tuple[Surrogate, float], seed: int, rank: int) -> dict[str, measure.Perturbation | None]:
    """Metric name -> perturbation, every one run on the same attacked batches: the clean input,
    FGSM, PGD and PGD through the transfer surrogate at each eps; spike flips on count input."""
    attacks: dict[str, measure.Perturbation | None] = {"clean": None}
    for eps, steps, step_size in budgets:
        pgd = measure.pgd(model, space, eps, steps=steps, step_size=step_size, random_start=e.pgd_random_start,
                          seed=seed, rank=rank, best_iterate=e.pgd_best_iterate)
        attacks[f"fgsm_top1_{eps:g}"] = measure.fgsm(model, space, eps)
        attacks[f"pgd_top1_{eps:g}"] = pgd
        if not isinstance(model, ForeignModel):  # a brought network's neurons keep their surrogate
            attacks[f"transfer_top1_{eps:g}"] = measure.through_surrogate(model, pgd, *transfer)
    if space.counts:
        for k in e.flip_budgets:
            attacks[f"flip_top1_{k}"] = measure.spike_flip(model, k, rounds=e.flip_rounds, batch_dim=space.batch_dim)
    return attacks


def _attack_metrics(model, batches, attacks: dict[str, measure.Perturbation | None],
                    budgets: list[tuple[float, int, float]], device) -> dict[str, float]:
    """Top-1 under each attack and, per eps, `worst_top1_<eps>`: a sample counts correct only if
    it is correct clean and under every attack at that eps."""
    correct = measure.correct_under(model, batches, attacks)
    metrics = {f"eval/{name}": measure.fraction(c, device=device) for name, c in correct.items() if name != "clean"}
    for eps, _, _ in budgets:
        at_eps = {k: c for k, c in correct.items() if k == "clean" or k.endswith(f"_top1_{eps:g}")}
        metrics[f"eval/worst_top1_{eps:g}"] = measure.fraction(measure.worst_case(at_eps), device=device)
    return metrics


def _landscape(model, cfg: Config, batches: list, plots: Path | None, device) -> dict:
    """The loss curve and surface along filter-normalised directions seeded from run.seed
    (`train.landscape`), plotted into `plots` when given; the numbers for eval.json."""
    e = cfg.eval
    alphas = landscape.grid(e.landscape_points, e.landscape_radius)
    d1 = landscape.filter_normalised_direction(model, cfg.run.seed, 0)
    curve = landscape.loss_curve(model, batches, d1, alphas, device=device)
    out = {"alpha": alphas.tolist(), "loss": curve.tolist(), "sharpness": landscape.sharpness(curve, alphas)}
    title = f"{cfg.run.name}: loss along a filter-normalised direction (seed {cfg.run.seed})"
    if plots is not None:
        landscape.plot_curve(alphas, curve, plots / "landscape_1d.png", title)
    if e.landscape_surface_points:
        grid = landscape.grid(e.landscape_surface_points, e.landscape_radius)
        d2 = landscape.filter_normalised_direction(model, cfg.run.seed, 1)
        surface = landscape.loss_surface(model, batches, (d1, d2), grid, device=device)
        out["surface"] = {"alpha": grid.tolist(), "loss": surface.tolist()}
        if plots is not None:
            landscape.plot_surface(grid, surface, plots / "landscape_2d.png",
                                   f"{cfg.run.name}: loss over two filter-normalised directions (seed {cfg.run.seed})")
    return out


def _threat_model(meta: Meta, space: measure.InputSpace, transfer: tuple[Surrogate, float]) -> str:
    through = (f"; transfer: PGD with gradients through the {transfer[0].value}({transfer[1]:g}) surrogate, "
               f"same weights; worst: per sample over clean, FGSM, PGD and transfer at each eps")
    if space.counts:
        return ("event/spike counts: additive L-inf perturbation of the counts per (frame, channel, pixel), eps "
                "and sigma in events, counts kept >= 0; flip: at most k entries per sample changed by one "
                "spike, gradient-guided, input kept binary or whole counts >= 0" + through)
    return (f"additive perturbation in pixel scale, eps and sigma as fractions of the range 0.."
            f"{meta.pixel_max:g}, clipped to it, then normalised" + through)


def _log(cfg: Config, env: distributed.DistEnv, run_dir: Path, metrics: dict[str, float],
         newest: CheckpointSummary | None, plots: list[Path]) -> None:
    """Into the run's own MLflow run (its id from the newest checkpoint), at its global step,
    with eval.json and the plots as artifacts."""
    run_id = newest.mlflow_run_id if newest else None
    step = _step(newest)
    tracker = Tracker.start(cfg.tracking, runs_root=run_dir.parent, run_dir=run_dir, run_name=cfg.run.name,
                            run_id=run_id, enabled=env.is_main, tags={})
    tracker.log_metrics(metrics, step)
    tracker.log_artifact(RunDir(run_dir).eval_results)
    for plot in plots:
        tracker.log_artifact(plot, PLOTS_DIR)
    tracker.close()
    uri = resolve_uri(cfg.tracking, run_dir.parent)
    print(f"MLflow run {tracker.run_id} at {uri}: eval/... metrics at step {step}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
