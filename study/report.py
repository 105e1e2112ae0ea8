"""`python -m study report`: the functional-roles sweep as a table, plots and the paper's findings.

    python -m study report --experiment ablation
    python -m study report --sweep-id 20250101-120000-ab12 --runs-root runs
    python -m study report --experiment ablation --tracking-uri http://127.0.0.1:5000 --out reports/ablation

Reads the LIF variants (leak x reset x recurrence) from MLflow: the latest run of each variant in
the experiment, or among the runs tagged `sweep_id` (both options together: that sweep within that
experiment). A variant is identified by its `model.neuron.*` params (else its `neuron` tag); runs
tagged `study.role=report` (reports themselves) are skipped. Writes into `--out` (default
`<runs root>/study/<experiment or sweep id>/`), each file atomically:

    results.csv   one row per variant of the 18-variant grid, status ok | failed | missing
    report.md     the table, the failed or missing variants by name, the findings' verdicts
    plots/*.png   accuracy against eps and sigma, heat maps over the grid, firing rate vs top-1

and logs them as the artifacts of one parent MLflow run in the experiment (tag
`study.role=report`, reused by later reports of the same experiment or sweep), with the verdicts
as tags and every variant run nested under it (tag `mlflow.parentRunId`). The verdict rules are
in study/findings.py. A variant is failed when its run ended FAILED or KILLED or has no
`eval/val_top1` (`python -m train.evaluate` not run on it yet).

Bad input (unknown experiment, a sweep id without runs, a store that does not exist or does not
answer) is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from study import atomic_path
from study.findings import GRID, HOLDS, MARGIN, Finding, findings, swept_columns, variant_name

EXIT_USER_ERROR = 2
ROLE_TAG, ROLE = "study.role", "report"
PARENT_TAG = "mlflow.parentRunId"  # the tag the MLflow UI nests runs by
BASE_COLUMNS = ("leak", "reset", "recurrence", "status", "top1", "train_top1",
                "generalization_gap", "firing_rate", "sops", "energy")
# results.csv column -> the metric `python -m train.evaluate` logs
EVAL_METRICS = {"top1": "eval/val_top1", "train_top1": "eval/train_top1",
                "generalization_gap": "eval/generalization_gap",
                "firing_rate": "eval/firing_rate_mean", "sops": "eval/sops_per_image",
                "energy": "eval/energy_uj_per_image", "stream_top1": "eval/stream_top1"}
_SWEPT_METRIC = re.compile(r"^eval/((?:noise|fgsm|pgd)_top1_.+)$")
_NEURON_TAG = re.compile(r"^(lif|if)-reset_(\w+)-rec_(\w+)$")
_FAILED_STATUSES = ("FAILED", "KILLED")


class StudyError(Exception):
    """A problem the user fixes (experiment name, sweep id, store); the message says it all."""


@dataclass
class Variant:
    """One cell of the grid: its latest run (None: missing) and its results.csv row."""
    leak: bool
    reset: str
    recurrence: str
    run: object | None  # mlflow.entities.Run
    row: dict

    @property
    def name(self) -> str:
        return variant_name(self.leak, self.reset, self.recurrence)

    def why_not_ok(self) -> str:
        """Why a failed or missing variant is not in the comparisons, in one sentence."""
        if self.run is None:
            return "missing: no run of this variant"
        info = self.run.info
        which = f"run {info.run_id} ({info.run_name})"
        if info.status in _FAILED_STATUSES:
            return f"failed: {which} ended {info.status}"
        return (f"failed: {which} ({info.status}) has no {EVAL_METRICS['top1']}; "
                f"evaluate it with `python -m train.evaluate`")


# --------------------------------------------------------------------------------------------
# Reading the variants from MLflow


def open_store(uri: str):
    """An MlflowClient on `uri`, after checking that the store exists and answers."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        # MLflow would create an empty store here; a report of nothing is a wrong path instead
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise StudyError(f"no MLflow store at {db} (tracking URI {uri}); pass the sweep's "
                             "--runs-root or --tracking-uri")
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:
        raise StudyError(f"cannot read the MLflow store at {uri}: {_one_line(e)}") from e
    return client


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _search(client, experiment_ids: list[str], filter_string: str) -> list:
    """Every active run matching `filter_string` in the experiments, newest first."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True)


def _experiments(client) -> list:
    found, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def find_runs(client, experiment: str | None, sweep_id: str | None) -> tuple[object, list]:
    """(the experiment, its runs of the study): all runs of `experiment`, or those tagged
    `sweep_id` (within `experiment` when both are given); report runs are left out."""
    exp = None
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None or exp.lifecycle_stage != "active":
            names = sorted(e.name for e in _experiments(client))
            listing = ", ".join(repr(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")
            raise StudyError(f"no experiment {experiment!r} in this store (it has: "
                             f"{listing or 'no experiments'}); check --experiment or --tracking-uri")
    if sweep_id is None:
        runs = _search(client, [exp.experiment_id], "")
    else:
        if "'" in sweep_id or "\\" in sweep_id:
            raise StudyError(f"--sweep-id {sweep_id!r}: a sweep id has no quotes or backslashes")
        ids = [exp.experiment_id] if exp else [e.experiment_id for e in _experiments(client)]
        runs = _search(client, ids, f"tags.sweep_id = '{sweep_id}'")
    runs = [r for r in runs if r.data.tags.get(ROLE_TAG) != ROLE]
    where = f"experiment {experiment!r}" if exp else "any experiment"
    if not runs:
        raise StudyError(f"no runs tagged sweep_id={sweep_id} in {where}" if sweep_id
                         else f"experiment {experiment!r} has no runs; train the variants first")
    if exp is None:
        found = sorted({r.info.experiment_id for r in runs})
        if len(found) > 1:
            names = ", ".join(repr(client.get_experiment(i).name) for i in found)
            raise StudyError(f"sweep {sweep_id} has runs in experiments {names}; add "
                             "--experiment NAME to pick one")
        exp = client.get_experiment(found[0])
    return exp, runs


def variant_of(run) -> tuple[bool, str, str] | None:
    """(leak, reset, recurrence) of a training run, from its params (else its `neuron` tag);
    None when the run is not a variant of the grid."""
    params, tags = run.data.params, run.data.tags
    leak = params.get("model.neuron.leak", "").lower()
    reset, rec = params.get("model.neuron.reset"), params.get("model.neuron.recurrence")
    if leak in ("true", "false") and reset and rec:
        key = (leak == "true", reset, rec)
    elif match := _NEURON_TAG.match(tags.get("neuron", "")):
        key = (match.group(1) == "lif", match.group(2), match.group(3))
    else:
        return None
    return key if key in GRID else None


def build_variants(runs: list) -> tuple[list[Variant], list]:
    """The 18 variants in grid order, each with its latest run, and the runs that are no variant."""
    latest, strays = {}, []
    for run in runs:  # newest first
        key = variant_of(run)
        if key is None:
            strays.append(run)
        else:
            latest.setdefault(key, run)
    return [Variant(*key, run=latest.get(key), row=_row(key, latest.get(key))) for key in GRID], strays


def _row(key: tuple[bool, str, str], run) -> dict:
    row = dict(zip(("leak", "reset", "recurrence"), key))
    if run is None:
        row["status"] = "missing"
        return row
    metrics = run.data.metrics
    ok = run.info.status not in _FAILED_STATUSES and EVAL_METRICS["top1"] in metrics
    row["status"] = "ok" if ok else "failed"
    if ok:
        row.update({column: metrics.get(key) for column, key in EVAL_METRICS.items()})
        row.update({m.group(1): value for key, value in metrics.items()
                    if (m := _SWEPT_METRIC.match(key))})
    return row


def columns(rows: Sequence[dict]) -> list[str]:
    """results.csv columns: the base ones, a noise/FGSM/PGD column per grid value found, and
    stream_top1 when any variant has it."""
    found = {c for row in rows for c, v in row.items() if v is not None}
    extra = swept_columns(found) + (["stream_top1"] if "stream_top1" in found else [])
    return [*BASE_COLUMNS, *extra]


# --------------------------------------------------------------------------------------------
# Writing the table and the report


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(float(value)) if isinstance(value, (int, float)) else str(value)


def write_csv(rows: Sequence[dict], cols: list[str], path: Path) -> Path:
    """results.csv: one line per row, empty cells where a value is missing."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in cols])
    return write_text(path, buffer.getvalue())


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (temporary file, then one rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _num(value) -> str:
    return "" if value is None else f"{value:.4g}"


def _values(variants: list[Variant], tag: str) -> str:
    found = sorted({v.run.data.tags[tag] for v in variants if v.run and tag in v.run.data.tags})
    if not found:
        return "unknown"
    return found[0] if len(found) == 1 else f"mixed: {', '.join(found)} (latest run per variant)"


@dataclass
class Scope:
    """What a report is about and where it lives in MLflow."""
    name: str                   # the experiment name, or the sweep id
    experiment: object          # mlflow.entities.Experiment
    sweep_id: str | None
    uri: str


def render_markdown(scope: Scope, variants: list[Variant], cols: list[str], found: list[Finding],
                    plots: list[Path], parent_run_id: str, strays: int) -> str:
    """report.md: summary, table, failed or missing variants, findings, plots."""
    count = {s: sum(v.row["status"] == s for v in variants) for s in ("ok", "failed", "missing")}
    lines = [f"# Functional roles of LIF components: {scope.name}", "",
             "Yin et al. 2024, \"Understanding the Functional Roles of Modelling Components in "
             "Spiking Neural Networks\": leak x reset x recurrence, each variant trained and "
             "evaluated as its own MLflow run.", "",
             "| | |", "|---|---|",
             f"| experiment | `{scope.experiment.name}` (id {scope.experiment.experiment_id}) |"]
    if scope.sweep_id:
        lines.append(f"| sweep | `{scope.sweep_id}` |")
    lines += [f"| data set | {_values(variants, 'dataset')} |",
              f"| model | {_values(variants, 'model')}, T={_values(variants, 'T')} |",
              f"| variants | {count['ok']} ok, {count['failed']} failed, {count['missing']} "
              f"missing, of {len(GRID)} |",
              f"| tracking URI | `{scope.uri}` |",
              f"| report run | `{parent_run_id}` (variant runs nested under it) |",
              f"| written | {time.strftime('%Y-%m-%d %H:%M:%S %Z')} |", ""]
    if strays:
        lines += [f"{strays} run(s) in scope are not variants of the grid (no `model.neuron.*` "
                  "params or `neuron` tag naming one) and are not counted.", ""]

    metric_cols = [c for c in cols if c not in ("leak", "reset", "recurrence", "status")]
    lines += ["## Results", "",
              "Accuracies are fractions; firing_rate is spikes per neuron per time step, sops "
              "synaptic operations per image, energy µJ per image; `<kind>_top1_<x>` is top-1 "
              "under Gaussian noise sigma x, FGSM or PGD eps x. Also in `results.csv`.", "",
              "| variant | status | " + " | ".join(metric_cols) + " |",
              "|---|---|" + "---:|" * len(metric_cols)]
    for v in variants:
        lines.append(f"| {v.name} | {v.row['status']} | "
                     + " | ".join(_num(v.row.get(c)) for c in metric_cols) + " |")

    lines += ["", "## Failed or missing variants", ""]
    not_ok = [v for v in variants if v.row["status"] != "ok"]
    lines += [f"- `{v.name}`: {v.why_not_ok()}" for v in not_ok] or \
             [f"None: all {len(GRID)} variants are ok."]
    if not_ok:
        lines += ["", "They are left out of every comparison below."]

    lines += ["", "## The paper's findings beside this sweep", "",
              "Each claim compares the mean of a metric over two groups of ok variants that differ "
              "in one factor, counting only variants whose other two factors occur in both groups. "
              f"Difference d = mean(expected higher) - mean(expected lower): d > {MARGIN:g} holds, "
              f"d < -{MARGIN:g} does not hold, otherwise (or when a group has no ok variant "
              "measuring the metric) inconclusive. A finding holds when all its claims hold and "
              "does not hold when any claim does not. robust_top1 is a variant's mean top-1 over "
              "the nonzero noise sigma and FGSM/PGD eps; stream_top1 exists on temporal data "
              "sets only.", ""]
    for i, finding in enumerate(found, 1):
        lines += [f"### {i}. {finding.title}: **{finding.verdict}**", "",
                  "| claim | metric | expected higher | mean (n) | expected lower | mean (n) | d | verdict |",
                  "|---|---|---|---:|---|---:|---:|---|"]
        for c in finding.claims:
            d = c.difference
            lines.append(f"| {c.statement} | {c.metric} | {c.higher} | {_num(c.higher_mean)} "
                         f"({c.n_higher}) | {c.lower} | {_num(c.lower_mean)} ({c.n_lower}) | "
                         f"{'' if d is None else f'{d:+.4f}'} | {c.verdict} |")
        lines += [""] + [f"- {c.key}: inconclusive, {c.reason}." for c in finding.claims if c.reason]
        if any(c.reason for c in finding.claims):
            lines.append("")

    lines += ["## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots] or ["No variant has data to plot."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The parent run


def parent_run(client, scope: Scope) -> str:
    """The report run of this experiment or sweep, reopened; created on the first report."""
    reports = _search(client, [scope.experiment.experiment_id], f"tags.`{ROLE_TAG}` = '{ROLE}'")
    mine = [r for r in reports if r.data.tags.get("sweep_id") == scope.sweep_id]
    if mine:
        run_id = mine[0].info.run_id  # newest first
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {ROLE_TAG: ROLE, **({"sweep_id": scope.sweep_id} if scope.sweep_id else {})}
    return client.create_run(scope.experiment.experiment_id, tags=tags,
                             run_name=f"study-report-{scope.name}").info.run_id


def publish(client, run_id: str, scope: Scope, variants: list[Variant], found: list[Finding],
            out: Path) -> int:
    """Log the verdicts, counts and files to the parent run and nest the variant runs under it
    (un-nesting runs a newer run of their variant replaced). Returns how many runs are nested."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    tags = [RunTag(f"study.finding.{f.key}", f.verdict) for f in found]
    tags += [RunTag(f"study.finding.{f.key}.{c.key}", c.verdict) for f in found for c in f.claims]
    # params cannot change once logged, and a rerun may measure new runs: only constants here
    params = [Param("study.margin", f"{MARGIN:g}")]
    metrics = [Metric(f"study/variants_{s}", sum(v.row["status"] == s for v in variants), now, 0)
               for s in ("ok", "failed", "missing")]
    metrics += [Metric(f"study/{f.key}.{c.key}.difference", c.difference, now, 0)
                for f in found for c in f.claims if c.difference is not None]
    client.log_batch(run_id, metrics=metrics, params=params, tags=tags)

    children = {v.run.info.run_id for v in variants if v.run is not None}
    for child in children:
        client.set_tag(child, PARENT_TAG, run_id)
    nested = _search(client, [scope.experiment.experiment_id], f"tags.`{PARENT_TAG}` = '{run_id}'")
    for run in nested:
        if run.info.run_id not in children:
            client.delete_tag(run.info.run_id, PARENT_TAG)

    client.log_artifact(run_id, str(out / "results.csv"))
    client.log_artifact(run_id, str(out / "report.md"))
    if any((out / "plots").glob("*.png")):
        client.log_artifacts(run_id, str(out / "plots"), "plots")
    return len(children)


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The report's options; exits 2 (argparse) when neither --experiment nor --sweep-id is given."""
    p = argparse.ArgumentParser(prog="python -m study report", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:6]))
    p.add_argument("--experiment", help="MLflow experiment of the variant runs (e.g. ablation)")
    p.add_argument("--sweep-id", help="the sweep_id tag `python -m launch.submit --sweep` printed")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else the embedded store <runs root>/mlflow.db)")
    p.add_argument("--runs-root", type=Path, default=Path("runs"),
                   help="the runs directory (run.root of the sweep; default: runs)")
    p.add_argument("--out", type=Path, help="output directory (default: <runs root>/study/<name>)")
    args = p.parse_args(argv)
    if args.experiment is None and args.sweep_id is None:
        p.error("give --experiment NAME or --sweep-id ID (or both)")
    return args


def tracking_uri(args: argparse.Namespace) -> str:
    """--tracking-uri, else the trainer's default: $MLFLOW_TRACKING_URI, else <runs root>/mlflow.db."""
    if args.tracking_uri:
        return args.tracking_uri
    from train.tracking import TrackingConfig, resolve_uri  # the trainer's rule, not a copy of it
    return resolve_uri(TrackingConfig(), args.runs_root)


def main(argv: list[str] | None = None) -> int:
    """`python -m study report ...`; returns the exit code (0, or 2 for bad input)."""
    args = parse_args(argv)
    # one short attempt per HTTP request: an unreachable server is a one-line error, not minutes
    # of MLflow's own retries (process-wide MLflow settings; this process only reports)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # we print the link
    try:
        return report(args)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def report(args: argparse.Namespace) -> int:
    """Read, write, publish and print where; raises StudyError for bad input."""
    uri = tracking_uri(args)
    client = open_store(uri)
    experiment, runs = find_runs(client, args.experiment, args.sweep_id)
    scope = Scope(name=args.sweep_id or experiment.name, experiment=experiment,
                  sweep_id=args.sweep_id, uri=uri)
    variants, strays = build_variants(runs)
    if all(v.run is None for v in variants):
        raise StudyError(f"none of the {len(runs)} runs of {scope.name!r} is a LIF variant "
                         "(no model.neuron.leak/reset/recurrence params)")
    out = args.out or args.runs_root / "study" / (re.sub(r"[^\w.-]+", "_", scope.name).strip("._")
                                                  or "report")
    rows = [v.row for v in variants]
    cols = columns(rows)
    found = findings(rows)

    from study.plots import write_plots  # matplotlib only once there is something to draw
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for stale in (out / "plots").glob("*.png"):  # figures an earlier report drew, now without data
        stale.unlink()
    plots = write_plots(rows, out / "plots")

    run_id = parent_run(client, scope)
    try:
        write_csv(rows, cols, out / "results.csv")
        write_text(out / "report.md", render_markdown(scope, variants, cols, found, plots, run_id,
                                                      len(strays)))
        nested = publish(client, run_id, scope, variants, found, out)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")

    count = {s: sum(v.row["status"] == s for v in variants) for s in ("ok", "failed", "missing")}
    print(f"report: {(out / 'report.md').resolve()} (results.csv and plots/ beside it)")
    print(f"variants: {count['ok']} ok, {count['failed']} failed, {count['missing']} missing "
          f"of {len(GRID)}" + ("; the others are listed in report.md" if count["ok"] < len(GRID) else ""))
    for finding in found:
        print(f"finding {finding.key}: {finding.verdict}"
              + ("" if finding.verdict == HOLDS else
                 f" ({', '.join(f'{c.key} {c.verdict}' for c in finding.claims)})"))
    # workflowType: MLflow 3's UI picks its GenAI or model-training view from the URL (else the
    # browser's last choice), not from the experiment's kind tag.
    ui = (f"; UI {uri.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs/{run_id}?workflowType=machine_learning"
          if uri.startswith(("http://", "https://")) else "")
    print(f"MLflow: parent run {run_id} in experiment {experiment.name!r} (id "
          f"{experiment.experiment_id}) at {uri}, {nested} variant runs nested under it{ui}")
    return 0
