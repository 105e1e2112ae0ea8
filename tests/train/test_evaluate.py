"""`python -m train.evaluate RUN_DIR` on a finished demo run: every measurement of the study in
eval.json and in the run's own MLflow run, the same numbers twice, bad input in one line; and an
event run measured at another frame duration and under spike flips."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from data_pipelines import create_loader
from data_pipelines.build import main as build_main
from tests.data_pipelines.test_dvs import _write_nmnist
from tests.train.trainrun import REPO, free_port, run_module, train, train_env
from train import distributed, measure
from train.build import build_model
from train.config import ConfigError, load_config, to_yaml
from train.evaluate import evaluate_run
from train.run_dir import RunDir

pytestmark = pytest.mark.slow  # runs the trainer and the evaluation

SMALL_GRID = ["eval.noise_sigmas=[0,0.2]", "eval.epsilons=[0,0.1]", "eval.pgd_steps=3",
              # the landscape over every validation batch: its loss at 0 is the clean val loss
              "eval.landscape_points=2", "eval.landscape_surface_points=1", "eval.landscape_batches=100",
              "eval.tsne_samples=60"]


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return run_module("train.evaluate", *args)


@pytest.fixture(scope="module")
def demo_run(digits_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    done = train(f"run.root={root}", f"data.path={digits_dir}", "optim.epochs=2", "data.num_workers=1")
    assert done.returncode == 0, done.stderr[-3000:]
    return root, root / "demo-digits"


def test_evaluation_writes_every_measurement_into_eval_json_and_the_runs_mlflow_run(demo_run):
    root, run_dir = demo_run
    done = evaluate(str(run_dir), *SMALL_GRID)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run_dir / "eval.json").read_text())
    m = record["metrics"]
    for key in ("eval/val_top1", "eval/val_top5", "eval/val_loss", "eval/train_top1", "eval/generalization_gap",
                "eval/firing_rate_mean", "eval/sparsity_mean", "eval/sops_per_image", "eval/energy_uj_per_image",
                "eval/noise_top1_0", "eval/noise_top1_0.2", "eval/fgsm_top1_0", "eval/fgsm_top1_0.1",
                "eval/pgd_top1_0", "eval/pgd_top1_0.1"):
        assert key in m, key
    assert any(k.startswith("eval/firing_rate/") for k in m)
    assert "eval/stream_top1" not in m  # the digits are static
    assert not any(k.startswith(("eval/flip_top1", "eval/shift_top1")) for k in m)  # images, no other durations
    assert m["eval/val_top1"] == m["eval/noise_top1_0"] == m["eval/fgsm_top1_0"] == m["eval/pgd_top1_0"] > 0.3
    assert m["eval/val_top1"] == m["eval/transfer_top1_0"] == m["eval/worst_top1_0"]
    assert m["eval/pgd_top1_0.1"] <= m["eval/fgsm_top1_0.1"] <= m["eval/val_top1"]
    attacks = [m[f"eval/{a}_top1_0.1"] for a in ("fgsm", "pgd", "transfer")]
    assert m["eval/worst_top1_0.1"] <= min(attacks), attacks  # no better than any one attack
    curve = record["landscape"]
    assert curve["alpha"] == [-1.0, -0.5, 0.0, 0.5, 1.0] and len(curve["surface"]["loss"]) == 3
    assert curve["loss"][2] == pytest.approx(m["eval/val_loss"], rel=1e-9)
    assert m["eval/sharpness"] == pytest.approx(max(curve["loss"]) - curve["loss"][2]) and m["eval/sharpness"] >= 0
    assert record["plots"] == ["landscape_1d.png", "landscape_2d.png", "tsne.png"]
    assert all((run_dir / "eval_plots" / name).stat().st_size > 1000 for name in record["plots"])
    assert "transfer: PGD with gradients through the atan(2) surrogate" in record["threat_model"]
    assert m["eval/generalization_gap"] == pytest.approx(m["eval/train_top1"] - m["eval/val_top1"])
    assert record["weights"] == "best_model.pt" and record["eval"]["epsilons"] == [0.0, 0.1]
    # The trainer's own final validation top-1 of the best (= last) epoch is the clean top-1.
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert m["eval/val_top1"] == pytest.approx(final["val/top1"])

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert run.data.metrics["eval/pgd_top1_0.1"] == pytest.approx(m["eval/pgd_top1_0.1"])
    assert "eval.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "eval_plots/tsne.png" in [a.path for a in client.list_artifacts(run.info.run_id, "eval_plots")]
    assert run.info.status == "FINISHED"

    # The same checkpoint gives identical numbers again (noise and PGD starts are seeded), also
    # read from the newest step checkpoint instead of best_model.pt (the same weights here).
    again = evaluate(str(run_dir), *SMALL_GRID, "eval.checkpoint=last")
    assert again.returncode == 0, again.stderr[-3000:]
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["weights"].startswith("step-") and record["metrics"] == m


@pytest.mark.parametrize("args, words", [
    (["{missing}"], ["is not a run directory"]),
    (["{run}", "eval.epsilons=[0,-0.1]"], ["eval.epsilons", ">= 0"]),
    (["{run}", "eval.checkpoint=newest"], ["eval.checkpoint", "best, last"]),
    (["{run}", "eval.transfer_surrogate=rectangular", "eval.transfer_surrogate_width=1"],
     ["eval.transfer_surrogate", "the model trained with"]),
])
def test_bad_input_is_one_line_and_exit_code_2(demo_run, tmp_path, args, words):
    _, run_dir = demo_run
    args = [a.format(missing=tmp_path / "nope", run=run_dir) for a in args]
    done = evaluate(*args)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and all(w in lines[0] for w in words), lines


def test_two_ranks_measure_the_same_clean_generalisation_and_fgsm_numbers_as_one(demo_run):
    _, run_dir = demo_run
    grid = ["eval.noise_sigmas=[0]", "eval.epsilons=[0.1]", "eval.pgd_steps=1", "eval.pgd_random_start=false",
            "eval.landscape_points=1", "eval.landscape_surface_points=0", "eval.landscape_batches=100",
            "eval.tsne_samples=0"]
    one = evaluate(str(run_dir), *grid)
    assert one.returncode == 0, one.stderr[-3000:]
    single = json.loads((run_dir / "eval.json").read_text())["metrics"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "train.evaluate", str(run_dir), *grid],
                         cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    ranked = json.loads((run_dir / "eval.json").read_text())["metrics"]
    for key in ("eval/val_top1", "eval/val_top5", "eval/train_top1", "eval/fgsm_top1_0.1", "eval/pgd_top1_0.1",
                "eval/transfer_top1_0.1", "eval/worst_top1_0.1", "eval/firing_rate_mean"):
        assert ranked[key] == pytest.approx(single[key], abs=1e-9), key
    assert ranked["eval/val_loss"] == pytest.approx(single["eval/val_loss"], rel=1e-6)
    # Every rank walks the same directions (drawn from run.seed alone) over its own shard.
    assert ranked["eval/sharpness"] == pytest.approx(single["eval/sharpness"], rel=1e-5, abs=1e-9)


@pytest.fixture(scope="module")
def nmnist_3ms(tmp_path_factory):
    """N-MNIST in the real .bin format, 2 digits x 2 recordings, the same ones in Train and Test
    (so a network fitted to train is right on val), digit d's events all of polarity d, binned at 3 ms frames over a 30 ms window
    (T = 10) with an extra val split at 5 ms (T = 6)."""
    root = tmp_path_factory.mktemp("nmnist_src")
    rng = np.random.default_rng(3)
    for digit in range(2):
        for i in range(2):
            n = int(rng.integers(300, 500))
            t = np.sort(rng.choice(np.arange(5, 40_000), n, replace=False))
            events = rng.integers(0, 34, n), rng.integers(0, 34, n), t, np.full(n, digit)
            for folder in ("Train", "Test"):
                _write_nmnist(root / "NMNIST" / folder / str(digit) / f"{i:05d}.bin", *events)
    out = tmp_path_factory.mktemp("nmnist_3ms")
    assert build_main(["dvs", "--set", "nmnist", "--src", str(root), "--out", str(out), "--frame-ms", "3",
                       "--window-ms", "30", "--eval-frame-ms", "5", "--workers", "1"]) == 0
    return out


def test_event_run_is_measured_at_every_frame_duration_and_under_spike_flips(nmnist_3ms, tmp_path):
    """In process: a network fitted to N-MNIST at 3 ms evaluated there and at 5 ms, with the spike
    flip and the worst case over every attack."""
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=nmnist", "data.dataset=dvs", f"data.path={nmnist_3ms}",
                             "data.batch_size=2", "data.num_workers=1", "model.T=10", "train.device=cpu",
                             "eval.noise_sigmas=[0]", "eval.epsilons=[0,1]", "eval.pgd_steps=2",
                             "eval.flip_budgets=[0,1000]", "eval.flip_rounds=2", "eval.landscape_points=1",
                             "eval.landscape_surface_points=0", "eval.tsne_samples=4", "eval.stream_length=2"])
    run_dir = RunDir.of(cfg)
    run_dir.path.mkdir(parents=True)
    run_dir.config.write_text(to_yaml(cfg))
    val = create_loader(cfg.data, "val")
    torch.manual_seed(0)
    model = build_model(cfg, val.meta)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in create_loader(cfg.data, "train", augment=False).iterate(0)])
    x, y = torch.cat(xs, dim=1), torch.cat(ys)
    for _ in range(15):  # the four recordings, fitted
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for bn in model.modules():  # running statistics of exactly these samples, for eval mode
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None
    with torch.no_grad():
        model(x)
    torch.save(model.state_dict(), run_dir.best_model)
    env = distributed.setup("single", "cpu")
    m = evaluate_run(cfg, env, run_dir.path)

    assert m["eval/val_top1"] == 1 and m["eval/firing_rate_mean"] > 0
    assert m["eval/shift_top1_3ms"] == m["eval/val_top1"] == m["eval/flip_top1_0"] == m["eval/worst_top1_0"]
    model.eval()
    at_5ms = create_loader(cfg.data, "val_5ms")
    assert next(iter(at_5ms.iterate(0)))[0].shape[0] == 6  # the same recordings in 6 frames
    assert m["eval/shift_top1_5ms"] == measure.top1(model, at_5ms.iterate(0), device=torch.device("cpu"))
    assert m["eval/flip_top1_1000"] < m["eval/val_top1"]  # 1000 of 10 x 2 x 34 x 34 entries changed
    assert m["eval/worst_top1_1"] <= min(m["eval/fgsm_top1_1"], m["eval/pgd_top1_1"], m["eval/transfer_top1_1"])
    record = json.loads(run_dir.eval_results.read_text())
    assert "flip: at most k entries per sample" in record["threat_model"] and record["plots"] == [
        "landscape_1d.png", "tsne.png"]
    with pytest.raises(ConfigError, match="eval.image_attack"):
        evaluate_run(load_config(run_dir.config, ["eval.image_attack=true"]), env, run_dir.path)
