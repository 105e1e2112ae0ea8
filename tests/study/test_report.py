"""`python -m study report` on a small SQLite MLflow store, and the verdict rules on hand-made rows."""
from __future__ import annotations

import contextlib
import csv
import io
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from study import __main__ as study_cli
from study import report
from study.findings import (DOES_NOT_HOLD, GRID, HOLDS, INCONCLUSIVE, combine, compare, leakage,
                            recurrence, reset, robust_top1, swept_columns, variant_name)

EXPERIMENT = "ablation"
SWEEP = "20250101-120000-ab12"
SIGMAS, EPS = (0, 0.05, 0.1, 0.2), (0, 0.01, 0.1)


def eval_metrics(top1: float, robust: float, firing_rate: float, stream: float) -> dict[str, float]:
    """What `python -m train.evaluate` logs for a variant on a temporal data set."""
    metrics = {"eval/val_top1": top1, "eval/val_top5": 1.0, "eval/val_loss": 0.5,
               "eval/train_top1": top1 + 0.05, "eval/generalization_gap": 0.05,
               "eval/firing_rate_mean": firing_rate, "eval/sparsity_mean": 1 - firing_rate,
               "eval/sops_per_image": 1e6 * firing_rate, "eval/energy_uj_per_image": 0.9 * firing_rate,
               "eval/stream_top1": stream}
    for s in SIGMAS:
        metrics[f"eval/noise_top1_{s:g}"] = top1 if s == 0 else robust
    for kind in ("fgsm", "pgd"):
        for e in EPS:
            metrics[f"eval/{kind}_top1_{e:g}"] = top1 if e == 0 else robust
    return metrics


def add_run(client: MlflowClient, exp_id: str, variant: tuple[bool, str, str] | None, *,
            metrics: dict[str, float] | None = None, status: str = "FINISHED",
            sweep_id: str | None = None, start: int = 0) -> str:
    """A training run as train/engine.py + train/tracking.py leave it (variant None: not a LIF run)."""
    tags = {"model": "spiking_resnet19_tdbn", "dataset": "seqdigits", "T": "4"}
    params = [Param("run.name", f"run-{start}")]
    if variant is not None:
        leak, rst, rec = variant
        tags["neuron"] = variant_name(leak, rst, rec)
        params += [Param("model.neuron.leak", str(leak)), Param("model.neuron.reset", rst),
                   Param("model.neuron.recurrence", rec)]
    if sweep_id:
        tags["sweep_id"] = sweep_id
    run = client.create_run(exp_id, start_time=1_700_000_000_000 + start, tags=tags,
                            run_name=f"run-{start}")
    client.log_batch(run.info.run_id, params=params,
                     metrics=[Metric(k, v, 0, 0) for k, v in (metrics or {}).items()])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@dataclass
class Store:
    root: Path
    uri: str
    client: MlflowClient
    exp_id: str
    children: dict[str, str]   # variant name -> the run the report must use
    superseded: str            # an older run of lif-reset_hard-rec_self
    stray: str                 # a run that is no LIF variant
    out: Path
    stdout: str


def run_report(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = report.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """Five evaluated variants (one run twice), one FAILED, one stray run; reported once."""
    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "mlartifacts").as_uri())
    lif_hard_self = (True, "hard", "self")
    superseded = add_run(client, exp_id, lif_hard_self, metrics=eval_metrics(0.5, 0.3, 0.1, 0.5), start=1)
    specs = {(True, "hard", "none"): eval_metrics(0.90, 0.60, 0.10, 0.80),
             (False, "hard", "none"): eval_metrics(0.91, 0.50, 0.11, 0.85),
             (True, "none", "none"): eval_metrics(0.85, 0.55, 0.30, 0.40),
             lif_hard_self: eval_metrics(0.93, 0.52, 0.12, 0.82),
             (False, "soft", "lateral"): eval_metrics(0.92, 0.45, 0.12, 0.86)}
    children = {variant_name(*v): add_run(client, exp_id, v, metrics=m, start=10 + i, sweep_id=SWEEP)
                for i, (v, m) in enumerate(specs.items())}
    children[variant_name(False, "none", "self")] = add_run(
        client, exp_id, (False, "none", "self"), status="FAILED", start=20, sweep_id=SWEEP)
    stray = add_run(client, exp_id, None, metrics={"eval/val_top1": 0.1}, start=30)
    out = root / "report-out"
    code, stdout, stderr = run_report(["--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", str(out)])
    assert code == 0, stderr
    return Store(root, uri, client, exp_id, children, superseded, stray, out, stdout)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def report_runs(store: Store) -> list:
    return store.client.search_runs([store.exp_id], "tags.`study.role` = 'report'")


def test_results_csv_has_every_variant_of_the_grid_in_order_with_a_column_per_grid_value(store):
    rows = read_csv(store.out / "results.csv")
    assert len(rows) == 18
    assert [(r["leak"], r["reset"], r["recurrence"]) for r in rows] == \
        [(str(l).lower(), s, c) for l, s, c in GRID]
    noise = [f"noise_top1_{s:g}" for s in SIGMAS]
    attacks = [f"{k}_top1_{e:g}" for k in ("fgsm", "pgd") for e in EPS]
    assert list(rows[0]) == ["leak", "reset", "recurrence", "status", "top1", "train_top1",
                             "generalization_gap", "firing_rate", "sops", "energy", *noise,
                             *attacks, "stream_top1"]
    by_name = {variant_name(r["leak"] == "true", r["reset"], r["recurrence"]): r for r in rows}
    ok = by_name["lif-reset_hard-rec_self"]
    assert ok["status"] == "ok"
    assert float(ok["top1"]) == 0.93  # the latest run of the variant, not the superseded one
    assert float(ok["pgd_top1_0.1"]) == 0.52 and float(ok["stream_top1"]) == 0.82
    assert float(ok["firing_rate"]) == 0.12 and float(ok["sops"]) == pytest.approx(1.2e5)


def test_failed_and_missing_variants_have_their_status_empty_cells_and_are_named_in_report_md(store):
    rows = {variant_name(r["leak"] == "true", r["reset"], r["recurrence"]): r
            for r in read_csv(store.out / "results.csv")}
    statuses = [r["status"] for r in rows.values()]
    assert statuses.count("ok") == 5 and statuses.count("failed") == 1 and statuses.count("missing") == 12
    failed = rows["if-reset_none-rec_self"]
    assert failed["status"] == "failed"
    assert all(v == "" for k, v in failed.items() if k not in ("leak", "reset", "recurrence", "status"))
    assert rows["lif-reset_soft-rec_none"]["status"] == "missing"
    md = (store.out / "report.md").read_text()
    section = md.split("## Failed or missing variants")[1].split("\n## ")[0]
    assert f"`if-reset_none-rec_self`: failed: run {store.children['if-reset_none-rec_self']}" in section
    assert "ended FAILED" in section
    for name, row in rows.items():
        assert (f"`{name}`" in section) == (row["status"] != "ok")
    assert "data set | seqdigits" in md and "spiking_resnet19_tdbn, T=4" in md
    assert "1 run(s) in scope are not variants" in md


def test_report_md_sets_each_finding_beside_the_measurements(store):
    md = (store.out / "report.md").read_text()
    # leak: robust 0.60/0.55/0.52 (lif) vs 0.50 (if) over the matched (hard, none) cell only
    assert "### 1. Leakage balances memory retention against robustness: **holds**" in md
    assert "| leak=true | 0.6 (1) | leak=false | 0.5 (1) | +0.1000 | holds |" in md
    # reset: stream 0.80 (hard) > 0.40 (none); firing 0.30 (none) > 0.10 (hard)
    assert "### 2. Reset is essential" in md and "sparsity)**: **holds**" not in md
    assert md.count("| holds |") >= 4
    assert "### 3. Recurrence adds capacity" in md
    assert "![attacks](plots/attacks.png)" in md


def test_plots_are_valid_pngs(store):
    names = {p.name for p in (store.out / "plots").iterdir()}
    expected = {"attacks.png", "noise.png", "firing_rate_vs_top1.png", "heatmap_top1.png",
                "heatmap_robust_top1.png", "heatmap_stream_top1.png", "heatmap_firing_rate.png",
                "heatmap_generalization_gap.png", "heatmap_sops.png", "heatmap_energy.png"}
    assert names == expected  # and no temporary files left behind
    for name in expected:
        with Image.open(store.out / "plots" / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
            image.verify()


def test_parent_run_holds_the_artifacts_and_verdicts_and_nests_exactly_the_variant_runs(store):
    [parent] = report_runs(store)
    assert parent.info.run_name == f"study-report-{EXPERIMENT}" and parent.info.status == "FINISHED"
    assert parent.data.tags["study.finding.leakage"] == HOLDS
    assert parent.data.tags["study.finding.leakage.robustness"] == HOLDS
    assert parent.data.metrics["study/variants_failed"] == 1
    top = {a.path for a in store.client.list_artifacts(parent.info.run_id)}
    assert top == {"results.csv", "report.md", "plots"}
    plots = {a.path for a in store.client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/attacks.png" in plots and "plots/heatmap_top1.png" in plots
    for name, run_id in store.children.items():
        assert store.client.get_run(run_id).data.tags.get("mlflow.parentRunId") == parent.info.run_id, name
    for run_id in (store.superseded, store.stray):
        assert "mlflow.parentRunId" not in store.client.get_run(run_id).data.tags
    assert f"parent run {parent.info.run_id}" in store.stdout and store.uri in store.stdout
    assert str((store.out / "report.md").resolve()) in store.stdout


def test_rerun_reuses_the_parent_run_and_unnests_a_replaced_variant_run(store):
    [first] = report_runs(store)
    replaced = store.children["lif-reset_none-rec_none"]
    newer = add_run(store.client, store.exp_id, (True, "none", "none"),
                    metrics=eval_metrics(0.86, 0.56, 0.31, 0.41), start=40)
    code, _, stderr = run_report(["--experiment", EXPERIMENT, "--tracking-uri", store.uri,
                                  "--out", str(store.out)])
    assert code == 0, stderr
    [again] = report_runs(store)
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    assert store.client.get_run(newer).data.tags["mlflow.parentRunId"] == first.info.run_id
    assert "mlflow.parentRunId" not in store.client.get_run(replaced).data.tags
    store.children["lif-reset_none-rec_none"] = newer


def test_sweep_id_reports_the_sweep_runs_in_the_default_store_and_directory(store, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert study_cli.main(["report", "--sweep-id", SWEEP, "--runs-root", str(store.root)]) == 0
    out = store.root / "study" / SWEEP
    rows = read_csv(out / "results.csv")
    assert sum(r["status"] == "ok" for r in rows) == 5  # the lif none/none rerun is not in the sweep
    sweep_parents = [r for r in report_runs(store) if r.data.tags.get("sweep_id") == SWEEP]
    assert len(sweep_parents) == 1
    assert sweep_parents[0].info.run_name == f"study-report-{SWEEP}"
    assert str((out / "report.md").resolve()) in capsys.readouterr().out


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


# --------------------------------------------------------------------------------------------
# Verdict rules on hand-made rows


def row(leak: bool, rst: str, rec: str, status: str = "ok", **metrics) -> dict:
    return {"leak": leak, "reset": rst, "recurrence": rec, "status": status, **metrics}


def test_swept_columns_sort_numerically_noise_then_fgsm_then_pgd():
    cols = ["pgd_top1_0.1", "fgsm_top1_10", "noise_top1_0.5", "fgsm_top1_2", "fgsm_top1_1e-05",
            "top1", "stream_top1", "pgd_top1_0"]
    assert swept_columns(cols) == ["noise_top1_0.5", "fgsm_top1_1e-05", "fgsm_top1_2", "fgsm_top1_10",
                                   "pgd_top1_0", "pgd_top1_0.1"]


def test_robust_accuracy_averages_the_nonzero_sigma_and_eps_only():
    r = row(True, "hard", "none", top1=0.9, noise_top1_0=0.9, **{"noise_top1_0.1": 0.6,
            "fgsm_top1_0": 0.9, "fgsm_top1_0.1": 0.5, "pgd_top1_0.1": 0.4, "pgd_top1_0.2": None})
    assert robust_top1(r) == pytest.approx(0.5)
    assert robust_top1(row(True, "hard", "none", top1=0.9)) is None


def test_a_claim_holds_fails_or_is_inconclusive_by_the_margin():
    def verdict(hi: float, lo: float) -> str:
        rows = [row(True, "hard", "none", top1=lo), row(True, "hard", "self", top1=hi)]
        return compare(rows, "recurrence", ["self"], ["none"], "top1", key="k", statement="s").verdict
    assert verdict(0.92, 0.90) == HOLDS
    assert verdict(0.90, 0.92) == DOES_NOT_HOLD
    assert verdict(0.905, 0.90) == INCONCLUSIVE


def test_a_claim_counts_only_ok_variants_matched_on_the_other_factors():
    rows = [row(True, "hard", "none", firing_rate=0.10), row(True, "none", "none", firing_rate=0.30),
            row(False, "soft", "self", firing_rate=0.01),       # no reset=none at (if, self)
            row(False, "none", "lateral", "failed"),            # failed: never counted
            row(False, "hard", "lateral", firing_rate=0.9)]     # its reset=none partner failed
    claim = compare(rows, "reset", ["none"], ["hard", "soft"], "firing_rate", key="k", statement="s")
    assert (claim.higher_mean, claim.lower_mean, claim.n_higher, claim.n_lower) == (0.30, 0.10, 1, 1)
    assert claim.verdict == HOLDS


def test_a_claim_without_an_ok_group_or_a_metric_is_inconclusive():
    rows = [row(True, "hard", "none", top1=0.9), row(False, "hard", "none", "failed")]
    claim = compare(rows, "leak", [False], [True], "top1", key="k", statement="s")
    assert claim.verdict == INCONCLUSIVE and "no ok leak=false variant has top1" in claim.reason
    rows = [row(True, "hard", "none", top1=0.9), row(False, "hard", "none", top1=0.8)]
    memory = leakage(rows).claims[1]
    assert memory.key == "memory" and memory.verdict == INCONCLUSIVE  # no stream_top1: static data


def test_findings_on_rows_that_agree_with_the_paper_hold():
    def r(leak, rst, rec, top1, robust, fr, stream):
        return row(leak, rst, rec, top1=top1, firing_rate=fr, stream_top1=stream,
                   **{"pgd_top1_0.1": robust, "noise_top1_0.1": robust})
    rows = [r(True, "hard", "none", 0.90, 0.60, 0.10, 0.80), r(False, "hard", "none", 0.90, 0.50, 0.10, 0.85),
            r(True, "none", "none", 0.88, 0.55, 0.30, 0.40), r(False, "none", "none", 0.88, 0.45, 0.35, 0.45),
            r(True, "hard", "self", 0.93, 0.55, 0.10, 0.82), r(False, "hard", "self", 0.93, 0.45, 0.10, 0.87),
            r(True, "none", "self", 0.91, 0.50, 0.30, 0.42), r(False, "none", "self", 0.91, 0.40, 0.35, 0.47)]
    assert [f.verdict for f in (leakage(rows), reset(rows), recurrence(rows))] == [HOLDS] * 3
    # recurrence that helps robustness contradicts finding 3
    flipped = [{**x, "pgd_top1_0.1": 0.9, "noise_top1_0.1": 0.9} if x["recurrence"] == "self" else x
               for x in rows]
    assert recurrence(flipped).verdict == DOES_NOT_HOLD


def test_a_finding_holds_only_when_every_claim_holds():
    assert combine([HOLDS, HOLDS]) == HOLDS
    assert combine([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([INCONCLUSIVE, DOES_NOT_HOLD, HOLDS]) == DOES_NOT_HOLD
    assert combine([]) == INCONCLUSIVE
