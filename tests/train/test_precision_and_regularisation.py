"""Mixed precision, gradient accumulation, EMA and mixup run end to end on CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.train.trainrun import REPO, metric_history, train


@pytest.mark.slow
def test_bf16_with_accumulation_ema_and_mixup_learns(digits_dir, tmp_path):
    done = train(f"run.root={tmp_path}", f"data.path={digits_dir}", "optim.epochs=2", "data.num_workers=1",
                 "train.precision=bf16", "optim.accumulate=2", "data.batch_size=16", "optim.ema_decay=0.9",
                 "optim.mixup_alpha=0.2", "optim.cutmix_alpha=0.0", "optim.label_smoothing=0.1",
                 "tracking.log_every_steps=1")
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((tmp_path / "demo-digits" / "final_metrics.json").read_text())
    assert final["val/top1"] > 0.3 and final["val_ema/top1"] > 0.3  # chance is 0.1
    # 1437 samples / 16 per micro-batch = 89 micro-batches -> 44 optimizer steps per epoch
    assert max(step for step, _ in metric_history(tmp_path, "train/lr")) == 2 * 44


@pytest.mark.slow
def test_fp16_uses_a_loss_scaler(digits_dir, tmp_path):
    done = train(f"run.root={tmp_path}", f"data.path={digits_dir}", "optim.epochs=1", "data.num_workers=1",
                 "train.precision=fp16", "tracking.log_every_steps=5")
    assert done.returncode == 0, done.stderr[-3000:]
    # The start-up line says when this CPU has no fp16 kernels (most have none).
    slow_fp16 = not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    assert ("train.precision=fp16 on a CPU without native fp16 kernels" in done.stdout) == slow_fp16
    scales = [v for _, v in metric_history(tmp_path, "loss_scale")]
    assert scales and all(v > 1 for v in scales)


@pytest.mark.slow
def test_cpu_without_native_bf16_is_told_so_in_one_line():
    # oneDNN limited to AVX2 behaves as a CPU without AVX-512 (AMD EPYC Zen 3): no bf16 kernels.
    code = ("import torch; from train.strategies import cpu_precision_warning as w; "
            "cpu = torch.device('cpu'); print(w('bf16', cpu)); print(w('fp32', cpu)); "
            "print(w('bf16', torch.device('cuda')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}).stdout.splitlines()
    assert out[0].startswith("warning: train.precision=bf16 on a CPU without native bf16 kernels")
    assert "slower than fp32" in out[0] and out[1:] == ["None", "None"]


def test_captured_spike_totals_give_the_recorded_firing_rate_with_a_gradient():
    import timm

    import models.zoo  # registers the spiking networks
    from models.firing import capture_spike_totals, mean_firing_rate

    torch.manual_seed(0)
    model = timm.create_model("spiking_resnet_tiny", T=4, num_classes=10, in_chans=1)
    x = torch.randn(8, 1, 8, 8)
    models.set_firing_recording(model, True)
    with capture_spike_totals(model) as totals:
        model(x)
    rate = mean_firing_rate(totals)
    recorded = models.firing_counts(model)
    spikes, slots = (sum(float(c[i]) for c in recorded.values()) for i in (0, 1))
    assert rate.item() == pytest.approx(spikes / slots, rel=1e-5) and 0 < rate.item() < 1
    rate.backward()
    assert model.conv1.weight.grad.abs().sum() > 0  # through the surrogate
    with capture_spike_totals(model) as totals:
        pass
    model(x)
    assert totals == []  # nothing is captured outside the block


@pytest.mark.slow
def test_firing_rate_penalty_lowers_the_firing_rate_and_is_logged(digits_dir, tmp_path):
    rates = {}
    for weight in (0, 50):
        root = tmp_path / f"reg{weight}"
        done = train(f"run.root={root}", f"data.path={digits_dir}", "optim.epochs=1", "data.num_workers=1",
                     f"optim.firing_reg={weight}", "tracking.log_every_steps=5")
        assert done.returncode == 0, done.stderr[-3000:]
        rates[weight] = json.loads((root / "demo-digits" / "final_metrics.json").read_text())["firing_rate_mean"]
    assert rates[50] < 0.8 * rates[0], rates
    assert [v for _, v in metric_history(root, "train/firing_reg_loss")]
