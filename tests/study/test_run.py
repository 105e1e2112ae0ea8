"""`python -m study run`: the grid of a config trained, evaluated and reported in one command, and
a rerun resumes what is done instead of training again."""
import csv
import json

import pytest

from tests.train.trainrun import run_module

pytestmark = pytest.mark.slow  # runs the study


@pytest.fixture(scope="module")
def seqdigits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "seqdigits"
    built = run_module("data_pipelines.build", "seqdigits", "--out", str(out), timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    return out


def study_run(*args):
    return run_module("study", "run", *args, timeout=900)


def test_study_run_trains_evaluates_and_reports_the_grid_then_resumes(seqdigits_dir, tmp_path):
    grid = tmp_path / "grid.yaml"  # two of the 18 variants keep the test short
    grid.write_text('study:\n  grid:\n    model.neuron.leak: ["false"]\n    model.neuron.reset: [hard, none]\n'
                    '    model.neuron.recurrence: [lateral]\n')
    args = ["--config", "configs/study_seqdigits.yaml", "--config", str(grid), f"data.path={seqdigits_dir}",
            f"run.root={tmp_path / 'runs'}", "optim.epochs=1", "eval.epsilons=[0,0.1]", "eval.pgd_steps=2"]
    done = study_run(*args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for reset in ("hard", "none"):
        run_dir = tmp_path / "runs" / f"study-seqdigits-leak_false-reset_{reset}-recurrence_lateral"
        metrics = json.loads((run_dir / "eval.json").read_text())["metrics"]
        assert 0 <= metrics["eval/stream_top1"] <= 1 and "eval/pgd_top1_0.1" in metrics
    rows = list(csv.DictReader(open(tmp_path / "runs" / "study" / "study-seqdigits" / "results.csv")))
    assert len(rows) == 18
    status = {(r["leak"], r["reset"], r["recurrence"]): r["status"] for r in rows}
    assert [k for k, v in status.items() if v == "ok"] == [("false", "hard", "lateral"), ("false", "none", "lateral")]
    assert "report.md" in done.stdout

    again = study_run(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("run already complete") == 2 and again.stdout.count("is up to date") == 2
    assert "evaluated" not in again.stdout

    # The study's YAML changed under its finished runs: each variant refuses to resume in one line
    # (not a traceback), the study goes on to the next and says which failed.
    changed = tmp_path / "changed.yaml"
    changed.write_text("optim:\n  lr: 0.05\n")
    refused = study_run(*args[:4], "--config", str(changed), *args[4:])
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    assert refused.stderr.count("error: ") == 2 and refused.stderr.count("optim.lr") == 2
    assert refused.stdout.count("failed (exit 2); going on") == 2


def test_a_bad_grid_value_stops_before_anything_runs(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("study:\n  grid:\n    model.neuron.reset: [hard, sideways]\n")
    done = study_run("--config", "configs/study_seqdigits.yaml", "--config", str(grid), f"run.root={tmp_path}")
    assert done.returncode == 2 and "model.neuron.reset" in done.stderr and "sideways" in done.stderr
    assert not (tmp_path / "mlflow.db").exists()
