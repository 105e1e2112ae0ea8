"""Mixed precision, gradient accumulation, EMA and mixup run end to end on CPU."""
import json
import os
import subprocess
import sys

import torch

from tests.train.trainrun import REPO, metric_history, train


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


def test_fp16_uses_a_loss_scaler(digits_dir, tmp_path):
    done = train(f"run.root={tmp_path}", f"data.path={digits_dir}", "optim.epochs=1", "data.num_workers=1",
                 "train.precision=fp16", "tracking.log_every_steps=5")
    assert done.returncode == 0, done.stderr[-3000:]
    # The start-up line says when this CPU has no fp16 kernels (most have none).
    slow_fp16 = not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    assert ("train.precision=fp16 on a CPU without native fp16 kernels" in done.stdout) == slow_fp16
    scales = [v for _, v in metric_history(tmp_path, "loss_scale")]
    assert scales and all(v > 1 for v in scales)


def test_cpu_without_native_bf16_is_told_so_in_one_line():
    # oneDNN limited to AVX2 behaves as a CPU without AVX-512 (AMD EPYC Zen 3): no bf16 kernels.
    code = ("import torch; from train.strategies import cpu_precision_warning as w; "
            "cpu = torch.device('cpu'); print(w('bf16', cpu)); print(w('fp32', cpu)); "
            "print(w('bf16', torch.device('cuda')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}).stdout.splitlines()
    assert out[0].startswith("warning: train.precision=bf16 on a CPU without native bf16 kernels")
    assert "slower than fp32" in out[0] and out[1:] == ["None", "None"]
