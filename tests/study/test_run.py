"""`python -m study run`: every variant x seed of a config trained, evaluated and reported in one
command, a failed seed named, and a rerun that trains nothing it has."""
import csv
import json

import pytest

from tests.train.trainrun import run_module

pytestmark = pytest.mark.slow  # runs the study


def study_run(*args):
    return run_module("study", "run", *args, timeout=900)


def test_two_variants_by_two_seeds_train_report_name_a_failed_seed_and_resume(seqdigits_dir, tmp_path):
    grid = tmp_path / "grid.yaml"  # 2 variants x 2 seeds keep the test short
    grid.write_text("study:\n  preset: custom\n  grid:\n    model.neuron.reset: [hard, none]\n  seeds: 2\n")
    root = tmp_path / "runs"
    # seed 1 of reset=none fails: its run directory's place is taken by a file
    root.mkdir()
    (root / "study-seqdigits-reset=none-seed1").write_text("not a directory")
    args = ["--config", "configs/study_seqdigits.yaml", "--config", str(grid), f"data.path={seqdigits_dir}",
            f"run.root={root}", "optim.epochs=1", "eval.epsilons=[0,0.1]", "eval.pgd_steps=2",
            "eval.noise_sigmas=[0,0.2]"]
    done = study_run(*args)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # one run failed
    assert "failed: study-seqdigits-reset=none-seed1" in done.stdout
    metrics = json.loads((root / "study-seqdigits-reset=hard-seed1" / "eval.json").read_text())["metrics"]
    assert 0 <= metrics["eval/stream_top1"] <= 1 and "eval/pgd_top1_0.1" in metrics

    out = root / "study" / "study-seqdigits"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["reset"], r["seed"], r["status"]) for r in rows] == \
        [("hard", "0", "ok"), ("hard", "1", "ok"), ("none", "0", "ok"), ("none", "1", "failed")]
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert [(s["variant"], s["n_ok"], s["top1_n"]) for s in summary] == [("reset=hard", "2", "2"), ("reset=none", "1", "1")]
    md = (out / "report.md").read_text()
    assert "- `reset=none` seed 1: failed: exited with code" in md
    assert "too few pairs (1 < 3)" in md  # reset none vs hard: one pair (seed 0)
    assert "report study-seqdigits:" in done.stdout and "MLflow: parent run" in done.stdout

    (root / "study-seqdigits-reset=none-seed1").unlink()
    again = study_run(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # the three finished runs are neither trained nor evaluated again; only the failed one trains
    assert again.stdout.count("run already complete") == 3 and again.stdout.count("is up to date") == 3
    assert again.stdout.count("evaluated ") == 1
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["status"] for r in rows] == ["ok"] * 4


def test_a_bad_grid_value_stops_before_anything_runs(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("study:\n  preset: custom\n  grid:\n    model.neuron.reset: [hard, sideways]\n")
    done = study_run("--config", "configs/study_seqdigits.yaml", "--config", str(grid), f"run.root={tmp_path}")
    assert done.returncode == 2 and "model.neuron.reset" in done.stderr and "sideways" in done.stderr
    assert not (tmp_path / "mlflow.db").exists()
