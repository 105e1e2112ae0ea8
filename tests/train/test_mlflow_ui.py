"""The MLflow UI, rendered by headless Chromium, shows a tracked run and its firing rates, in
the "Model training" view wherever a page is opened.

MLflow 3.17 takes the view from the URL's `workflowType`, else from the browser's last choice,
else GenAI; our server app (`--app-name spikescale`, train/tracking/ui.py) makes model training
the default choice. Screenshots are kept in the test's tmp_path (pytest keeps the last three
sessions' directories).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.train.mlflow_fixtures import mlflow_server  # noqa: F401  (fixture)
from train.tracking import Tracker, TrackingConfig

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
RUN_NAME = "ui-resnet19-T4"
LAYER_METRIC = "firing_rate/layer3.1.lif2"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason="chromium not installed (apt-get install chromium; `make apt` does it)"),
]


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, tmp_path_factory) -> tuple[str, str, str]:  # noqa: F811
    """(uri, experiment id, run id) of a finished run with per-layer firing rates."""
    root = tmp_path_factory.mktemp("ui_runs")
    tracker = Tracker.start(TrackingConfig(uri=mlflow_server, experiment="ui-check"), runs_root=root,
                            run_dir=root / RUN_NAME, run_name=RUN_NAME, run_id=None, enabled=True,
                            tags={"model": "spiking_resnet19_tdbn", "T": "4"})
    tracker.log_dataset("cifar10:cifar10", "0123456789abcdef", str(root / "data" / "cifar10"))
    for epoch in range(3):
        tracker.log_metrics({"val/top1": 0.5 + epoch / 10, LAYER_METRIC: 0.12 - epoch / 100,
                             "firing_rate/layer1.0.lif1": 0.2}, step=epoch)
    tracker.close()
    run = MlflowClient(mlflow_server).get_run(tracker.run_id)
    return mlflow_server, run.info.experiment_id, run.info.run_id


def render(url: str, screenshot: Path) -> str:
    """The DOM of `url` after the app has run for 15 s of virtual time; saves a screenshot."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={screenshot.parent / 'chromium-profile'}", "--virtual-time-budget=15000",
           "--window-size=1400,1000", f"--screenshot={screenshot}", "--dump-dom", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert screenshot.stat().st_size > 10_000  # a blank page is a few kB
    return out.stdout


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


def test_experiment_page_lists_the_run_and_a_firing_rate_chart_section(tracked_run, tmp_path):
    uri, experiment_id, _ = tracked_run
    url = f"{uri}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&compareRunsMode=CHART"
    text = visible_text(render(url, tmp_path / "experiment.png"))
    assert RUN_NAME in text
    # the chart sections are built from the runs' metric keys: "firing_rate (2)" = two layers
    assert "firing_rate (2)" in text


def test_run_page_shows_the_run_name_and_per_layer_firing_rates(tracked_run, tmp_path):
    uri, experiment_id, run_id = tracked_run
    url = f"{uri}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    text = visible_text(render(url, tmp_path / "run.png"))
    assert RUN_NAME in text
    assert LAYER_METRIC in text and "firing_rate/layer1.0.lif1" in text


def test_runs_are_model_training_experiments_with_their_data_set_on_the_run_page(tracked_run, tmp_path):
    """The experiment carries MLflow's kind tag for model training; the run page opened without
    any view in its URL, in a browser that never chose one, is in that view and lists the run's
    data set as an input."""
    uri, experiment_id, run_id = tracked_run
    experiment = MlflowClient(uri).get_experiment(experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    url = f"{uri}/#/experiments/{experiment_id}/runs/{run_id}"  # as a bookmark or a message has it
    text = visible_text(render(url, tmp_path / "run-data.png"))
    assert RUN_NAME in text and "Judges" not in text and "Evaluations" not in text
    assert "cifar10:cifar10 (0123456789abcdef) training" in text
