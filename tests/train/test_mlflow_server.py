"""Tracker against a real `mlflow server` that is stopped and restarted under it."""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.train.mlflow_fixtures import MlflowServer
from train.tracking import FALLBACK_NAME, Tracker, TrackingConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module; each test leaves it running."""
    srv = MlflowServer(tmp_path_factory.mktemp("server")).start()
    yield srv
    srv.stop()


def start(server: MlflowServer, run_dir: Path, run_id: str | None = None) -> Tracker:
    cfg = TrackingConfig(uri=server.uri, experiment="server-tests", request_timeout_s=2,
                         flush_interval_s=0.2, close_timeout_s=10)
    return Tracker.start(cfg, runs_root=run_dir.parent, run_dir=run_dir, run_name=run_dir.name,
                         run_id=run_id, enabled=True, tags={"dataset": "digits"})


def log_epochs(tracker: Tracker, epochs: range) -> float:
    """Log one epoch's metrics per epoch (step = epoch); return the slowest call in seconds."""
    slowest = 0.0
    for epoch in epochs:
        t0 = time.monotonic()
        tracker.log_metrics({"val/top1": epoch / 100, "firing_rate/layer1.0.lif1": 0.1 + epoch / 1000},
                            step=epoch)
        slowest = max(slowest, time.monotonic() - t0)
    return slowest


def epochs_stored(server: MlflowServer, run_id: str, key: str = "val/top1") -> list[int]:
    return sorted(m.step for m in MlflowClient(server.uri).get_metric_history(run_id, key))


def test_metrics_logged_while_the_server_is_down_arrive_after_it_restarts(server, tmp_path):
    tracker = start(server, tmp_path / "outage")
    run_id = tracker.run_id
    assert run_id is not None
    tracker.log_params({"model.T": 4})
    log_epochs(tracker, range(0, 5))
    tracker.flush()
    assert epochs_stored(server, run_id) == list(range(5))

    server.stop()
    assert log_epochs(tracker, range(5, 10)) < 0.1  # training does not notice
    tracker.log_firing_chart({e: {"layer1.0.lif1": 0.1 + e / 1000} for e in range(10)})
    t0 = time.monotonic()
    tracker.flush()  # returns at once while the server is failing, instead of waiting
    assert time.monotonic() - t0 < 3

    server.start()
    log_epochs(tracker, range(10, 15))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything must get through: no fallback warning
        tracker.close()
    assert not (tmp_path / "outage" / FALLBACK_NAME).exists()
    assert epochs_stored(server, run_id) == list(range(15))
    assert epochs_stored(server, run_id, "firing_rate/layer1.0.lif1") == list(range(15))
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"model.T": "4"}
    assert [a.path for a in client.list_artifacts(run_id, "charts")] == ["charts/firing_rates.png"]


def test_records_unsent_at_close_are_sent_when_the_run_resumes(server, tmp_path):
    run_dir = tmp_path / "requeued"
    first = start(server, run_dir)
    run_id = first.run_id
    log_epochs(first, range(0, 3))
    first.flush()
    server.stop()
    log_epochs(first, range(3, 6))
    with pytest.warns(UserWarning, match="did not take"):
        first.close("KILLED")  # SIGTERM from Slurm while the server is down
    assert (run_dir / FALLBACK_NAME).is_file()

    server.start()
    second = start(server, run_dir, run_id=run_id)  # checkpoint was at epoch 4
    log_epochs(second, range(5, 8))
    second.close()
    assert not (run_dir / FALLBACK_NAME).exists()
    assert epochs_stored(server, run_id) == list(range(8))
    assert MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"


def test_run_the_server_never_saw_is_created_and_continued_by_the_next_session(server, tmp_path):
    run_dir = tmp_path / "born-offline"
    server.stop()
    t0 = time.monotonic()
    first = start(server, run_dir)
    assert time.monotonic() - t0 < 5 and first.run_id is None
    log_epochs(first, range(0, 4))
    with pytest.warns(UserWarning, match="did not take"):
        first.close("KILLED")

    server.start()
    second = start(server, run_dir)  # no run id in the checkpoint: continue the pending run
    log_epochs(second, range(2, 6))
    second.close()
    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("server-tests").experiment_id],
                              "attributes.run_name = 'born-offline'")
    assert [r.info.run_id for r in runs] == [second.run_id]
    assert epochs_stored(server, second.run_id) == list(range(6))
