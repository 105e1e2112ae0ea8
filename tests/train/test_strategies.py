"""DDP and DeepSpeed (ZeRO-1/2) follow the single-process loss trajectory at the same global batch;
the single-process strategy, in process, does what the step loop relies on (bottom of the file).

Two CPU ranks with gloo, 16 samples each, against one process with 32. tdBN statistics are
per rank (16 vs 32 samples), so the trajectories agree closely but not bit for bit; the bound
below is a few times the gap measured between them (about 0.003 in the first 20 steps).
"""
import pytest
import torch

from tests.train.trainrun import metric_history, train

STEPS = 20
TOL = 0.02


def losses(root, *overrides, nproc=1):
    done = train(f"run.root={root}", "optim.epochs=1", "tracking.log_every_steps=1", "data.num_workers=1",
                 "optim.warmup_epochs=0", *overrides, nproc=nproc)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [v for _, v in metric_history(root, "train/step_loss")][:STEPS]


@pytest.fixture(scope="module")
def single_losses(digits_dir, tmp_path_factory):
    return losses(tmp_path_factory.mktemp("single"), f"data.path={digits_dir}", "data.batch_size=32")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    ["train.strategy=ddp"],
    ["train.strategy=deepspeed", "train.deepspeed.zero_stage=1"],
    ["train.strategy=deepspeed", "train.deepspeed.zero_stage=2"],
    # Checkpointing changes memory, not gradients: the same trajectory under both strategies.
    ["train.strategy=ddp", "train.checkpointing=blocks+time"],
    ["train.strategy=deepspeed", "train.deepspeed.zero_stage=2", "train.checkpointing=blocks+time"],
], ids=["ddp", "zero1", "zero2", "ddp-blocks+time", "zero2-blocks+time"])
def test_two_ranks_follow_single_process_trajectory(strategy, single_losses, digits_dir, tmp_path):
    ranked = losses(tmp_path, f"data.path={digits_dir}", "data.batch_size=16", *strategy, nproc=2)
    assert len(ranked) == len(single_losses) == STEPS
    gaps = [abs(a - b) for a, b in zip(ranked, single_losses)]
    assert max(gaps) < TOL, gaps
    assert sum(single_losses[-5:]) < sum(single_losses[:5]) - 0.1  # and it is learning at all


@pytest.mark.slow
def test_deepspeed_bf16_zero2_as_the_imagenet_recipe_runs_it(single_losses, digits_dir, tmp_path):
    # configs/blocks/deepspeed_zero2.yaml: the engine holds parameters in bf16 (no autocast)
    # while BatchNorm statistics stay fp32; tdBN has to take both.
    ranked = losses(tmp_path, f"data.path={digits_dir}", "data.batch_size=16", "train.strategy=deepspeed",
                    "train.deepspeed.zero_stage=2", "train.precision=bf16", "optim.grad_clip=1.0", nproc=2)
    gaps = [abs(a - b) for a, b in zip(ranked, single_losses)]
    assert len(ranked) == STEPS and max(gaps) < 0.06, gaps  # measured 0.020 (bf16 weights)


@pytest.mark.slow
def test_deepspeed_accumulates_micro_batches_as_ddp_does(digits_dir, tmp_path):
    """Two micro-batches of 8 per rank and step: DeepSpeed is told which micro-batch ends the step.
    It used to count its own calls, which the loop makes once per step, and its losses left DDP's
    from the second step (2.2620 against 2.2650, measured); now they equal DDP's to the printed
    digits."""
    args = (f"data.path={digits_dir}", "data.batch_size=8", "optim.accumulate=2", "optim.warmup_epochs=1")
    ddp = losses(tmp_path / "ddp", *args, "train.strategy=ddp", nproc=2)
    zero2 = losses(tmp_path / "zero2", *args, "train.strategy=deepspeed", "train.deepspeed.zero_stage=2", nproc=2)
    assert len(ddp) == len(zero2) == STEPS
    # The engine steps its schedule once per optimizer step, as DDP's loop does (exact); the
    # losses agree to kernel rounding (0.0063 apart on a CPU without AVX-512).
    lrs = [[v for _, v in metric_history(tmp_path / name, "train/lr")] for name in ("ddp", "zero2")]
    assert lrs[0] == lrs[1]
    assert max(abs(a - b) for a, b in zip(ddp, zero2)) < 0.02


@pytest.mark.slow
def test_sync_bn_trains_under_ddp_and_its_checkpoints_load_into_a_plain_model(digits_dir, tmp_path):
    # The statistics themselves are checked against one process in tests/models/test_tdbn.py.
    done = train(f"run.root={tmp_path}", f"data.path={digits_dir}", "optim.epochs=1", "data.num_workers=1",
                 "train.strategy=ddp", "train.sync_bn=true", "data.batch_size=16", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train.sync_bn: 6 tdBN layers take their statistics over all 2 ranks" in done.stdout, done.stdout[-2000:]
    import timm

    import models.zoo  # noqa: F401  (registers the spiking networks)

    state = torch.load(sorted((tmp_path / "demo-digits" / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    timm.create_model("spiking_resnet_tiny", T=4, num_classes=10, in_chans=1).load_state_dict(state["model"])


# The single-process strategy in process: what the step loop relies on.

def torch_strategy(*overrides: str):
    from train.config import load_config
    from train.distributed import DistEnv
    from train.strategies import TorchStrategy

    cfg = load_config("configs/demo_digits.yaml", list(overrides))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    return TorchStrategy(cfg, DistEnv(0, 1, 0, torch.device("cpu")), model, optimizer, scheduler)


def test_accumulated_micro_batches_step_like_one_batch_of_their_mean_loss():
    whole, parts = torch_strategy(), torch_strategy("optim.accumulate=2")
    x = torch.randn(8, 4)
    with whole.forward() as forward:
        whole.backward(forward(x).square().mean())
    whole.step()
    for half in (x[:4], x[4:]):
        with parts.forward(sync=half is x[4:]) as forward:
            parts.backward(forward(half).square().mean())
    stats = parts.step()
    assert torch.allclose(whole.module.weight, parts.module.weight, atol=1e-6)
    assert stats["grad_norm"] > 0 and parts.lr() == 0.05  # the schedule advanced once


def test_clipping_bounds_the_update_and_a_skipped_step_changes_nothing():
    s = torch_strategy("optim.grad_clip=0.01")
    before = s.module.weight.detach().clone()
    with s.forward() as forward:
        s.backward(forward(torch.full((2, 4), 100.0)).sum())
    s.skip_step()
    assert s.module.weight.grad is None and torch.equal(s.module.weight, before) and s.lr() == 0.1
    with s.forward() as forward:
        s.backward(forward(torch.full((2, 4), 100.0)).sum())
    stats = s.step()
    # the weight's update is at most lr x the clipped norm (which it shares with the bias)
    assert stats["grad_norm"] > 1 and (s.module.weight - before).norm() <= 0.1 * 0.01 + 1e-6


def test_bf16_forward_runs_under_autocast_and_the_parts_are_what_a_checkpoint_needs():
    s = torch_strategy("train.precision=bf16")
    with s.forward() as forward:
        assert forward(torch.randn(2, 4)).dtype == torch.bfloat16
    parts, sharded = s.state()
    assert set(parts) == {"model", "optimizer", "scheduler", "scaler"} and sharded is None
