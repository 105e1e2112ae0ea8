"""`python -m launch.submit`: submit a training run, or a sweep grid, to Slurm through submitit.

    python -m launch.submit --config configs/demo_digits.yaml --nodes 2 --gpus-per-node 8 \\
        --partition gpu --time 24:00:00 optim.lr=0.2
    python -m launch.submit --config configs/demo_digits.yaml --tasks-per-node 2 train.strategy=ddp
    python -m launch.submit --config configs/demo_digits.yaml \\
        --sweep optim.lr=0.05,0.1 --sweep data.batch_size=32,64 --array-parallelism 2

One task per GPU (on CPU: `--tasks-per-node`), each running `python -m train` with the
distributed environment set (launch/job.py). USR2 arrives 90 s before the time limit (at half
the limit for limits under 3 min); the trainer then saves and the job is requeued, up to `--max-requeues`
times, and resumes in the same run directory and MLflow run. A sweep is one Slurm job array:
each element has its own run directory and MLflow run, in the config's experiment, tagged
`sweep_id`. `--cluster auto` uses Slurm when `sbatch` is on PATH, else runs the job locally.

Everything a user can get wrong (config file, override, partition, missing Slurm, sweep syntax)
is reported before anything is submitted, as one line, exit code 2. Training options are config
keys (`key=value`), never flags here; flags are only about where and how the job runs.
"""
from __future__ import annotations

import argparse
import itertools
import math
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from launch.job import TrainJob

SIGNAL_BEFORE_LIMIT_S = 90
EXIT_USER_ERROR = 2


class SubmitError(Exception):
    """A user-fixable problem found before submission; the message is the whole explanation."""


@dataclass
class Element:
    """One run to submit: its name (= run directory) and the overrides that make it."""
    name: str
    overrides: list[str]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, action="append",
                   help="YAML experiment file (configs/*.yaml); repeat to add blocks, later ones win")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, as for python -m train")
    where = p.add_argument_group("where the job runs")
    where.add_argument("--cluster", choices=["auto", "slurm", "local", "debug"], default="auto",
                       help="auto: slurm if sbatch is on PATH, else local; debug runs in this process")
    where.add_argument("--partition", help="Slurm partition (checked against sinfo)")
    where.add_argument("--account")
    where.add_argument("--qos")
    where.add_argument("--constraint", help="Slurm node features, e.g. a100")
    where.add_argument("--time", default="4:00:00",
                       help="time limit per run of the job: MIN, H:MM:SS or D-HH:MM:SS (default 4:00:00)")
    size = p.add_argument_group("job size")
    size.add_argument("--nodes", type=int, default=1)
    size.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU")
    size.add_argument("--tasks-per-node", type=int, help="ranks per node on CPU (default 1; with GPUs: one per GPU)")
    size.add_argument("--cpus-per-task", type=int, help="CPUs per rank (data loader workers + 1)")
    size.add_argument("--mem", help="memory per node in Slurm's syntax, e.g. 64G")
    req = p.add_argument_group("requeue and sweeps")
    req.add_argument("--max-requeues", type=int, default=3,
                     help="requeues after a time limit or preemption before the job gives up (default 3)")
    req.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                     help="grid axis; repeat for more axes; the grid is one Slurm job array")
    req.add_argument("--study", action="store_true",
                     help="also run every variant x seed of the config's study (study.preset or study.grid, "
                          "study.seeds), each its own element")
    req.add_argument("--array-parallelism", type=int, default=256, help="sweep elements running at once")
    return p.parse_args(argv)


def minutes(text: str) -> int:
    """Slurm time syntax -> whole minutes (rounded up): MIN, MIN:SEC, H:MM:SS, D-H, D-H:MM, D-H:MM:SS."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise SubmitError(f"--time {text!r}: use minutes, H:MM:SS or D-HH:MM:SS (e.g. 4:00:00)")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-H[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:   # H:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:   # MIN:SEC
        seconds = a * 60 + b
    else:                 # MIN
        seconds = a * 60
    if seconds <= 0:
        raise SubmitError(f"--time {text!r}: the time limit must be positive")
    return math.ceil(seconds / 60)


def sweep_grid(specs: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x,y'] -> [['a=1', 'b=x'], ['a=1', 'b=y'], ['a=2', 'b=x'], ['a=2', 'b=y']]; [] -> [[]]."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v for v in values.split(",") if v != ""]
        if not sep or not key or not items:
            raise SubmitError(f"--sweep {spec!r}: expected KEY=V1,V2,... (e.g. --sweep optim.lr=0.05,0.1)")
        if key in {k for k, _ in axes}:
            raise SubmitError(f"--sweep {key} is given twice; list all its values in one --sweep")
        axes.append((key, items))
    return [[f"{k}={v}" for k, v in zip((k for k, _ in axes), point)]
            for point in itertools.product(*(items for _, items in axes))]


def sweep_specs(config: list[Path], overrides: list[str], sweeps: list[str], study: bool) -> list[str]:
    """The --sweep axes; with `study`, checked against the study's grid (`plan` crosses them with its
    variants x seeds, study/grid.py; each element evaluates itself when eval.after_train is set)."""
    if study:
        axes = load(config, overrides).study.axes()
        for spec in sweeps:
            if spec.partition("=")[0] in axes:
                raise SubmitError(f"--sweep {spec.partition('=')[0]} is given twice: it is an axis of the "
                                  "config's study grid; set study.preset=custom and study.grid instead")
    return list(sweeps)


def choose_cluster(requested: str) -> str:
    has_slurm = shutil.which("sbatch") is not None and shutil.which("srun") is not None
    if requested == "slurm" and not has_slurm:
        raise SubmitError("--cluster slurm: sbatch/srun are not on PATH; run this on a Slurm login node "
                          "(or use --cluster local)")
    if requested == "auto":
        return "slurm" if has_slurm else "local"
    return requested


def slurm_partitions() -> list[str]:
    """Partition names the controller knows (also proves it answers)."""
    hint = "check SLURM_CONF, start a local cluster with slurm/local-cluster/start, or use --cluster local"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise SubmitError(f"the Slurm controller does not answer (sinfo timed out after 30 s); {hint}") from None
    except OSError as e:
        raise SubmitError(f"sinfo could not run ({e}); {hint}") from None
    if out.returncode != 0:
        msg = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SubmitError(f"the Slurm controller does not answer (sinfo: {msg}); {hint}")
    return sorted(set(out.stdout.split()))


def load(config: list[Path], overrides: list[str]):
    """The resolved config, or SubmitError with train.config's one-line message."""
    # Imported here, not at the top: `--help` or a missing file need no schema. The schema
    # itself imports neither torch nor timm, FFCV, Triton or DeepSpeed (a test says so).
    from train.config import ConfigError, load_config
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        raise SubmitError(str(e)) from None


def plan(config: list[Path], overrides: list[str], grid: list[list[str]],
         study: bool = False) -> tuple[list[Element], str | None, object]:
    """The runs to submit, the sweep id (None for one run) and the resolved base config.

    grid: the sweep's override sets (`sweep_grid`); [[]] for a single run.
    The run name is fixed here and passed as `run.name=...`: every requeue of a job finds the
    same run directory, hence the same checkpoints and MLflow run.
    """
    base = load(config, overrides)
    if study:
        return study_plan(config, overrides, grid, base), base.run.name, base
    if grid == [[]]:
        pinned = f"run.name={base.run.name}"
        named = [o for o in overrides if o.startswith("run.name=")]
        return [Element(base.run.name, overrides if named[-1:] == [pinned] else [*overrides, pinned])], None, base
    sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    elements = []
    for i, point in enumerate(grid):
        name = f"{base.run.name}-{sweep_id}-{i}"
        element = Element(name, [*overrides, *point, f"run.name={name}", f"tracking.tags.sweep_id={sweep_id}"])
        load(config, element.overrides)  # a bad sweep value fails here, before anything is queued
        elements.append(element)
    return elements, sweep_id, base


def study_plan(config: list[Path], overrides: list[str], grid: list[list[str]], base) -> list[Element]:
    """Every --sweep point x variant x seed of the study, named `<sweep>-<variant>-seed<seed>` and
    tagged `sweep_id=<sweep>`, `variant` and `seed` (study/grid.py), the sweep being `<run.name>`, or
    `<run.name>-<i>` for --sweep point i (each point is a study of its own): a resubmitted study
    finds the same run directories, so finished runs are not trained again, and `python -m study
    report --sweep-id <sweep>` reads them."""
    from study.grid import study_runs  # the one place that names a study's runs

    elements = []
    for i, point in enumerate(grid):
        sweep = base.run.name if grid == [[]] else f"{base.run.name}-{i}"
        for run in study_runs(base.study, sweep, sweep):
            element = Element(run.name, [*overrides, *point, *run.overrides])
            if run.seed == base.study.seed_list()[0]:
                load(config, element.overrides)  # a bad grid value fails here, before anything is queued
            elements.append(element)
    return elements


def build_executor(args: argparse.Namespace, cluster: str, folder: Path, tasks_per_node: int,
                   timeout_min: int, name: str) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=args.max_requeues)
    params = dict(name=name, timeout_min=timeout_min, nodes=args.nodes, tasks_per_node=tasks_per_node,
                  cpus_per_task=args.cpus_per_task, gpus_per_node=args.gpus_per_node or None)
    if cluster == "slurm":
        # Requeue is explicit: `scontrol requeue` is refused for jobs submitted with --no-requeue,
        # which some clusters make the default.
        params.update(slurm_partition=args.partition, slurm_account=args.account, slurm_qos=args.qos,
                      slurm_constraint=args.constraint, slurm_mem=args.mem,
                      slurm_signal_delay_s=min(SIGNAL_BEFORE_LIMIT_S, timeout_min * 60 // 2),
                      slurm_array_parallelism=args.array_parallelism,
                      slurm_additional_parameters={"requeue": True})
    executor.update_parameters(**params)
    return executor


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return submit(args)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def submit(args: argparse.Namespace) -> int:
    config = [Path(c) for c in args.config]
    for path in config:
        if not path.is_file():
            raise SubmitError(f"config file not found: {path}")
    timeout_min = minutes(args.time)
    grid = sweep_grid(sweep_specs(config, args.overrides, args.sweep, args.study))
    if args.nodes < 1 or args.gpus_per_node < 0 or args.max_requeues < 0 or args.array_parallelism < 1:
        raise SubmitError("--nodes and --array-parallelism must be >= 1, --gpus-per-node and --max-requeues >= 0")
    if args.gpus_per_node and args.tasks_per_node not in (None, args.gpus_per_node):
        raise SubmitError(f"one task per GPU: --tasks-per-node {args.tasks_per_node} contradicts "
                          f"--gpus-per-node {args.gpus_per_node}; drop --tasks-per-node")
    tasks_per_node = args.gpus_per_node or args.tasks_per_node or 1
    cluster = choose_cluster(args.cluster)
    if cluster == "slurm":
        partitions = slurm_partitions()
        if args.partition and args.partition not in partitions:
            raise SubmitError(f"unknown partition {args.partition!r}; this cluster has: {', '.join(partitions)}")
    elif args.nodes > 1:
        raise SubmitError(f"--nodes {args.nodes} needs Slurm; --cluster {cluster} runs on this machine only")

    elements, sweep_id, base = plan(config, args.overrides, grid, args.study)
    root = Path(base.run.root).resolve()
    folder = root / "sweeps" / sweep_id if sweep_id else root / elements[0].name / "submitit"
    folder.mkdir(parents=True, exist_ok=True)
    # The job reads this copy, on every requeue: editing configs/*.yaml after submitting must
    # not change (or break) a run that resumes later.
    frozen = folder / "config.yaml"
    frozen.write_text(merged_yaml(config))

    uri = tracking_store(base, root)
    executor = build_executor(args, cluster, folder, tasks_per_node, timeout_min,
                              name=f"{base.run.name}-sweep" if sweep_id else elements[0].name)
    make = [TrainJob(str(frozen), e.overrides, args.max_requeues, args.gpus_per_node) for e in elements]
    if sweep_id:
        with executor.batch():
            jobs = [executor.submit(job) for job in make]
    else:
        jobs = [executor.submit(make[0])]
    report(jobs, elements, sweep_id, base, root, cluster, tasks_per_node * args.nodes, uri)
    if cluster == "debug":  # the debug executor runs the job when its result is asked for
        for job in jobs:
            job.result()
    return 0


def merged_yaml(config: list[Path]) -> str:
    """The config files merged in order (later ones win), as one YAML the job can read."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.merge(*(OmegaConf.load(p) for p in config)))


def tracking_store(base, root: Path) -> str:
    """The MLflow tracking URI the jobs will log to; an embedded SQLite store is created here.

    Created before submitting because the jobs of a sweep start together, and several processes
    creating one SQLite store's schema at once can leave it half-migrated and unusable.
    """
    from train.tracking import resolve_uri  # already imported by the config schema

    uri = resolve_uri(base.tracking, root)
    if uri.startswith("sqlite:"):
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return uri


def report(jobs, elements: list[Element], sweep_id: str | None, base, root: Path, cluster: str,
           ranks: int, uri: str) -> None:
    array = " as one job array" if cluster == "slurm" else ""
    what = f"sweep {sweep_id}: {len(jobs)} runs{array}" if sweep_id else f"run {elements[0].name}"
    print(f"submitted {what} ({cluster}, {ranks} rank{'s' if ranks > 1 else ''} per run)")
    for job, element in zip(jobs, elements):
        print(f"  job {job.job_id}  run {element.name}  dir {root / element.name}")
        print(f"      log {job.paths.stdout}  (errors: {job.paths.stderr})")
    tag = f", tag sweep_id={sweep_id}" if sweep_id else ""
    print(f"MLflow: {uri}  experiment {base.tracking.experiment!r}{tag}; runs are named after their run dir")
    if uri.startswith("sqlite:"):
        print(f"  view: mlflow ui --backend-store-uri {uri}")
    if cluster == "slurm":
        ids = sorted({job.job_id.split("_")[0] for job in jobs})
        print(f"  watch: squeue -j {','.join(ids)}    cancel: scancel {' '.join(ids)}")


if __name__ == "__main__":
    sys.exit(main())
