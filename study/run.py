"""`python -m study run (--config FILE [--config FILE ...] | --task FILE [--task FILE ...]) [--workers N]
[key=value ...]`: a study here, or several tasks' studies and their cross-task report.

    python -m study run --config configs/study_digits.yaml
    python -m study run --task configs/study_digits.yaml --task configs/study_seqdigits.yaml --workers 2
    python -m study run --config configs/cifar10_resnet19.yaml --config configs/ablation_functional_roles.yaml

Trains every variant x seed of the config's study (`study.preset` or `study.grid`, `study.seeds`;
study/grid.py) as its own run `<run.name>-<variant>-seed<seed>`, tagged `sweep_id=<run.name>`,
`variant` and `seed`, evaluates each (`eval.after_train`), then writes the report
(`python -m study report --sweep-id <run.name>`). `--config` files compose one task (later ones
win); each `--task` file is a task of its own, and the report then adds the cross-task table.
The runs of one process share what is set up once (imports, compiled code, the data sets' pages
in memory). `--workers N` deals the runs of every task round-robin to N processes of one thread
each (on a 2-core machine, 2 workers finish a grid of small runs sooner than one process of two
threads). Rerunning resumes: finished and evaluated runs are skipped, an interrupted one resumes
from its checkpoint; seeds added to `study.seeds` train only the new runs. A run that fails is
reported and the others go on; the report names it. On a Slurm cluster the same runs are one job
array: `python -m launch.submit --config ... --study`.

Exit codes: 0 every run done, 1 some run failed (the report is still written), 2 a user error in
the config (one line).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from study.grid import StudyRun, study_runs
from train.config import ConfigError, load_config


def plan(configs: list[str], overrides: list[str]) -> tuple[str, list[StudyRun]]:
    """(sweep id, the runs) with every run's config checked before anything runs."""
    base = load_config(configs, overrides)
    sweep_id = base.run.name
    runs = study_runs(base.study, base.run.name, sweep_id)
    for run in runs[:len(runs) // len(base.study.seed_list())]:  # the seeds change nothing a check sees
        load_config(configs, [*overrides, *run.overrides])  # a bad grid value stops here, before the first run
    return sweep_id, runs


def grid_of(configs: list[str], overrides: list[str]):
    """The report's Grid (factor -> levels, seeds) of the config's study."""
    from study.grid import factor
    from study.report import Grid

    study = load_config(configs, overrides).study
    return Grid({factor(k): [str(v) for v in vs] for k, vs in study.axes().items()}, study.seed_list())


def train_runs(jobs: list[tuple[list[str], str, StudyRun]], overrides: list[str]) -> dict[tuple[str, StudyRun], int]:
    """Train and evaluate the (task configs, sweep id, run) jobs one after the other in this
    process; returns the failed ones, (sweep id, run) -> exit code."""
    from train.engine import run_reporting_errors  # torch, timm, FFCV: only once the config is known to be good

    failed = {}
    for i, (configs, sweep_id, run) in enumerate(jobs, start=1):
        print(f"[study {sweep_id}] {i}/{len(jobs)} {run.name}", flush=True)
        element = [*overrides, *run.overrides]
        keys = {o.partition("=")[0] for o in element}
        try:
            code = run_reporting_errors(load_config(configs, element), cli_keys=keys)
        except Exception:  # one run's crash must not lose the others: report it, go on
            traceback.print_exc()
            code = 1
        if code != 0:
            failed[sweep_id, run] = code
            print(f"[study {sweep_id}] {run.name} failed (exit {code}); going on", flush=True)
    return failed


def exits_file(base, index: int) -> Path:
    """Where worker `index` leaves the exit codes of its failed runs for the parent's report."""
    return Path(base.run.root) / "study" / f".worker-{index}-exits.json"


def in_workers(argv: list[str], workers: int, roots: list) -> tuple[int, dict[tuple[str, str, int], int]]:
    """Run this command in `workers` processes of one thread, each on every workers-th run;
    returns the highest exit code and the failed runs, (sweep id, variant, seed) -> exit code."""
    from train.tracking import resolve_uri

    for base in roots:
        uri = resolve_uri(base.tracking, Path(base.run.root))
        if uri.startswith("sqlite:"):  # created once here: two processes creating one schema can break it
            from mlflow.tracking import MlflowClient
            Path(base.run.root).mkdir(parents=True, exist_ok=True)
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "study", "run", *argv, "--no-report",
                               "--worker", f"{i}/{workers}"], env=env) for i in range(workers)]
    code = max(p.wait() for p in procs)
    failed = {}
    for i in range(workers):
        path = exits_file(roots[0], i)
        if path.is_file():
            failed |= {(s, v, int(seed)): c for s, v, seed, c in json.loads(path.read_text())}
            path.unlink()
    return code, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML experiment file(s) of one task; later ones win")
    parser.add_argument("--task", action="append", default=[], help="a task's YAML file; repeat for a cross-task study")
    parser.add_argument("--no-report", action="store_true", help="train and evaluate only")
    parser.add_argument("--workers", type=int, default=1, help="processes of one thread each (default 1)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "i/N": this process runs jobs[i::N]
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.task):
        parser.error("give --config FILE(s) (one task) or --task FILE for each task, not both")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    tasks = [[t] for t in args.task] if args.task else [args.config]
    try:
        plans = [(configs, *plan(configs, args.overrides)) for configs in tasks]
        bases = [load_config(configs, args.overrides) for configs in tasks]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len({sweep_id for _, sweep_id, _ in plans}) < len(plans):
        print("error: two --task files have the same run.name (the sweep id); give each its own", file=sys.stderr)
        return 2
    jobs = [(configs, sweep_id, run) for configs, sweep_id, runs in plans for run in runs]
    started, workers_code, failed = time.perf_counter(), 0, {}
    if args.worker:
        index, _, count = args.worker.partition("/")
        failed = train_runs(jobs[int(index)::int(count)], args.overrides)
        path = exits_file(bases[0], int(index))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([[s, r.variant, r.seed, c] for (s, r), c in failed.items()]))
        return 1 if failed else 0
    if args.workers > 1:
        child = [*(a for c in args.config for a in ("--config", c)), *(a for t in args.task for a in ("--task", t)),
                 *args.overrides]
        workers_code, by_worker = in_workers(child, min(args.workers, len(jobs)), bases)
        runs_of = {(s, r.variant, r.seed): r for _, s, r in jobs}
        failed = {(s, runs_of[s, v, seed]): c for (s, v, seed), c in by_worker.items() if (s, v, seed) in runs_of}
    else:
        failed = train_runs(jobs, args.overrides)
    minutes = (time.perf_counter() - started) / 60
    print(f"[study] {len(jobs)} runs of {len(plans)} task(s) in {minutes:.1f} min"
          + (f"; failed: {', '.join(r.name for _, r in failed)}" if failed else ""), flush=True)
    if not args.no_report:
        from study import report
        base = bases[0]
        where = ["--tracking-uri", base.tracking.uri] if base.tracking.uri else []
        scope = ["--experiment", base.tracking.experiment] if len(plans) == 1 else []
        code = report.main([*(a for _, sweep_id, _ in plans for a in ("--sweep-id", sweep_id)), *scope,
                            "--runs-root", str(Path(base.run.root)), *where],
                           grids={sweep_id: grid_of(configs, args.overrides) for configs, sweep_id, _ in plans},
                           exits={sweep_id: {(r.variant, r.seed): c for (s, r), c in failed.items() if s == sweep_id}
                                  for _, sweep_id, _ in plans})
        if code != 0:
            return code
    return 1 if failed or workers_code else 0
