"""`python -m study report`: a study's runs as tables, verdicts with effects and intervals, plots.

    python -m study report --sweep-id study-digits --runs-root runs
    python -m study report --sweep-id study-digits --sweep-id study-xor --sweep-id study-mnist1d
    python -m study report --experiment ablation --tracking-uri http://127.0.0.1:5000

A sweep is one task: the runs tagged `sweep_id` (or every run of `--experiment`), each one variant
x seed, identified by its tags `variant` (study/grid.py names it) and `seed`; reports themselves
(tag `study.role=report`) and runs without those tags are left out. The grid is the one
`python -m study run` gives; read alone, it is the factors and levels and seeds the runs have,
so a variant with no run at any seed cannot be named here. For each sweep, into
`<out>/<sweep>/` (default out: `<runs root>/study/`), each file atomically:

    results.csv   one row per variant x seed: factors, seed, status ok | failed | missing, metrics
    summary.csv   one row per variant: n ok, and mean, std, 95 % CI (t over seeds) of every metric
    report.md     the paper's sentence beside each claim's verdict, effect, CI, p, Holm p and n pairs,
                  per-variant mean ± std, the failed or missing runs named, the plots
    plots/*.png   per-factor means with 95 % CI bands against sigma, eps, k, frame duration;
                  heat maps of the means; a forest plot of the claims' effects

With several sweeps, also `<out>/findings.md` and `findings.csv`: every claim x task, with the
p-values Holm-adjusted over all of them, and a forest plot. Each sweep's parent MLflow run (tag
`study.role=report`, reused by later reports) holds its files (and the cross-task ones) and nests
its variant x seed runs. A run is failed when it ended FAILED or KILLED or has no `eval/val_top1`.

Bad input (unknown experiment, a sweep id without runs, a store that does not exist or answer)
is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from study import atomic_path
from study.findings import DERIVED, FINDINGS, OURS, PAPER, Claim, decide, metric_value, swept_columns
from study.grid import parse_variant, variant_name
from study.stats import CONFIDENCE, holm, mean_ci
from train.config import STUDY_PRESETS

EXIT_USER_ERROR = 2
ROLE_TAG, ROLE = "study.role", "report"
PARENT_TAG = "mlflow.parentRunId"  # the tag the MLflow UI nests runs by
_FAILED_STATUSES = ("FAILED", "KILLED")
# eval.json names of the trainer -> the study's column names (the rest: `eval/` dropped)
RENAMED = {"eval/val_top1": "top1", "eval/firing_rate_mean": "firing_rate", "eval/sops_per_image": "sops",
           "eval/energy_uj_per_image": "energy"}
SUMMARY_METRICS = ("top1", "firing_rate", "robust_top1", "shift_top1", "stream_top1", "sharpness", "sops")
# The paper's levels of each factor (PAPER2.md); a variant with another level is ours.
PAPER_LEVELS = {"leak": {"normal", "none", "complete"}, "reset": {"hard", "none"}, "recurrence": {"none", "full"}}


class StudyError(Exception):
    """A problem the user fixes (experiment name, sweep id, store); the message says it all."""


@dataclass
class Grid:
    """factor -> levels in order, and the seeds; what the rows of a sweep are laid out by."""
    factors: dict[str, list[str]]
    seeds: list[int]

    def cells(self) -> list[tuple[str, dict[str, str]]]:
        """(variant name, {factor: level}) of every variant, the first factor varying slowest."""
        from itertools import product
        keys = list(self.factors)
        return [(variant_name(dict(zip(keys, p))), dict(zip(keys, p))) for p in product(*self.factors.values())]


@dataclass
class Task:
    """One sweep's rows and where they came from."""
    name: str                      # the sweep id or experiment name
    experiment: object             # mlflow.entities.Experiment
    sweep_id: str | None
    grid: Grid
    rows: list[dict]               # one per variant x seed, grid order, seed within variant
    runs: dict[tuple[str, int], object]   # (variant, seed) -> its latest run
    strays: int
    dataset: str = "unknown"
    claims: list[Claim] = field(default_factory=list)
    out: Path | None = None


# --------------------------------------------------------------------------------------------
# Reading the runs from MLflow


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


def cell_of(run) -> tuple[str, int, dict[str, str]] | None:
    """(variant, seed, {factor: level}) of a study run from its tags; None for any other run."""
    tags = run.data.tags
    try:
        return tags["variant"], int(tags["seed"]), parse_variant(tags["variant"])
    except (KeyError, ValueError):
        return None


def _ordered(factor: str, levels: set[str]) -> list[str]:
    """Levels in the extended preset's order (the paper's baseline first), others after, sorted."""
    order = next((v for k, v in STUDY_PRESETS["extended"].items() if k.rpartition(".")[2] == factor), [])
    return sorted(levels, key=lambda v: (order.index(v) if v in order else len(order), v))


def grid_of(cells: Sequence[dict[str, str]], seeds: set[int]) -> Grid:
    """The grid the runs span: each factor's levels seen (the paper's order first), the seeds seen."""
    factors: dict[str, set[str]] = {}
    for levels in cells:
        for k, v in levels.items():
            factors.setdefault(k, set()).add(v)
    return Grid({k: _ordered(k, v) for k, v in factors.items()}, sorted(seeds))


def metrics_row(run) -> dict[str, float]:
    """A run's `eval/...` metrics under the study's column names."""
    return {RENAMED.get(k, k[len("eval/"):]): v for k, v in run.data.metrics.items() if k.startswith("eval/")}


def why_not_ok(run) -> str:
    """Why a failed or missing run is not in the comparisons, in one sentence."""
    if run is None:
        return "missing: no run of this variant and seed"
    info = run.info
    which = f"run {info.run_id} ({info.run_name})"
    if info.status in _FAILED_STATUSES:
        return f"failed: {which} ended {info.status}"
    return f"failed: {which} ({info.status}) has no eval/val_top1; evaluate it with `python -m train.evaluate`"


def build_rows(runs: list, grid: Grid | None, exits: Mapping[tuple[str, int], int] | None = None
               ) -> tuple[Grid, list[dict], dict, int]:
    """(grid, rows in grid order, (variant, seed) -> latest run, number of runs that are no cell).
    `exits`: (variant, seed) -> the nonzero exit code `python -m study run` saw, for runs that may
    have failed before logging anything."""
    latest, strays, cells, seeds = {}, 0, [], set()
    for run in runs:  # newest first
        found = cell_of(run)
        if found is None:
            strays += 1
            continue
        variant, seed, levels = found
        latest.setdefault((variant, seed), run)
        cells.append(levels)
        seeds.add(seed)
    grid = grid or grid_of(cells, seeds)
    rows = []
    for variant, levels in grid.cells():
        for seed in grid.seeds:
            run = latest.get((variant, seed))
            row = {**levels, "variant": variant, "seed": seed}
            ok = run is not None and run.info.status not in _FAILED_STATUSES and "eval/val_top1" in run.data.metrics
            exit_code = (exits or {}).get((variant, seed))
            row["status"] = "ok" if ok else "missing" if run is None and exit_code is None else "failed"
            row["run_id"] = run.info.run_id if run is not None else ""
            if ok:
                row.update(metrics_row(run))
            elif run is None and exit_code is not None:
                row["reason"] = (f"failed: exited with code {exit_code} in `python -m study run` before it "
                                 "logged an MLflow run (its output says why)")
            else:
                row["reason"] = why_not_ok(run)
            rows.append(row)
    return grid, rows, latest, strays


# --------------------------------------------------------------------------------------------
# Tables


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (temporary file, then one rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_csv(rows: Sequence[Mapping], cols: Sequence[str], path: Path) -> Path:
    """A CSV with `cols`, empty cells where a value is missing."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in cols])
    return write_text(path, buffer.getvalue())


def metric_columns(rows: Sequence[Mapping], grid: Grid) -> list[str]:
    """The metric columns of results.csv: top1 and friends first, then the swept ones, then the rest."""
    fixed = {*grid.factors, "variant", "seed", "status", "run_id", "reason"}
    found = {c for r in rows for c, v in r.items() if c not in fixed and v is not None}
    swept = swept_columns(found)
    first = [c for c in SUMMARY_METRICS if c in found]
    return first + swept + sorted(found - set(first) - set(swept))


def summarise(rows: Sequence[Mapping], grid: Grid, metrics: Sequence[str]) -> tuple[list[dict], list[str]]:
    """summary.csv: one row per variant with n_ok / n_failed / n_missing and, per metric,
    `<m>_mean`, `<m>_std`, `<m>_ci_low`, `<m>_ci_high`, `<m>_n` over its ok seeds."""
    metrics = [m for m in (*[d for d in DERIVED if d not in metrics], *metrics)]
    out = []
    for variant, levels in grid.cells():
        mine = [r for r in rows if r["variant"] == variant]
        row = {**levels, "variant": variant, "protocol": variant_protocol(levels)}
        for s in ("ok", "failed", "missing"):
            row[f"n_{s}"] = sum(r["status"] == s for r in mine)
        for m in metrics:
            values = [v for r in mine if r["status"] == "ok" and (v := metric_value(r, m)) is not None]
            if values:
                row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_ci_low"], row[f"{m}_ci_high"] = mean_ci(values)
            row[f"{m}_n"] = len(values)
        out.append(row)
    present = [m for m in metrics if any(r[f"{m}_n"] for r in out)]
    cols = [*grid.factors, "variant", "protocol", "n_ok", "n_failed", "n_missing"]
    cols += [f"{m}_{s}" for m in present for s in ("mean", "std", "ci_low", "ci_high", "n")]
    return out, cols


def variant_protocol(levels: Mapping[str, str]) -> str:
    """PAPER when every level is one the paper varies (PAPER2.md), else OURS."""
    return PAPER if all(v in PAPER_LEVELS.get(k, ()) for k, v in levels.items()) else OURS


# --------------------------------------------------------------------------------------------
# Markdown


def _num(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def _effect(claim: Claim) -> tuple[str, str, str, str]:
    c = claim.comparison
    ci = "" if c.ci is None else f"[{c.ci[0]:+.4f}, {c.ci[1]:+.4f}]"
    return ("" if c.effect is None else f"{c.effect:+.4f}", ci, _num(c.p, 3), str(c.n))


def claims_table(claims: Sequence[Claim], adjusted: Mapping[int, float | None], *, task_column: bool = False) -> list[str]:
    """Markdown rows: one per claim with its verdict, effect, CI, p, Holm p and n pairs."""
    head = ("| task " if task_column else "") + "| finding | claim | protocol | verdict | effect | 95 % CI | p | Holm p | n pairs |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for claim in claims:
        effect, ci, p, n = _effect(claim)
        verdict = claim.verdict + (f" ({claim.comparison.reason})" if claim.comparison.reason else "")
        lines.append(("| " + claim.task + " " if task_column else "")
                     + f"| {claim.spec.finding} | {claim.spec.statement} ({claim.label}) | {claim.protocol} | "
                       f"**{verdict}** | {effect} | {ci} | {p} | {_num(adjusted.get(id(claim)), 3)} | {n} |")
    return lines


def _tags(task: Task, tag: str) -> str:
    found = sorted({r.data.tags[tag] for r in task.runs.values() if tag in r.data.tags})
    return found[0] if len(found) == 1 else ("unknown" if not found else f"mixed: {', '.join(found)}")


STATISTICS = ("A claim compares runs matched on every other factor of the grid and on the seed (pairs); "
              "the effect is the mean paired difference (expected-higher minus expected-lower, metric "
              "units), its 95 % CI a seeded percentile bootstrap (9999 resamples), p a two-sided sign-flip "
              "permutation test (exact up to 13 pairs). Holds: CI above 0; does not hold: CI below 0; "
              "inconclusive: the CI contains 0, or fewer than 3 pairs. Holm p: Holm-Bonferroni over every claim "
              "of this report (every task of a cross-task report); a claim holds for the family only "
              "when its Holm p is below 0.05 too. Protocol `paper`: the paper's claim on a task it "
              "decides it on (../shared/PAPER2.md); `ours`: our extension or another task.")


def render_task(task: Task, metrics: Sequence[str], summary: Sequence[Mapping], plots: list[Path],
                parent_run_id: str, uri: str, adjusted: Mapping[int, float | None]) -> str:
    """report.md of one task."""
    rows = task.rows
    count = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "missing")}
    grid = task.grid
    lines = [f"# Functional roles of LIF components: {task.name}", "",
             "Yin et al. 2024, \"Understanding the Functional Roles of Modelling Components in Spiking "
             "Neural Networks\" (arXiv 2403.16674): each variant x seed trained and evaluated as its own "
             "MLflow run; verdicts from paired comparisons over seeds.", "",
             "| | |", "|---|---|",
             f"| task (data set) | {task.dataset} |",
             f"| model | {_tags(task, 'model')}, T={_tags(task, 'T')} |",
             f"| experiment | `{task.experiment.name}` (id {task.experiment.experiment_id}) |"]
    if task.sweep_id:
        lines.append(f"| sweep | `{task.sweep_id}` |")
    axes = " x ".join(f"{k} [{', '.join(v)}]" for k, v in grid.factors.items())
    lines += [f"| grid | {axes} = {len(grid.cells())} variants |",
              f"| seeds | {', '.join(map(str, grid.seeds))} |",
              f"| runs | {count['ok']} ok, {count['failed']} failed, {count['missing']} missing, of {len(rows)} |",
              f"| tracking | `{uri}`, parent run `{parent_run_id}` (runs nested under it) |",
              f"| written | {time.strftime('%Y-%m-%d %H:%M:%S %Z')} |", ""]
    paper_variants = [s["variant"] for s in summary if s["protocol"] == PAPER]
    lines += [f"Rows of the paper's protocol: the {len(paper_variants)} variants whose every level is one "
              "the paper varies (leak normal/none/complete, reset hard/none, recurrence none/full); the "
              "others are ours (`protocol` column).", ""]
    if task.strays:
        lines += [f"{task.strays} run(s) in scope are no study run (no `variant` and `seed` tags) and "
                  "are not counted.", ""]

    lines += ["## The paper's findings beside this task", "", STATISTICS, ""]
    if task.claims:
        lines += claims_table(task.claims, adjusted) + [""]
        lines += ["The paper's sentences:", ""]
        seen = set()
        for claim in task.claims:
            if claim.spec.sentence and claim.spec.key not in seen:
                seen.add(claim.spec.key)
                lines.append(f"- {claim.spec.key}: \"{claim.spec.sentence}\"")
        lines.append("")
    else:
        lines += ["No claim can be tested on this grid (each compares two levels of one factor).", ""]

    show = [m for m in SUMMARY_METRICS if any(s.get(f"{m}_n") for s in summary)]
    lines += ["## Per variant (mean ± std over ok seeds, n)", "",
              "Accuracies are fractions; firing_rate spikes per neuron per step; sops per sample; "
              + "; ".join(f"{k}: {v}" for k, v in DERIVED.items()) + ". Every metric, with its 95 % "
              "CI (t over seeds), is in `summary.csv`; every run in `results.csv`.", "",
              "| variant | protocol | ok/runs | " + " | ".join(show) + " |",
              "|---|---|---|" + "---:|" * len(show)]
    for s in summary:
        cells = []
        for m in show:
            mean, std = s.get(f"{m}_mean"), s.get(f"{m}_std")
            cells.append("" if mean is None else f"{mean:.4g} ± {std:.2g} ({s[f'{m}_n']})")
        total = s["n_ok"] + s["n_failed"] + s["n_missing"]
        lines.append(f"| {s['variant']} | {s['protocol']} | {s['n_ok']}/{total} | " + " | ".join(cells) + " |")

    lines += ["", "## Failed or missing runs", ""]
    not_ok = [r for r in rows if r["status"] != "ok"]
    lines += [f"- `{r['variant']}` seed {r['seed']}: {r['reason']}" for r in not_ok] or \
             [f"None: all {len(rows)} runs are ok."]
    if not_ok:
        lines += ["", "They are left out of every comparison: a pair needs both of its runs."]
    lines += ["", "## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots] or ["No run has data to plot."]
    return "\n".join(lines) + "\n"


def render_cross_task(tasks: Sequence[Task], adjusted: Mapping[int, float | None], forest: Path | None) -> str:
    """findings.md: one table of claims x tasks, then every claim in full."""
    names = [t.name for t in tasks]
    keys = list(dict.fromkeys(c.spec.key for t in tasks for c in t.claims))
    by = {(c.spec.key, t.name): c for t in tasks for c in t.claims}
    lines = ["# Functional roles across tasks", "",
             "The paper finds the effects largest on temporal tasks, then spatio-temporal, then spatial; "
             "this table shows, per claim and task, the verdict and the effect with its 95 % CI, p "
             "(Holm-adjusted over every cell) and n pairs. `(paper)` marks a cell of the paper's protocol.", "",
             STATISTICS, "",
             "| claim | " + " | ".join(f"{n} ({t.dataset})" for n, t in zip(names, tasks)) + " |",
             "|---|" + "---|" * len(names)]
    for key in keys:
        cells = []
        for name in names:
            c = by.get((key, name))
            if c is None:
                cells.append("not in this grid")
                continue
            effect, ci, _, n = _effect(c)
            mark = " (paper)" if c.protocol == PAPER else ""
            cells.append(f"**{c.verdict}**{mark} {effect} {ci} p={_num(adjusted.get(id(c)), 3)} n={n}"
                         if c.comparison.effect is not None else f"{c.verdict}: {c.comparison.reason}")
        spec = next(c.spec for t in tasks for c in t.claims if c.spec.key == key)
        lines.append(f"| {key} ({spec.source}) | " + " | ".join(cells) + " |")
    lines += ["", "## Every claim", ""]
    lines += claims_table([c for t in tasks for c in t.claims], adjusted, task_column=True)
    lines += ["", "## Findings", ""] + [f"- {k}: {v}" for k, v in FINDINGS.items()]
    lines += ["", "Per-task reports: " + ", ".join(f"[{t.name}]({t.name}/report.md)" for t in tasks)]
    if forest:
        lines += ["", f"![forest]({forest.name})"]
    return "\n".join(lines) + "\n"


def claims_rows(tasks: Sequence[Task], adjusted: Mapping[int, float | None]) -> list[dict]:
    """findings.csv / claims.csv: one row per claim of each task."""
    out = []
    for t, c in ((t, c) for t in tasks for c in t.claims):
        comp = c.comparison
        out.append({"sweep": t.name, "task": c.task, "claim": c.spec.key, "finding": c.spec.finding, "source": c.spec.source,
                    "protocol": c.protocol, "metric": c.spec.metric, "factor": c.spec.factor,
                    "higher": "/".join(c.spec.higher), "lower": "/".join(c.spec.lower), "verdict": c.verdict,
                    "effect": comp.effect, "ci_low": comp.ci[0] if comp.ci else None,
                    "ci_high": comp.ci[1] if comp.ci else None, "p": comp.p, "p_holm": adjusted.get(id(c)),
                    "n_pairs": comp.n, "reason": comp.reason})
    return out


CLAIM_COLUMNS = ("sweep", "task", "claim", "finding", "source", "protocol", "metric", "factor", "higher", "lower",
                 "verdict", "effect", "ci_low", "ci_high", "p", "p_holm", "n_pairs", "reason")


# --------------------------------------------------------------------------------------------
# The parent run


def parent_run(client, task: Task) -> str:
    """The report run of this experiment or sweep, reopened; created on the first report."""
    reports = _search(client, [task.experiment.experiment_id], f"tags.`{ROLE_TAG}` = '{ROLE}'")
    mine = [r for r in reports if r.data.tags.get("sweep_id") == task.sweep_id]
    if mine:
        run_id = mine[0].info.run_id  # newest first
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {ROLE_TAG: ROLE, **({"sweep_id": task.sweep_id} if task.sweep_id else {})}
    return client.create_run(task.experiment.experiment_id, tags=tags,
                             run_name=f"study-report-{task.name}").info.run_id


def publish(client, run_id: str, task: Task, files: Sequence[Path]) -> int:
    """Log the verdicts, counts and files to the parent run and nest the task's runs under it
    (un-nesting runs a newer run of their cell replaced). Returns how many runs are nested."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    tags = [RunTag(f"study.claim.{c.spec.key}", c.verdict) for c in task.claims]
    metrics = [Metric(f"study/runs_{s}", sum(r["status"] == s for r in task.rows), now, 0)
               for s in ("ok", "failed", "missing")]
    metrics += [Metric(f"study/{c.spec.key}.effect", c.comparison.effect, now, 0)
                for c in task.claims if c.comparison.effect is not None]
    client.log_batch(run_id, metrics=metrics, tags=tags)
    children = {run.info.run_id for run in task.runs.values()}
    for child in children:
        client.set_tag(child, PARENT_TAG, run_id)
    for run in _search(client, [task.experiment.experiment_id], f"tags.`{PARENT_TAG}` = '{run_id}'"):
        if run.info.run_id not in children:
            client.delete_tag(run.info.run_id, PARENT_TAG)
    for path in files:
        if path.is_dir():
            if any(path.glob("*.png")):
                client.log_artifacts(run_id, str(path), path.name)
        else:
            client.log_artifact(run_id, str(path), None if path.parent == task.out else "cross_task")
    return len(children)


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The report's options; exits 2 (argparse) when neither --experiment nor --sweep-id is given."""
    p = argparse.ArgumentParser(prog="python -m study report", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:5]))
    p.add_argument("--experiment", help="MLflow experiment of the runs (e.g. ablation)")
    p.add_argument("--sweep-id", action="append", default=[],
                   help="a sweep (one task): the sweep_id tag of its runs; repeat for a cross-task report")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else the embedded store <runs root>/mlflow.db)")
    p.add_argument("--runs-root", type=Path, default=Path("runs"),
                   help="the runs directory (run.root of the sweep; default: runs)")
    p.add_argument("--out", type=Path, help="output directory (default: <runs root>/study)")
    args = p.parse_args(argv)
    if args.experiment is None and not args.sweep_id:
        p.error("give --experiment NAME or --sweep-id ID (or both)")
    return args


def tracking_uri(args: argparse.Namespace) -> str:
    """--tracking-uri, else the trainer's default: $MLFLOW_TRACKING_URI, else <runs root>/mlflow.db."""
    if args.tracking_uri:
        return args.tracking_uri
    from train.tracking import TrackingConfig, resolve_uri  # the trainer's rule, not a copy of it
    return resolve_uri(TrackingConfig(), args.runs_root)


def main(argv: list[str] | None = None, grids: Mapping[str, Grid] | None = None,
         exits: Mapping[str, Mapping[tuple[str, int], int]] | None = None) -> int:
    """`python -m study report ...`; returns the exit code (0, or 2 for bad input). `grids`:
    sweep id -> the grid `python -m study run` gave it (else each grid is read from its runs);
    `exits`: sweep id -> {(variant, seed): nonzero exit code} of the runs it saw fail."""
    args = parse_args(argv)
    # one short attempt per HTTP request: an unreachable server is a one-line error, not minutes
    # of MLflow's own retries (process-wide MLflow settings; this process only reports)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # we print the link
    try:
        return report(args, grids or {}, exits or {})
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def _dirname(name: str) -> str:
    return re.sub(r"[^\w.=,-]+", "_", name).strip("._") or "report"


def load_task(client, experiment: str | None, sweep_id: str | None, grid: Grid | None,
              exits: Mapping[tuple[str, int], int] | None = None) -> Task:
    exp, runs = find_runs(client, experiment, sweep_id)
    grid, rows, latest, strays = build_rows(runs, grid, exits)
    if not latest:
        raise StudyError(f"none of the {len(runs)} runs of {sweep_id or experiment!r} is a study run "
                         "(no `variant` and `seed` tags); train them with `python -m study run`")
    task = Task(sweep_id or exp.name, exp, sweep_id, grid, rows, latest, strays)
    task.dataset = _tags(task, "dataset")
    task.claims = decide(rows, grid.factors, task.dataset)
    return task


def report(args: argparse.Namespace, grids: Mapping[str, Grid], exits: Mapping[str, Mapping]) -> int:
    """Read, write, publish and print where; raises StudyError for bad input."""
    uri = tracking_uri(args)
    client = open_store(uri)
    scopes = args.sweep_id or [None]
    tasks = [load_task(client, args.experiment, s, grids.get(s), exits.get(s)) for s in scopes]
    out = args.out or args.runs_root / "study"
    every = [c for t in tasks for c in t.claims]
    adjusted = dict(zip(map(id, every), holm([c.comparison.p for c in every])))

    from study import plots  # matplotlib only once there is something to draw
    cross: list[Path] = []
    if len(tasks) > 1:
        forest = plots.plot_forest(every, out / "forest.png", adjusted)
        write_csv(claims_rows(tasks, adjusted), CLAIM_COLUMNS, out / "findings.csv")
        cross = [write_text(out / "findings.md", render_cross_task(tasks, adjusted, forest)), out / "findings.csv"]
        cross += [forest] if forest else []
    for task in tasks:
        task.out = out / _dirname(task.name)
        metrics = metric_columns(task.rows, task.grid)
        summary, summary_cols = summarise(task.rows, task.grid, metrics)
        plot_dir = task.out / "plots"
        plot_dir.mkdir(parents=True, exist_ok=True)
        for stale in plot_dir.glob("*.png"):  # figures an earlier report drew, now without data
            stale.unlink()
        drawn = plots.write_plots(task.rows, task.grid.factors, summary, task.claims, plot_dir, adjusted)
        run_id = parent_run(client, task)
        try:
            base = [*task.grid.factors, "variant", "seed", "status"]
            write_csv(task.rows, [*base, *metrics, "run_id", "reason"], task.out / "results.csv")
            write_csv(summary, summary_cols, task.out / "summary.csv")
            write_csv(claims_rows([task], adjusted), CLAIM_COLUMNS, task.out / "claims.csv")
            write_text(task.out / "report.md", render_task(task, metrics, summary, drawn, run_id, uri, adjusted))
            files = [task.out / n for n in ("results.csv", "summary.csv", "claims.csv", "report.md")]
            nested = publish(client, run_id, task, [*files, plot_dir, *cross])
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        count = {s: sum(r["status"] == s for r in task.rows) for s in ("ok", "failed", "missing")}
        print(f"report {task.name}: {(task.out / 'report.md').resolve()} (results.csv, summary.csv, plots/ beside it)")
        print(f"  runs: {count['ok']} ok, {count['failed']} failed, {count['missing']} missing of {len(task.rows)}"
              + ("; named in report.md" if count["ok"] < len(task.rows) else ""))
        for c in task.claims:
            print(f"  {c.spec.key} ({c.protocol}): {c.verdict}"
                  + (f", effect {c.comparison.effect:+.4f}" if c.comparison.effect is not None else "")
                  + (f" [{c.comparison.ci[0]:+.4f}, {c.comparison.ci[1]:+.4f}]" if c.comparison.ci else "")
                  + (f", p {c.comparison.p:.3g}" if c.comparison.p is not None else "")
                  + f", n {c.comparison.n}" + (f" ({c.comparison.reason})" if c.comparison.reason else ""))
        # workflowType: MLflow 3's UI picks its GenAI or model-training view from the URL
        exp = task.experiment
        ui = (f"; UI {uri.rstrip('/')}/#/experiments/{exp.experiment_id}/runs/{run_id}?workflowType=machine_learning"
              if uri.startswith(("http://", "https://")) else "")
        print(f"  MLflow: parent run {run_id} in experiment {exp.name!r} (id {exp.experiment_id}) at {uri}, "
              f"{nested} runs nested under it{ui}")
    if cross:
        print(f"cross-task report: {cross[0].resolve()}")
    return 0
