"""`python -m study report` on a small SQLite MLflow store: two tasks of leak x reset x 3 seeds."""
from __future__ import annotations

import contextlib
import csv
import io
import itertools
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from study import __main__ as study_cli
from study import report
from study.grid import parse_variant, variant_name
from study.stats import HOLDS

EXPERIMENT = "ablation"
SWEEPS = {"sweep-xor": "delayed_xor", "sweep-digits": "digits"}
LEAKS, RESETS, SEEDS = ("normal", "none"), ("hard", "none"), (0, 1, 2)
EPS = (0, 0.05, 0.1)


def eval_metrics(top1: float, robust: float, firing_rate: float) -> dict[str, float]:
    """What `python -m train.evaluate` logs for a run."""
    metrics = {"eval/val_top1": top1, "eval/val_loss": 0.5, "eval/train_top1": top1 + 0.05,
               "eval/firing_rate_mean": firing_rate, "eval/sops_per_image": 1e6 * firing_rate}
    for e in EPS:
        metrics[f"eval/pgd_top1_{e:g}"] = top1 if e == 0 else robust
        metrics[f"eval/worst_top1_{e:g}"] = top1 if e == 0 else robust - 0.05
    return metrics


def add_run(client: MlflowClient, exp_id: str, sweep: str, leak: str | None, reset: str | None, seed: int, *,
            metrics: dict | None = None, status: str = "FINISHED", start: int = 0) -> str:
    """A run as `python -m study run` leaves it (leak None: a run of no study)."""
    tags = {"model": "spiking_mlp", "dataset": SWEEPS[sweep], "T": "8", "sweep_id": sweep}
    if leak is not None:
        tags |= {"variant": variant_name({"model.neuron.leak": leak, "model.neuron.reset": reset}), "seed": str(seed)}
    run = client.create_run(exp_id, start_time=1_700_000_000_000 + start, tags=tags, run_name=f"run-{start}")
    client.log_batch(run.info.run_id, params=[Param("run.seed", str(seed))],
                     metrics=[Metric(k, v, 0, 0) for k, v in (metrics or {}).items()])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@dataclass
class Store:
    root: Path
    uri: str
    client: MlflowClient
    exp_id: str
    runs: dict[tuple[str, str, str, int], str]   # (sweep, leak, reset, seed) -> the run the report uses
    superseded: str
    stray: str
    out: Path
    stdout: str


def run_report(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = report.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """Both tasks: no leak +0.1 top1 on every seed, no reset fires 3x; on the XOR task, leak none
    reset none seed 2 FAILED and leak normal reset none seed 1 has no run; plus an older run of one
    cell and a stray run."""
    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "mlartifacts").as_uri())
    superseded = add_run(client, exp_id, "sweep-xor", "normal", "hard", 0, metrics=eval_metrics(0.1, 0.1, 0.1), start=1)
    runs, start = {}, 10
    for sweep, leak, reset, seed in itertools.product(SWEEPS, LEAKS, RESETS, SEEDS):
        start += 1
        if (sweep, leak, reset, seed) == ("sweep-xor", "normal", "none", 1):
            continue  # missing
        failed = (sweep, leak, reset, seed) == ("sweep-xor", "none", "none", 2)
        top1 = 0.7 + 0.02 * seed + (0.1 if leak == "none" else 0)
        runs[sweep, leak, reset, seed] = add_run(
            client, exp_id, sweep, leak, reset, seed, start=start, status="FAILED" if failed else "FINISHED",
            metrics=None if failed else eval_metrics(top1, top1 - 0.3, 0.3 if reset == "none" else 0.1))
    stray = add_run(client, exp_id, "sweep-xor", None, None, 0, metrics={"eval/val_top1": 0.1}, start=100)
    out = root / "report-out"
    code, stdout, stderr = run_report(["--sweep-id", "sweep-xor", "--sweep-id", "sweep-digits",
                                       "--tracking-uri", uri, "--out", str(out)])
    assert code == 0, stderr
    return Store(root, uri, client, exp_id, runs, superseded, stray, out, stdout)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def report_runs(store: Store) -> list:
    return store.client.search_runs([store.exp_id], "tags.`study.role` = 'report'")


def test_variant_names_round_trip():
    name = variant_name({"model.neuron.leak": "complete", "model.neuron.recurrence": "full"})
    assert name == "leak=complete,recurrence=full"
    assert parse_variant(name) == {"leak": "complete", "recurrence": "full"}
    with pytest.raises(ValueError):
        parse_variant("leak_normal-reset_hard")


def test_results_csv_has_one_row_per_variant_and_seed_with_the_latest_run(store):
    rows = read_csv(store.out / "sweep-xor" / "results.csv")
    assert [(r["leak"], r["reset"], r["seed"]) for r in rows] == \
        [(l, s, str(seed)) for l, s, seed in itertools.product(LEAKS, RESETS, SEEDS)]
    assert list(rows[0])[:8] == ["leak", "reset", "variant", "seed", "status", "top1", "firing_rate", "sops"]
    assert list(rows[0])[-2:] == ["run_id", "reason"]
    first = rows[0]
    assert first["status"] == "ok" and first["run_id"] == store.runs["sweep-xor", "normal", "hard", 0]
    assert float(first["top1"]) == pytest.approx(0.7)  # the latest run of the cell, not the superseded one
    assert float(first["pgd_top1_0.1"]) == pytest.approx(0.4) and float(first["worst_top1_0.1"]) == pytest.approx(0.35)
    status = {(r["leak"], r["reset"], r["seed"]): r["status"] for r in rows}
    assert status["none", "none", "2"] == "failed" and status["normal", "none", "1"] == "missing"
    assert list(status.values()).count("ok") == 10


def test_summary_csv_has_mean_std_ci_and_n_per_variant(store):
    summary = {r["variant"]: r for r in read_csv(store.out / "sweep-xor" / "summary.csv")}
    assert list(summary) == ["leak=normal,reset=hard", "leak=normal,reset=none", "leak=none,reset=hard",
                             "leak=none,reset=none"]
    s = summary["leak=normal,reset=hard"]
    assert (s["n_ok"], s["top1_n"], s["protocol"]) == ("3", "3", "paper")
    assert float(s["top1_mean"]) == pytest.approx(0.72) and float(s["top1_std"]) == pytest.approx(0.02)
    half = 4.302652729911275 * 0.02 / 3 ** 0.5  # t(0.975, 2) * s / sqrt(n)
    assert float(s["top1_ci_low"]) == pytest.approx(0.72 - half) and float(s["top1_ci_high"]) == pytest.approx(0.72 + half)
    assert float(s["robust_top1_mean"]) == pytest.approx(0.37)  # worst case over attacks, not PGD alone
    assert summary["leak=none,reset=none"]["n_failed"] == "1"


def test_report_md_quotes_the_paper_beside_each_verdict_and_names_failed_and_missing_runs(store):
    md = (store.out / "sweep-xor" / "report.md").read_text()
    claim = next(line for line in md.splitlines() if "no leak (IF) remembers better" in line)
    # leak none - normal: +0.1 on 4 pairs (3 at reset hard; at reset none seed 1 is missing, seed 2 failed)
    assert "| paper | **holds** | +0.1000 | [+0.1000, +0.1000] |" in claim and claim.endswith("| 4 |")
    assert "a higher leak (smaller k_tau) makes long-term retention hard" in md
    assert "Holm-Bonferroni" in md and "task (data set) | delayed_xor" in md
    section = md.split("## Failed or missing runs")[1].split("\n## ")[0]
    failed = store.runs["sweep-xor", "none", "none", 2]
    assert f"- `leak=none,reset=none` seed 2: failed: run {failed}" in section and "ended FAILED" in section
    assert "- `leak=normal,reset=none` seed 1: missing" in section
    assert section.count("\n- ") == 2
    assert "| leak=normal,reset=hard | paper | 3/3 | 0.72 ± 0.02 (3)" in md
    assert "1 run(s) in scope are no study run" in md


def test_cross_task_table_has_every_claim_by_task_with_holm_adjusted_p(store):
    md = (store.out / "findings.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| leakage.memory_none_normal"))
    cells = row.split("|")[2:4]
    assert "**holds** (paper)" in cells[0] and "n=4" in cells[0]
    assert "**holds**" in cells[1] and "(paper)" not in cells[1] and "n=6" in cells[1]  # digits: ours
    claims = read_csv(store.out / "findings.csv")
    assert {(r["sweep"], r["task"]) for r in claims} == set(SWEEPS.items())
    p = [float(r["p"]) for r in claims if r["p"]]
    holm = [float(r["p_holm"]) for r in claims if r["p_holm"]]
    assert all(h >= q for h, q in zip(holm, p)) and max(holm) <= 1


def test_plots_are_valid_pngs(store):
    names = {p.name for p in (store.out / "sweep-xor" / "plots").iterdir()}
    assert {"curves.png", "forest.png", "heatmap_top1.png", "heatmap_robust_top1.png",
            "heatmap_firing_rate.png"} <= names and all(n.endswith(".png") for n in names)
    for path in [*(store.out / "sweep-xor" / "plots").iterdir(), store.out / "forest.png"]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100
            image.verify()


def test_parent_run_holds_the_files_and_verdicts_and_nests_exactly_the_study_runs(store):
    parents = {r.data.tags["sweep_id"]: r for r in report_runs(store)}
    assert set(parents) == set(SWEEPS)
    parent = parents["sweep-xor"]
    assert parent.info.status == "FINISHED" and parent.data.tags["study.claim.reset.firing"] == HOLDS
    assert parent.data.metrics["study/runs_failed"] == 1 and parent.data.metrics["study/runs_missing"] == 1
    top = {a.path for a in store.client.list_artifacts(parent.info.run_id)}
    assert top == {"results.csv", "summary.csv", "claims.csv", "report.md", "plots", "cross_task"}
    assert "plots/forest.png" in {a.path for a in store.client.list_artifacts(parent.info.run_id, "plots")}
    assert "cross_task/findings.md" in {a.path for a in store.client.list_artifacts(parent.info.run_id, "cross_task")}
    for (sweep, *_), run_id in store.runs.items():
        assert store.client.get_run(run_id).data.tags.get("mlflow.parentRunId") == parents[sweep].info.run_id
    for run_id in (store.superseded, store.stray):
        assert "mlflow.parentRunId" not in store.client.get_run(run_id).data.tags
    assert f"parent run {parent.info.run_id}" in store.stdout and "cross-task report:" in store.stdout


def test_rerun_reuses_the_parent_run(store):
    before = {r.info.run_id for r in report_runs(store)}
    code, _, stderr = run_report(["--sweep-id", "sweep-xor", "--tracking-uri", store.uri, "--out", str(store.out)])
    assert code == 0, stderr
    assert {r.info.run_id for r in report_runs(store)} == before


@pytest.mark.parametrize("argv, message", [
    (["--experiment", "nope"], "no experiment 'nope' in this store (it has: "),
    (["--sweep-id", "no-such-sweep"], "no runs tagged sweep_id=no-such-sweep in any experiment"),
    (["--experiment", EXPERIMENT, "--sweep-id", "x'y"], "--sweep-id \"x'y\": a sweep id has no quotes"),
])
def test_bad_experiment_or_sweep_is_one_line_and_exit_code_2(store, argv, message):
    code, stdout, stderr = run_report([*argv, "--tracking-uri", store.uri])
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"error: {message}") and stderr.count("\n") == 1


def test_a_store_that_does_not_exist_or_answer_is_one_line_and_exit_code_2(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    code, _, stderr = run_report(["--experiment", EXPERIMENT, "--tracking-uri",
                                  f"sqlite:///{tmp_path}/none/mlflow.db"])
    assert code == 2 and stderr.startswith("error: no MLflow store at ") and stderr.count("\n") == 1
    assert not (tmp_path / "none").exists()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    code, _, stderr = run_report(["--experiment", EXPERIMENT, "--tracking-uri", f"http://127.0.0.1:{port}"])
    assert code == 2 and stderr.startswith("error: cannot read the MLflow store at ")
    assert stderr.count("\n") == 1


def test_cli_dispatches_report_and_passes_its_arguments_on(store, capsys):
    assert study_cli.main(["report", "--experiment", "nope", "--tracking-uri", store.uri]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        study_cli.main(["report"])
    assert e.value.code == 2 and "--experiment NAME or --sweep-id ID" in capsys.readouterr().err
