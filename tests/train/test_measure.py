"""The study's measurements (train/measure.py) on a tiny spiking ResNet trained in process on the
digits: perturbations of size 0 change nothing, attacks rank as they must, the attack gradient is
autograd's and FGSM/PGD agree with torchattacks, draws are seeded, streams carry state."""
import numpy as np
import pytest
import timm
import torch
from torch.nn import functional as F

import models.zoo  # noqa: F401  (registers the spiking networks)
from data_pipelines.digits import load_split
from train import measure

PIXEL_MAX = 16.0


@pytest.fixture(scope="module")
def digits():
    """Normalised digits as the loader gives them: ([N, 1, 8, 8] float32, [N] int64) per split."""
    splits = load_split()
    pixels = splits["train"][0].astype(np.float64)
    mean, std = float(pixels.mean()), float(pixels.std())
    meta = {"dataset": "digits", "pixel_max": PIXEL_MAX, "mean": [mean], "std": [std]}
    out = {k: (torch.tensor((x.astype(np.float32) - mean) / std), torch.tensor(y)) for k, (x, y) in splits.items()}
    return out, meta


@pytest.fixture(scope="module")
def trained(digits):
    """spiking_resnet_tiny after three epochs of SGD (val top-1 ~0.8)."""
    (splits, _) = digits
    torch.manual_seed(0)
    model = timm.create_model("spiking_resnet_tiny", T=4, num_classes=10, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = splits["train"]
    for epoch in range(3):
        for idx in torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch)).split(32):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


def val_batches(digits, count=3, size=64):
    x, y = digits[0]["val"]
    return [(x[i:i + size], y[i:i + size]) for i in range(0, count * size, size)]


def test_zero_noise_and_zero_budget_attacks_give_exactly_the_clean_top1(trained, digits):
    space = measure.InputSpace.from_meta(digits[1], torch.device("cpu"))
    batches = val_batches(digits)
    clean = measure.top1(trained, batches, device=torch.device("cpu"))
    assert clean > 0.5
    assert measure.top1(trained, batches, measure.gaussian_noise(space, 0.0, 0, 0), device=torch.device("cpu")) == clean
    assert measure.top1(trained, batches, measure.fgsm(trained, space, 0.0), device=torch.device("cpu")) == clean
    pgd = measure.pgd(trained, space, 0.0, steps=5, step_size=2.5, random_start=True, seed=0, rank=0)
    assert measure.top1(trained, batches, pgd, device=torch.device("cpu")) == clean


def test_pgd_is_no_weaker_than_fgsm_which_is_no_weaker_than_clean(trained, digits):
    space = measure.InputSpace.from_meta(digits[1], torch.device("cpu"))
    batches = val_batches(digits)
    cpu = torch.device("cpu")
    clean = measure.top1(trained, batches, device=cpu)
    for eps in (0.03, 0.1):
        fgsm = measure.top1(trained, batches, measure.fgsm(trained, space, eps), device=cpu)
        pgd = measure.top1(trained, batches, measure.pgd(trained, space, eps, steps=10, step_size=2.5,
                                                         random_start=True, seed=0, rank=0), device=cpu)
        assert pgd <= fgsm <= clean, (eps, clean, fgsm, pgd)
    assert pgd < clean - 0.1  # eps = 0.1 of the range (1.6 of 16) does real damage


def test_attacks_stay_inside_the_budget_and_the_valid_pixel_range(trained, digits):
    space = measure.InputSpace.from_meta(digits[1], torch.device("cpu"))
    (x, y), = val_batches(digits, count=1)
    mean, std = digits[1]["mean"][0], digits[1]["std"][0]
    for attack in (measure.fgsm(trained, space, 0.1),
                   measure.pgd(trained, space, 0.1, steps=5, step_size=2.5, random_start=True, seed=1, rank=0)):
        adv = attack(0, x, y)
        pixels, clean = adv * std + mean, x * std + mean
        assert pixels.min() >= -1e-4 and pixels.max() <= PIXEL_MAX + 1e-4
        assert (pixels - clean).abs().max() <= 0.1 * PIXEL_MAX + 1e-4
        assert not torch.equal(adv, x)


def test_attack_gradient_is_autograd_of_the_loss_through_surrogate_and_time(trained, digits):
    (x, y), = val_batches(digits, count=1)
    grad = measure.input_gradient(trained, x, y)
    x_ = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (expected,) = torch.autograd.grad(F.cross_entropy(trained(x_), y), x_)
    assert torch.equal(grad, expected) and grad.abs().sum() > 0  # the surrogate lets it through


class _ZeroOne(torch.nn.Module):
    """The model on [0, 1] images, as torchattacks expects them."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, x01):
        return self.model((x01 * PIXEL_MAX - self.mean) / self.std)


def test_fgsm_and_pgd_agree_with_torchattacks(trained, digits):
    torchattacks = pytest.importorskip("torchattacks")
    mean, std = digits[1]["mean"][0], digits[1]["std"][0]
    space = measure.InputSpace.from_meta(digits[1], torch.device("cpu"))
    (x, y), = val_batches(digits, count=1)
    x01 = (x * std + mean) / PIXEL_MAX
    wrapped = _ZeroOne(trained, mean, std)
    eps, steps, step_size = 0.05, 5, 2.5
    ours = {"fgsm": measure.fgsm(trained, space, eps)(0, x, y),
            "pgd": measure.pgd(trained, space, eps, steps=steps, step_size=step_size, random_start=False,
                               seed=0, rank=0, best_iterate=False)(0, x, y)}
    theirs = {"fgsm": torchattacks.FGSM(wrapped, eps=eps)(x01, y),
              "pgd": torchattacks.PGD(wrapped, eps=eps, alpha=step_size * eps / steps, steps=steps,
                                      random_start=False)(x01, y)}
    for name in ours:
        mine = (ours[name] * std + mean) / PIXEL_MAX
        close = torch.isclose(mine, theirs[name], atol=1e-5)
        # Rounding between the two input scales can flip the sign of a near-zero gradient.
        assert close.float().mean() > 0.999, (name, close.float().mean())
        assert (wrapped(theirs[name]).argmax(1) == trained(ours[name]).argmax(1)).float().mean() > 0.98


def test_noise_and_pgd_starts_are_functions_of_seed_batch_and_rank(trained, digits):
    space = measure.InputSpace.from_meta(digits[1], torch.device("cpu"))
    (x, y), = val_batches(digits, count=1)
    noise = measure.gaussian_noise(space, 0.1, seed=3, rank=0)
    assert torch.equal(noise(0, x, y), noise(0, x, y))
    assert not torch.equal(noise(0, x, y), noise(1, x, y))
    assert not torch.equal(noise(0, x, y), measure.gaussian_noise(space, 0.1, seed=3, rank=1)(0, x, y))
    torch.manual_seed(123)  # the global generator plays no part
    pgd = measure.pgd(trained, space, 0.05, steps=2, step_size=2.5, random_start=True, seed=3, rank=0)
    first = pgd(0, x, y)
    torch.manual_seed(456)
    assert torch.equal(first, pgd(0, x, y))


def test_per_channel_input_space_maps_pixel_fractions_and_range():
    meta = {"dataset": "cifar10", "mean": [125.0, 120.0, 110.0], "std": [60.0, 50.0, 40.0]}
    space = measure.InputSpace.from_meta(meta, torch.device("cpu"))
    assert torch.allclose(space.unit.flatten(), torch.tensor([255 / 60, 255 / 50, 255 / 40]))
    x = torch.full((2, 3, 4, 4), 100.0)
    clipped = space.clip(x) * torch.tensor([60.0, 50, 40]).view(1, 3, 1, 1) + torch.tensor([125.0, 120, 110]).view(1, 3, 1, 1)
    assert torch.allclose(clipped, torch.full_like(clipped, 255.0))
    dvs = measure.InputSpace.from_meta({"dataset": "dvs"}, torch.device("cpu"))
    assert dvs.unit == 1.0 and torch.equal(dvs.clip(torch.tensor([-2.0, 500.0])), torch.tensor([0.0, 500.0]))


def _firing_mlp(recurrence="none", reset="hard"):
    """A spiking MLP on digit rows (sequential digits) with running statistics from data."""
    torch.manual_seed(0)
    model = timm.create_model("spiking_mlp", T=8, num_classes=10, in_chans=8, hidden=(32,),
                              neuron=dict(recurrence=recurrence, reset=reset))
    rows = torch.tensor(load_split()["val"][0][:64, 0].astype(np.float32)).movedim(1, 0) / 4 - 1  # [8, 64, 8]
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(rows)
    return model.eval(), rows, torch.tensor(load_split()["val"][1][:64])


def test_stream_of_one_sample_is_per_sample_evaluation_and_longer_streams_carry_state():
    model, x, y = _firing_mlp()
    with torch.no_grad():
        per_sample = model(x)
        assert torch.allclose(measure.stream_logits(model, x, 1), per_sample, atol=1e-6)
        carried = measure.stream_logits(model, x, 8)
        # Within each stream the first sample starts from rest, as per-sample evaluation does.
        assert torch.allclose(carried[::8], per_sample[::8], atol=1e-6)
        assert not torch.allclose(carried, per_sample, atol=1e-3)
        # Sample 2 of stream 1 equals feeding samples 0 and 1 back to back by hand.
        by_hand = model.forward_steps(torch.cat([x[:, 0:1], x[:, 1:2]]))[8:].mean(0)
        assert torch.allclose(carried[1], by_hand[0], atol=1e-6)
        # A stream of 5 over 64 samples ends in a shorter stream of 4: still every sample once.
        assert measure.stream_logits(model, x, 5).shape == per_sample.shape
    assert 0 <= measure.stream_top1(model, [(x, y)], 8, device=torch.device("cpu")) <= 1
