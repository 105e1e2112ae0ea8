"""Tracker against the embedded SQLite store, and against endpoints that never answer."""
from __future__ import annotations

import atexit
import enum
import json
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow.pytorch
import pytest
import torch
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.train.mlflow_fixtures import free_port
from train.tracking import (FALLBACK_NAME, Tracker, TrackingConfig, environment_params,
                            environment_tags, main, replay)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """One embedded store for the module: creating its schema costs seconds."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(autouse=True)
def _no_tracking_uri_from_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def db_uri(root: Path) -> str:
    return f"sqlite:///{root}/mlflow.db"


def start(root: Path, name: str, run_id: str | None = None, run_dir: Path | None = None, **cfg) -> Tracker:
    cfg.setdefault("flush_interval_s", 0.2)
    return Tracker.start(TrackingConfig(**cfg), runs_root=root, run_dir=run_dir or root / name,
                         run_name=name, run_id=run_id, enabled=True, tags={"model": "spiking_resnet19_tdbn"})


def steps_and_values(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_default_store_is_sqlite_in_runs_root_with_artifacts_beside_it(runs_root):
    tracker = start(runs_root, "default-store")
    tracker.log_metrics({"train/loss": 1.5}, step=0)
    tracker.close()
    assert (runs_root / "mlflow.db").is_file()
    run = MlflowClient(db_uri(runs_root)).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "default-store"
    assert run.info.artifact_uri.startswith((runs_root / "mlartifacts").as_uri())
    assert run.data.tags["model"] == "spiking_resnet19_tdbn"


class Reset(str, enum.Enum):
    SOFT = "soft"


def test_params_keep_their_dotted_keys_and_are_logged_as_text(runs_root):
    tracker = start(runs_root, "params")
    tracker.log_params({"model.T": 4, "model.neuron.tau_decay": 0.25, "model.neuron.reset": Reset.SOFT,
                        "optim.milestones": [30, 60], "data.crop": (32, 32), "optim.warmup": None,
                        "optim.nesterov": True})
    with pytest.raises(TypeError, match="param model is a mapping"):
        tracker.log_params({"model": {"T": 4}})  # the caller flattens: nested dicts are our bug
    tracker.close()
    params = MlflowClient(db_uri(runs_root)).get_run(tracker.run_id).data.params
    assert params == {"model.T": "4", "model.neuron.tau_decay": "0.25", "model.neuron.reset": "soft",
                      "optim.milestones": "[30, 60]", "data.crop": "[32, 32]", "optim.warmup": "None",
                      "optim.nesterov": "True"}


def test_metric_histories_keep_every_step_including_per_layer_firing_rates(runs_root):
    tracker = start(runs_root, "metrics")
    layers = ["layer1.0.lif1", "layer3.1.lif2"]
    for step in range(0, 500, 50):
        tracker.log_metrics({"train/loss": 2.0 - step / 500, "train/lr": torch.tensor(0.1)}, step)
    for epoch in range(3):
        tracker.log_metrics({f"firing_rate/{name}": 0.1 * (i + 1) + epoch / 100
                             for i, name in enumerate(layers)}, step=epoch)
    tracker.close()
    client = MlflowClient(db_uri(runs_root))
    loss = steps_and_values(client, tracker.run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(0, 500, 50))
    assert loss[-1][1] == pytest.approx(2.0 - 450 / 500)
    assert steps_and_values(client, tracker.run_id, "train/lr")[0] == (0, pytest.approx(0.1))
    assert steps_and_values(client, tracker.run_id, "firing_rate/layer3.1.lif2") == [
        (0, pytest.approx(0.2)), (1, pytest.approx(0.21)), (2, pytest.approx(0.22))]


def test_artifacts_are_uploaded_as_they_were_when_logged(runs_root, tmp_path):
    tracker = start(runs_root, "artifacts")
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  T: 4\n")
    tracker.log_artifact(config)
    config.write_text("changed after logging\n")  # the upload must carry the logged content
    tracker.log_firing_chart({0: {"layer1.0.lif1": 0.12, "layer3.1.lif2": 0.05},
                              1: {"layer1.0.lif1": 0.10, "layer3.1.lif2": 0.04}})
    tracker.close()
    uri = db_uri(runs_root)
    assert Path(download_artifacts(run_id=tracker.run_id, artifact_path="config.yaml",
                                   tracking_uri=uri, dst_path=str(tmp_path / "dl"))
                ).read_text() == "model:\n  T: 4\n"
    png = download_artifacts(run_id=tracker.run_id, artifact_path="charts/firing_rates.png",
                             tracking_uri=uri, dst_path=str(tmp_path / "dl"))
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 200
    # staged copies are removed once uploaded
    assert not any((runs_root / "artifacts" / "tracking" / "staged").iterdir())


class TinySpikingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 3)
        self.register_buffer("v_threshold", torch.tensor(0.5))

    def forward(self, x):  # [T, B, 8] -> [B, 3] spike counts averaged over T
        return (self.fc(x) > self.v_threshold).float().mean(0)


def test_logged_model_loads_back_and_computes_the_same(runs_root, tmp_path):
    torch.manual_seed(0)
    model = TinySpikingNet()
    tracker = start(runs_root, "model")
    tracker.log_model(model, name="best_model")
    tracker.close()
    local = download_artifacts(run_id=tracker.run_id, artifact_path="best_model",
                               tracking_uri=db_uri(runs_root), dst_path=str(tmp_path))
    loaded = mlflow.pytorch.load_model(local)
    assert type(loaded) is TinySpikingNet
    x = torch.randn(4, 5, 8)
    assert torch.equal(loaded(x), model(x))


def test_resume_continues_the_same_run_without_duplicate_or_regressed_steps(runs_root):
    first = start(runs_root, "resume")
    first.log_params({"optim.lr": 0.1})
    for step in range(10):
        first.log_metrics({"train/loss": 1.0}, step)
    run_id = first.run_id
    first.close("KILLED")  # a requeued job: checkpoint at step 4, steps 5..9 are replayed
    second = start(runs_root, "resume", run_id=run_id)
    assert second.run_id == run_id
    # the same resolved config again is accepted; a changed value keeps the first (MLflow
    # params are write-once) without blocking what is queued behind it
    second.log_params({"optim.lr": 0.1, "optim.epochs": 3})
    second.log_params({"optim.lr": 0.5})
    for step in range(5, 15):
        second.log_metrics({"train/loss": 2.0}, step)
    second.close()
    client = MlflowClient(db_uri(runs_root))
    assert steps_and_values(client, run_id, "train/loss") == \
        [(s, 1.0) for s in range(10)] + [(s, 2.0) for s in range(10, 15)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.params == {"optim.lr": "0.1", "optim.epochs": "3"}
    assert not (runs_root / "resume" / FALLBACK_NAME).exists()
    experiment_id = client.get_run(run_id).info.experiment_id
    runs = client.search_runs([experiment_id], "attributes.run_name = 'resume'")
    assert [r.info.run_id for r in runs] == [run_id]


def test_system_metrics_follow_the_training_step_when_enabled(runs_root):
    tracker = start(runs_root, "system", system_metrics=True, system_metrics_interval_s=0.05)
    tracker.log_metrics({"train/loss": 1.0}, step=7)
    time.sleep(0.5)
    tracker.close()
    metrics = MlflowClient(db_uri(runs_root)).get_run(tracker.run_id).data._metric_objs
    system = {m.key: (m.step, m.value) for m in metrics if m.key.startswith("system/")}
    # MLflow's own CPU monitor's keys (its UI's system metrics tab), plus our process RSS
    for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes",
                "system_memory_usage_percentage", "process_rss_megabytes"):
        assert system[f"system/{key}"][0] == 7, key
    assert system["system/process_rss_megabytes"][1] > 10  # this process holds torch: > 10 MB


def test_disabled_tracker_logs_nothing(tmp_path):
    tracker = Tracker.start(TrackingConfig(), runs_root=tmp_path, run_dir=tmp_path / "r",
                            run_name="r", run_id=None, enabled=False, tags={})
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_artifact(tmp_path / "missing")  # not even checked: rank != 0 does nothing
    tracker.log_firing_chart({0: {"l": 0.1}})
    tracker.log_model(torch.nn.Linear(2, 2))
    tracker.flush()
    tracker.close()
    assert tracker.run_id is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["", "a//b", "/abs", "loss!", "x" * 251, "../up"])
def test_invalid_metric_names_are_refused_at_the_call(runs_root, key):
    tracker = start(runs_root, "bad-keys")
    with pytest.raises(ValueError, match="not a valid MLflow key"):
        tracker.log_metrics({key: 1.0}, step=0)
    tracker.close()


@pytest.mark.slow
def test_config_module_imports_neither_torch_nor_mlflow():
    """The config schema imports TrackingConfig; loading a config must not pay for torch/MLflow."""
    heavy = ("torch", "mlflow", "timm", "ffcv", "triton", "deepspeed")
    code = (f"import sys, train.tracking, train.tracking.config; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def test_environment_describes_slurm_job_and_packages(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    tags = environment_tags()
    assert (tags["slurm.job_id"], tags["slurm.array_job_id"], tags["slurm.array_task_id"]) == \
        ("1234", "1200", "7")
    params = environment_params(world_size=8, device="cpu")
    assert params["env.world_size"] == "8" and params["env.device"] == "cpu"
    assert params["env.version.torch"] == torch.__version__
    assert params["env.version.mlflow"] == mlflow.__version__


def timed(fn, *args, **kwargs) -> float:
    t0 = time.monotonic()
    fn(*args, **kwargs)
    return time.monotonic() - t0


def test_unreachable_server_costs_training_nothing_and_replay_delivers_everything(runs_root, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    tracker = Tracker.start(TrackingConfig(uri=dead, flush_interval_s=0.2), runs_root=tmp_path,
                            run_dir=tmp_path / "offline", run_name="offline", run_id=None,
                            enabled=True, tags={})
    assert time.monotonic() - t0 < 5
    assert tracker.run_id is None
    tracker.log_params({"model.T": 4})
    slowest = max(timed(tracker.log_metrics, {"train/loss": 1.0 / (s + 1)}, s) for s in range(200))
    assert slowest < 0.1
    assert timed(tracker.flush) < 2
    tracker.log_firing_chart({0: {"layer1.0.lif1": 0.1}})
    with pytest.warns(UserWarning, match="did not take"):
        assert timed(tracker.close) < 10
    fallback = tmp_path / "offline" / FALLBACK_NAME
    assert fallback.is_file()
    assert json.loads(fallback.read_text().splitlines()[-1])["op"] == "end"

    # the store is elsewhere now: send the records there
    assert main(["replay", str(tmp_path / "offline"), "--uri", db_uri(runs_root)]) == 0
    assert not fallback.exists()
    client = MlflowClient(db_uri(runs_root))
    [run] = client.search_runs([client.get_experiment_by_name("spikescale").experiment_id],
                               "attributes.run_name = 'offline'")
    assert [s for s, _ in steps_and_values(client, run.info.run_id, "train/loss")] == list(range(200))
    assert run.data.params == {"model.T": "4"}
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "charts")] == ["charts/firing_rates.png"]
    assert replay(tmp_path / "offline") == 0  # nothing left: a second replay is a no-op


def test_a_flush_while_the_store_fails_journals_the_unsent_records_so_a_kill_loses_none(runs_root, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    run_dir = tmp_path / "killed"
    tracker = Tracker.start(TrackingConfig(uri=dead, flush_interval_s=0.2, start_timeout_s=1), runs_root=tmp_path,
                            run_dir=run_dir, run_name="killed", run_id=None, enabled=True, tags={})
    for step in range(50):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    tracker.flush()  # what the trainer does before each checkpoint
    journal = [json.loads(line) for line in (run_dir / FALLBACK_NAME).read_text().splitlines()]
    assert sum(len(r.get("metrics", [])) for r in journal if r["op"] == "metrics") == 50
    # The process dies here (no close); the journal is sent where the store is now.
    atexit.unregister(tracker.close)
    assert replay(run_dir, db_uri(runs_root)) > 0
    client = MlflowClient(db_uri(runs_root))
    [run] = client.search_runs([client.get_experiment_by_name("spikescale").experiment_id],
                               "attributes.run_name = 'killed'")
    assert [s for s, _ in steps_and_values(client, run.info.run_id, "train/loss")] == list(range(50))
    assert not (run_dir / FALLBACK_NAME).exists()


def test_records_for_another_store_wait_for_replay_with_their_artifacts(runs_root, tmp_path):
    run_dir = tmp_path / "moved"
    dead = f"http://127.0.0.1:{free_port()}"
    first = Tracker.start(TrackingConfig(uri=dead, flush_interval_s=0.2), runs_root=tmp_path,
                          run_dir=run_dir, run_name="moved", run_id=None, enabled=True, tags={})
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.log_firing_chart({0: {"layer1.0.lif1": 0.1}})
    with pytest.warns(UserWarning, match="did not take"):
        first.close("KILLED")

    # the next session logs to another store: the old records stay for a replay, copies included
    with pytest.warns(UserWarning, match="holds records for"):
        second = start(runs_root, "moved", run_dir=run_dir)
    second.close()
    assert replay(run_dir, db_uri(runs_root)) == 4  # start, metrics, artifact, end
    client = MlflowClient(db_uri(runs_root))
    [run] = [r for r in client.search_runs([client.get_experiment_by_name("spikescale").experiment_id],
                                           "attributes.run_name = 'moved'") if r.info.run_id != second.run_id]
    assert run.info.status == "KILLED"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "charts")] == ["charts/firing_rates.png"]


@pytest.fixture
def hung_server():
    """A socket that accepts connections and never answers: a server stuck under load."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_hung_server_never_stalls_logging_and_close_is_bounded(hung_server, tmp_path):
    cfg = TrackingConfig(uri=hung_server, request_timeout_s=1, start_timeout_s=3,
                         close_timeout_s=3, flush_interval_s=0.2)
    t0 = time.monotonic()
    tracker = Tracker.start(cfg, runs_root=tmp_path, run_dir=tmp_path / "hung", run_name="hung",
                            run_id=None, enabled=True, tags={})
    assert time.monotonic() - t0 < 4
    slowest = max(timed(tracker.log_metrics, {"train/loss": 1.0}, s) for s in range(100))
    assert slowest < 0.1
    assert timed(tracker.flush) < 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert timed(tracker.close) < 5
    assert any("did not take" in str(w.message) for w in caught)
    records = [json.loads(line) for line in (tmp_path / "hung" / FALLBACK_NAME).read_text().splitlines()]
    assert sum(r["op"] == "metrics" for r in records) == 100
