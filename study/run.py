"""`python -m study run --config FILE [--config FILE ...] [key=value ...]`: the whole study here.

    python -m study run --config configs/study_digits.yaml
    python -m study run --config configs/cifar10_resnet19.yaml --config configs/ablation_functional_roles.yaml

Trains every point of the config's `study.grid` (by default leak x reset x recurrence, the 18
LIF variants) one after the other in this process, each as its own run `<run.name>-<point>`
tagged `sweep_id=<run.name>`, evaluates each (`eval.after_train`), then writes the report
(`python -m study report --sweep-id <run.name>`). Rerunning resumes: finished and evaluated
variants are reported as such and skipped, an interrupted one resumes from its checkpoint. A
variant that fails is reported and the others go on; the report lists it. On a Slurm cluster the
same grid is one job array: `python -m launch.submit --config ... --study`.

Exit codes: 0 every variant done, 1 some variant failed (the report is still written), 2 a user
error in the config (one line).
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from train.config import ConfigError, grid_points, load_config


def variant_name(point: list[str]) -> str:
    """['model.neuron.leak=true', 'model.neuron.reset=hard'] -> 'leak_true-reset_hard'."""
    return "-".join(f"{key.rpartition('.')[2]}_{value}" for key, _, value in (p.partition("=") for p in point))


def plan(configs: list[str], overrides: list[str]) -> tuple[str, list[tuple[str, list[str]]]]:
    """(sweep id, [(run name, overrides)]) with every point's config checked before anything runs."""
    base = load_config(configs, overrides)
    sweep_id = base.run.name
    runs = []
    for point in grid_points(base.study.grid):
        name = f"{sweep_id}-{variant_name(point)}"
        element = [*overrides, *point, f"run.name={name}", f"tracking.tags.sweep_id={sweep_id}",
                   "eval.after_train=true"]
        load_config(configs, element)  # a bad grid value stops here, before the first run
        runs.append((name, element))
    return sweep_id, runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, action="append", help="YAML experiment file(s); later ones win")
    parser.add_argument("--no-report", action="store_true", help="train and evaluate only")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for every variant")
    args = parser.parse_args(argv)
    try:
        sweep_id, runs = plan(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from train.engine import run_reporting_errors  # torch, timm, FFCV: only once the config is known to be good

    started, failed = time.perf_counter(), []
    for i, (name, overrides) in enumerate(runs, start=1):
        print(f"[study {sweep_id}] {i}/{len(runs)} {name}", flush=True)
        keys = {o.partition("=")[0] for o in overrides}
        try:
            code = run_reporting_errors(load_config(args.config, overrides), cli_keys=keys)
        except Exception:  # one variant's crash must not lose the others: report it, go on
            traceback.print_exc()
            code = 1
        if code != 0:
            failed.append(name)
            print(f"[study {sweep_id}] {name} failed (exit {code}); going on", flush=True)
    minutes = (time.perf_counter() - started) / 60
    print(f"[study {sweep_id}] {len(runs) - len(failed)}/{len(runs)} variants done in {minutes:.1f} min"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if not args.no_report:
        from study import report
        base = load_config(args.config, args.overrides)
        where = ["--tracking-uri", base.tracking.uri] if base.tracking.uri else []
        code = report.main(["--experiment", base.tracking.experiment, "--sweep-id", sweep_id,
                            "--runs-root", str(Path(base.run.root)), *where])
        if code != 0:
            return code
    return 1 if failed else 0
