"""Per-step outputs: TET's loss, top-1 had inference stopped after t steps, the latency chart,
and the progress lines a job log shows between epoch lines."""
import json

import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

import models.zoo  # noqa: F401  (registers the spiking networks)
from train import measure
from train.config import ConfigError, load_config
from train.engine import build_loss, tet_loss
from tests.train.trainrun import train

DEMO = "configs/demo_digits.yaml"


def test_tet_is_the_mean_per_step_cross_entropy_plus_lambda_mse_to_phi():
    torch.manual_seed(0)
    logits, y = torch.randn(4, 8, 10), torch.randint(0, 10, (8,))
    per_step = sum(F.cross_entropy(logits[t], y) for t in range(4)) / 4
    mse = ((logits - 1.0) ** 2).mean()
    got = tet_loss(logits, y, nn.CrossEntropyLoss(), lam=0.25, phi=1.0)
    assert torch.allclose(got, 0.75 * per_step + 0.25 * mse)
    assert torch.allclose(tet_loss(logits, y, nn.CrossEntropyLoss(), lam=0.0, phi=1.0), per_step)


def test_ce_on_per_step_output_is_ce_of_the_mean_logits():
    cfg = load_config(DEMO, ["model.output=per_step"])
    logits, y = torch.randn(4, 8, 10), torch.randint(0, 10, (8,))
    assert torch.allclose(build_loss(cfg, None)(logits, y), F.cross_entropy(logits.mean(0), y))
    tet = load_config(DEMO, ["model.output=per_step", "optim.loss=tet", "optim.tet_lambda=0"])
    assert torch.allclose(build_loss(tet, None)(logits, y), sum(F.cross_entropy(s, y) for s in logits) / 4)


def test_tet_without_per_step_output_is_one_config_line():
    with pytest.raises(ConfigError, match="model.output=per_step"):
        load_config(DEMO, ["optim.loss=tet"])


def test_per_step_output_and_top1_after_each_step():
    torch.manual_seed(0)
    model = timm.create_model("spiking_resnet_tiny", T=4, num_classes=10, in_chans=1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    model.eval()
    model.set_output("per_step")
    steps = model(x)
    assert steps.shape == (4, 16, 10)
    model.set_output("mean")
    assert torch.allclose(model(x), steps.mean(0), atol=1e-6)
    model.set_output("per_step")
    metrics = measure.clean_metrics(model, [(x, y)], device=torch.device("cpu"))
    for k in range(1, 5):
        expected = (steps[:k].mean(0).argmax(1) == y).float().mean().item()
        assert metrics[f"val/top1_t{k}"] == pytest.approx(expected)
    assert metrics["val/top1_t4"] == metrics["val/top1"]
    with pytest.raises(ValueError, match="per_step"):
        model.set_output("last")


@pytest.mark.slow
def test_tet_training_logs_top1_per_step_a_latency_chart_and_progress_lines(digits_dir, tmp_path):
    done = train(f"run.root={tmp_path}", f"data.path={digits_dir}", "optim.epochs=1", "data.num_workers=1",
                 "model.output=per_step", "optim.loss=tet", "tracking.log_every_steps=10")
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((tmp_path / "demo-digits" / "final_metrics.json").read_text())
    assert final["val/top1_t4"] == final["val/top1"] > 0.2
    assert all(f"val/top1_t{k}" in final for k in (1, 2, 3))
    assert list(tmp_path.glob("mlartifacts/**/charts/latency.png"))
    lines = [line for line in done.stdout.splitlines() if line.startswith("epoch 1/1 step ")]
    assert [line.split()[3] for line in lines] == ["10/44", "20/44", "30/44", "40/44"]
    assert all("loss" in line and "img/s" in line and "epoch ends in" in line for line in lines)
    assert "\r" not in done.stdout
