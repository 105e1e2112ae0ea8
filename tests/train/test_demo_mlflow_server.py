"""The demo logged to a real MLflow tracking server: params, histories, firing rates, artifacts."""
import pytest
from mlflow.tracking import MlflowClient

from tests.train.mlflow_fixtures import mlflow_server  # noqa: F401  (fixture)
from tests.train.trainrun import train

pytestmark = pytest.mark.slow  # starts an MLflow server and the trainer


@pytest.fixture(scope="module")
def served_run(mlflow_server, digits_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("runs")
    done = train(f"run.root={root}", f"data.path={digits_dir}", "optim.epochs=2", "data.num_workers=1",
                 f"tracking.uri={mlflow_server}", "tracking.experiment=served", "run.name=served-demo")
    assert done.returncode == 0, done.stderr[-3000:]
    assert mlflow_server in done.stdout  # the summary says where the run is
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("served").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_params_and_tags_describe_the_run(served_run):
    _, run = served_run
    assert run.info.run_name == "served-demo"
    assert run.data.params["model.T"] == "4" and run.data.params["optim.name"] == "sgd"
    assert "env.git_commit" in run.data.params and "env.version.torch" in run.data.params
    assert run.data.tags["model"] == "spiking_resnet_tiny" and run.data.tags["strategy"] == "single"


def test_step_and_epoch_histories_increase(served_run):
    client, run = served_run
    for key, n in (("val/top1", 2), ("train/top1", 2), ("sops_per_image", 2)):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(1, n + 1)), key
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/step_loss")]
    assert len(steps) >= 5 and steps == sorted(set(steps))
    assert {"train/lr", "train/images_per_s", "grad_norm", "sparsity_mean", "energy_uj_per_image"} <= set(run.data.metrics)
    assert sum(k.startswith("firing_rate/") for k in run.data.metrics) >= 3


def test_artifacts_are_uploaded_and_the_best_model_loads(served_run, tmp_path):
    import mlflow.pytorch
    import torch

    client, run = served_run
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "final_metrics.json", "charts", "best_model"} <= names
    assert [a.path for a in client.list_artifacts(run.info.run_id, "charts")] == ["charts/firing_rates.png", "charts/latency.png"]
    local = client.download_artifacts(run.info.run_id, "best_model", str(tmp_path))
    model = mlflow.pytorch.load_model(local).eval()
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
