"""Mixed precision, gradient accumulation, EMA and mixup run end to end on CPU."""
import json

from tests.train.trainrun import metric_history, train


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
    scales = [v for _, v in metric_history(tmp_path, "loss_scale")]
    assert scales and all(v > 1 for v in scales)
