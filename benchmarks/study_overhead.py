"""Seconds per study variant against a plain PyTorch loop doing the same work (issue 25, item 6).

    python -m benchmarks.study_overhead --config configs/study_digits.yaml data.path=data/digits
    python -m benchmarks.study_overhead --config configs/study_seqdigits.yaml data.path=data/seqdigits

The study side: `python -m study run`'s code (`study.run.main`, in this process) trains and
evaluates two single-run variants one after the other in a fresh run root; the second one, whose
process already holds the imports, compiled code and data pages, is the study's seconds per
variant (the first is reported too). The plain side trains the same model (`train.build`), with
the same optimizer and schedule (`train.engine`), for the same number of steps on the training
batches held in memory as tensors (read once, untimed), then evaluates clean top-1 and the same
noise, FGSM, PGD and transfer attacks (`train.measure`'s, the config's `eval.*`) on the validation
batches in memory: no loader, no checkpoint, no MLflow, no run directory. Evaluation extras the
plain side does not have (loss landscape, t-SNE) are switched off on both sides. Goal: ratio <= 1.5.

Results: `benchmarks/results/study_overhead-<machine>.json` (the machine named inside).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from benchmarks.common import machine, machine_name

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("model.neuron.recurrence: [none]", "model.neuron.recurrence: [full]")


def extras_off() -> list[str]:
    """Overrides that switch off the evaluation the plain loop does not do, where the schema has them."""
    from train.config import EvalConfig
    names = {f for f in EvalConfig.__dataclass_fields__}
    return [f"eval.{k}=0" for k in ("landscape_points", "tsne_samples") if k in names]


def study_seconds(configs: list[str], overrides: list[str], root: Path) -> list[float]:
    """Wall seconds of `python -m study run` for each of VARIANTS, one after the other here."""
    from study import run as study_run

    seconds = []
    for i, variant in enumerate(VARIANTS):
        grid = root / f"variant{i}.yaml"
        grid.write_text(f"study:\n  preset: custom\n  grid:\n    {variant}\n  seeds: 1\n")
        started = time.perf_counter()
        code = study_run.main([*(a for c in configs for a in ("--config", c)), "--config", str(grid),
                               "--no-report", *overrides, f"run.root={root / 'runs'}"])
        seconds.append(time.perf_counter() - started)
        if code != 0:
            raise SystemExit(f"study run of {variant} failed (exit {code})")
    return seconds


def plain_seconds(configs: list[str], overrides: list[str]) -> dict[str, float]:
    """Train the last variant's model in a plain loop on in-memory tensors, then evaluate."""
    from data_pipelines.loaders import create_loader
    from train import measure
    from train.build import build_model
    from train.config import load_config
    from train.engine import build_optimizer, build_scheduler
    from train.evaluate import attack_budgets, transfer_surrogate

    cfg = load_config(configs, [*overrides, VARIANTS[-1].replace(": [", "=").rstrip("]")])
    torch.manual_seed(cfg.run.seed)
    train_loader = create_loader(cfg.data, "train", seed=cfg.run.seed)
    val_loader = create_loader(cfg.data, "val", seed=cfg.run.seed)
    train_batches = [(x.clone(), y.clone()) for x, y in train_loader.iterate(0)]  # untimed: in memory
    val_batches = [(x.clone(), y.clone()) for x, y in val_loader.iterate(0)]
    model = build_model(cfg, train_loader.meta)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, len(train_batches) // cfg.optim.accumulate)

    started = time.perf_counter()
    model.train()
    for _ in range(cfg.optim.epochs):
        for x, y in train_batches:
            loss = F.cross_entropy(measure.mean_over_time(model(x)), y, label_smoothing=cfg.optim.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    trained = time.perf_counter() - started

    e, device = cfg.eval, torch.device("cpu")
    space = measure.InputSpace.from_meta(val_loader.meta, device)
    model.eval().requires_grad_(False)
    started = time.perf_counter()
    measure.top1(model, iter(val_batches), device=device)
    for sigma in e.noise_sigmas:
        measure.top1(model, iter(val_batches), measure.gaussian_noise(space, sigma, cfg.run.seed, 0), device=device)
    attacks = {"clean": None}  # the study's attacks (train/evaluate.py), built from train.measure here
    for eps, steps, step_size in attack_budgets(e, space):
        pgd = measure.pgd(model, space, eps, steps=steps, step_size=step_size, random_start=e.pgd_random_start,
                          seed=cfg.run.seed, rank=0, best_iterate=e.pgd_best_iterate)
        attacks |= {f"fgsm_{eps:g}": measure.fgsm(model, space, eps), f"pgd_{eps:g}": pgd,
                    f"transfer_{eps:g}": measure.through_surrogate(model, pgd, *transfer_surrogate(cfg))}
    measure.correct_under(model, iter(val_batches[:e.attack_batches or None]), attacks)
    evaluated = time.perf_counter() - started
    steps = cfg.optim.epochs * len(train_batches)
    return {"train_s": trained, "eval_s": evaluated, "total_s": trained + evaluated, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.study_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="a study config (e.g. configs/study_digits.yaml)")
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/study_overhead-<machine>.json)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both sides (e.g. data.path=...)")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *extras_off()]
    with tempfile.TemporaryDirectory() as tmp:
        study = study_seconds(args.config, overrides, Path(tmp))
    plain = plain_seconds(args.config, overrides)
    record = {"benchmark": "study_overhead", "configs": args.config, "overrides": overrides,
              "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "study_first_variant_s": study[0], "study_per_variant_s": study[1], "plain": plain,
              "ratio": study[1] / plain["total_s"], "goal": 1.5, "machine": machine("cpu")}
    out = args.out or RESULTS / f"study_overhead-{machine_name('cpu')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"study {study[1]:.1f} s per variant (first {study[0]:.1f} s), plain loop {plain['total_s']:.1f} s "
          f"(train {plain['train_s']:.1f} s, eval {plain['eval_s']:.1f} s, {plain['steps']} steps): "
          f"ratio {record['ratio']:.2f} (goal <= 1.5); wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
