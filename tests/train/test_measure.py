"""The study's measurements (train/measure.py) on a tiny spiking ResNet trained in process on the
digits: perturbations of size 0 change nothing, attacks rank as they must, the attack gradient is
autograd's and FGSM/PGD agree with torchattacks, draws are seeded, streams carry state; the
transfer attack uses the other surrogate, the worst case is no better than any attack, spike
flips keep the input valid; the loss landscape starts at the trained loss and is seeded."""
import dataclasses

import numpy as np
import pytest
import timm
import torch
from torch.nn import functional as F

import models.zoo  # noqa: F401  (registers the spiking networks)
from data_pipelines.digits import load_split
from data_pipelines.meta import Meta
from models.neuron_config import Surrogate
from models.neurons import LIF
from train import landscape, measure, tsne
from train.config import ConfigError, EvalConfig
from train.evaluate import attack_budgets

PIXEL_MAX = 16.0


def _meta(dataset: str, **fields) -> Meta:
    """A data set's Meta with only what the input space reads filled in."""
    return Meta(dataset=dataset, num_classes=10, classes=[], in_chans=1, counts={}, **fields)


@pytest.fixture(scope="module")
def digits():
    """Normalised digits as the loader gives them: ([N, 1, 8, 8] float32, [N] int64) per split."""
    splits = load_split()
    pixels = splits["train"][0].astype(np.float64)
    mean, std = float(pixels.mean()), float(pixels.std())
    meta = _meta("digits", pixel_max=PIXEL_MAX, mean=[mean], std=[std])
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
    mean, std = digits[1].mean[0], digits[1].std[0]
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
    mean, std = digits[1].mean[0], digits[1].std[0]
    space = measure.InputSpace.from_meta(digits[1], torch.device("cpu"))
    (x, y), = val_batches(digits, count=1)
    x01 = (x * std + mean) / PIXEL_MAX
    wrapped = _ZeroOne(trained, mean, std).eval()  # torchattacks restores the wrapper's mode onto `trained`
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
    meta = _meta("cifar10", mean=[125.0, 120.0, 110.0], std=[60.0, 50.0, 40.0])
    space = measure.InputSpace.from_meta(meta, torch.device("cpu"))
    assert torch.allclose(space.unit.flatten(), torch.tensor([255 / 60, 255 / 50, 255 / 40]))
    x = torch.full((2, 3, 4, 4), 100.0)
    clipped = space.clip(x) * torch.tensor([60.0, 50, 40]).view(1, 3, 1, 1) + torch.tensor([125.0, 120, 110]).view(1, 3, 1, 1)
    assert torch.allclose(clipped, torch.full_like(clipped, 255.0))
    dvs = measure.InputSpace.from_meta(_meta("dvs", T=4), torch.device("cpu"))
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


# ------------------------------------------------- robustness that is not overestimated


def test_transfer_attack_takes_its_gradients_through_the_other_surrogate(trained, digits):
    space = measure.InputSpace.from_meta(digits[1], torch.device("cpu"))
    (x, y), = val_batches(digits, count=1)
    own = measure.input_gradient(trained, x, y)
    # The same weights in a network built with atan(2): what the swapped gradient must be.
    other = timm.create_model("spiking_resnet_tiny", T=4, num_classes=10, in_chans=1,
                              neuron=dict(surrogate="atan", surrogate_width=2.0))
    other.load_state_dict(trained.state_dict())
    other.eval().requires_grad_(False)
    with measure.surrogate_swapped(trained, Surrogate.atan, 2.0):
        swapped = measure.input_gradient(trained, x, y)
        assert all(m.spec.surrogate is Surrogate.atan for m in trained.modules() if isinstance(m, LIF))
    assert torch.allclose(swapped, measure.input_gradient(other, x, y), rtol=1e-5, atol=1e-8)
    assert not torch.allclose(swapped, own, rtol=1e-2)  # a different gradient, not the trained one's
    assert torch.equal(measure.input_gradient(trained, x, y), own)  # restored on exit
    transfer = measure.through_surrogate(trained, measure.fgsm(trained, space, 0.05), Surrogate.atan, 2.0)
    assert torch.equal(transfer(0, x, y), measure.fgsm(other, space, 0.05)(0, x, y))
    with pytest.raises(RuntimeError), measure.surrogate_swapped(trained, Surrogate.sigmoid, 4.0):
        raise RuntimeError("an attack failing inside the block")
    assert all(m.spec.surrogate is Surrogate.rectangular for m in trained.modules() if isinstance(m, LIF))


def test_worst_case_top1_is_at_most_every_attacks_top1_on_every_sample_set(trained, digits):
    space = measure.InputSpace.from_meta(digits[1], torch.device("cpu"))
    cpu = torch.device("cpu")
    batches = val_batches(digits, count=2)
    pgd = measure.pgd(trained, space, 0.05, steps=2, step_size=2.5, random_start=True, seed=0, rank=0)
    attacks = {"clean": None, "fgsm": measure.fgsm(trained, space, 0.05), "pgd": pgd,
               "transfer": measure.through_surrogate(trained, pgd, Surrogate.atan, 2.0)}
    correct = measure.correct_under(trained, batches, attacks)
    worst = measure.worst_case(correct)
    assert worst.shape == (2 * 64,) and torch.equal(worst, correct["clean"] & correct["fgsm"] & correct["pgd"]
                                                    & correct["transfer"])
    subsets = [torch.arange(128), torch.arange(64), torch.arange(64, 128)]
    subsets += [torch.randperm(128, generator=torch.Generator().manual_seed(s))[:40] for s in range(20)]
    for subset in subsets:
        for name, c in correct.items():
            assert worst[subset].float().mean() <= c[subset].float().mean(), name
    # The per-sample correctness is what top1 counts, attack by attack.
    assert measure.fraction(correct["fgsm"], device=cpu) == measure.top1(trained, batches, attacks["fgsm"], device=cpu)
    assert measure.fraction(worst, device=cpu) < measure.fraction(correct["clean"], device=cpu)


def test_image_attack_preset_is_eps_8_of_255_with_pgd_7_steps_of_2_of_255(digits):
    space = measure.InputSpace.from_meta(digits[1], torch.device("cpu"))
    grid = EvalConfig(epsilons=[0.0, 0.1], pgd_steps=3, pgd_step_size=2.5)
    assert attack_budgets(grid, space) == [(0.0, 3, 2.5), (0.1, 3, 2.5)]
    eps, steps, step_size = attack_budgets(dataclasses.replace(grid, image_attack=True), space)[-1]
    assert (eps, steps) == (8 / 255, 7) and step_size * eps / steps == pytest.approx(2 / 255, rel=1e-12)
    with pytest.raises(ConfigError, match="eval.epsilons"):  # the same eps twice would share a metric
        attack_budgets(EvalConfig(epsilons=[8 / 255], image_attack=True), space)
    events = measure.InputSpace.from_meta(_meta("dvs", T=4), torch.device("cpu"))
    with pytest.raises(ConfigError, match="eval.image_attack"):
        attack_budgets(EvalConfig(image_attack=True), events)


def _spiking_mlp_on(x: torch.Tensor) -> torch.nn.Module:
    """An untrained spiking MLP for `x [T, B, F]`, its tdBN statistics taken from `x`."""
    torch.manual_seed(0)
    model = timm.create_model("spiking_mlp", T=x.shape[0], num_classes=10, in_chans=x.shape[2], hidden=(32,))
    with torch.no_grad():
        model.train()(x)
    return model.eval().requires_grad_(False)


def _changed_per_sample(adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (adv != x).movedim(1, 0).flatten(1).sum(1)


def test_spike_flip_keeps_spikes_binary_and_changes_at_most_k_per_sample():
    rows = torch.tensor(load_split()["val"][0][:64, 0].astype(np.float32)).movedim(1, 0)  # [8, 64, 8]
    x, y = (rows > 4).float(), torch.tensor(load_split()["val"][1][:64])
    model = _spiking_mlp_on(x)
    clean_loss = F.cross_entropy(model(x), y)
    for k in (1, 5, 20):
        adv = measure.spike_flip(model, k, rounds=3)(0, x, y)
        assert set(adv.unique().tolist()) <= {0.0, 1.0}, k
        changed = _changed_per_sample(adv, x)
        assert changed.max() <= k and changed.sum() > 0, (k, changed)
    assert F.cross_entropy(model(adv), y) > clean_loss  # gradient-guided: the loss goes up
    assert torch.equal(measure.spike_flip(model, 0, rounds=3)(0, x, y), x)


def test_spike_flip_keeps_event_counts_whole_and_nonnegative():
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((6, 32, 8), 0.8), generator=g)  # counts 0, 1, 2, ...
    y = torch.randint(0, 10, (32,), generator=g)
    model = _spiking_mlp_on(x)
    adv = measure.spike_flip(model, 10, rounds=2)(0, x, y)
    assert (adv >= 0).all() and torch.equal(adv, adv.round()) and (adv - x).abs().max() <= 1
    assert _changed_per_sample(adv, x).max() <= 10 and (adv > 1).any()
    with pytest.raises(ValueError, match="neither binary spikes nor whole event counts"):
        measure.spike_flip(model, 10, rounds=2)(0, x - 0.5, y)


def test_count_input_is_event_frames_and_unnormalised_spike_sequences():
    cpu = torch.device("cpu")
    assert measure.InputSpace.from_meta(_meta("dvs", T=4), cpu).counts
    assert measure.InputSpace.from_meta(_meta("seqdigits", T=8, mean=[0.0], std=[1.0]), cpu).counts
    normalised = measure.InputSpace.from_meta(_meta("seqdigits", T=8, mean=[4.9], std=[6.0], pixel_max=16), cpu)
    assert not normalised.counts and normalised.batch_dim == 1


# ------------------------------------------------------------ landscape and features


def test_loss_curve_at_zero_is_the_trained_loss_and_the_same_seed_gives_the_same_curve(trained, digits, tmp_path):
    cpu = torch.device("cpu")
    batches = val_batches(digits, count=1)
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    alphas = landscape.grid(2, 1.0)
    assert len(alphas) == 5 and alphas[2] == 0.0 and alphas[0] == -1.0 and alphas[-1] == 1.0
    direction = landscape.filter_normalised_direction(trained, seed=0, index=0)
    curve = landscape.loss_curve(trained, batches, direction, alphas, device=cpu)
    assert curve[2] == pytest.approx(measure.clean_metrics(trained, batches, device=cpu)["val/loss"], rel=1e-9)
    again = landscape.loss_curve(trained, batches, landscape.filter_normalised_direction(trained, 0, 0), alphas,
                                 device=cpu)
    assert np.array_equal(curve, again)
    other = landscape.loss_curve(trained, batches, landscape.filter_normalised_direction(trained, 1, 0), alphas,
                                 device=cpu)
    assert not np.allclose(curve, other)
    assert landscape.sharpness(curve, alphas) == curve.max() - curve[2] > 0  # a full filter norm away hurts
    # The surface's beta = 0 column is the curve along d1; its centre the trained loss.
    d2 = landscape.filter_normalised_direction(trained, 0, 1)
    surface = landscape.loss_surface(trained, batches, (direction, d2), alphas, device=cpu)
    assert np.array_equal(surface[:, 2], curve)
    assert all(torch.equal(v, before[k]) for k, v in trained.state_dict().items())  # weights restored
    assert landscape.plot_curve(alphas, curve, tmp_path / "c.png", "c").stat().st_size > 1000
    assert landscape.plot_surface(alphas, surface, tmp_path / "s.png", "s").stat().st_size > 1000


def test_directions_are_zero_on_norm_and_bias_parameters_and_filter_normalised(trained):
    direction = landscape.filter_normalised_direction(trained, seed=0, index=0)
    params = list(trained.parameters())
    assert len(direction) == len(params) and any(p.ndim == 1 for p in params)
    for p, d in zip(params, direction):
        assert d.shape == p.shape
        if p.ndim <= 1:
            assert not d.any()  # tdBN/BN scales and shifts, biases (Li et al.'s ignore='biasbn')
        else:
            assert torch.allclose(d.flatten(1).norm(dim=1), p.flatten(1).norm(dim=1), rtol=1e-4)


def test_tsne_of_penultimate_features_is_seeded_and_plotted(trained, digits, tmp_path):
    features, labels = tsne.penultimate_features(trained, val_batches(digits, count=2, size=32), samples=50)
    assert features.shape == (50, trained.fc.in_features) and labels.shape == (50,)
    embedded = tsne.embedding(features, seed=0)
    assert embedded.shape == (50, 2) and np.array_equal(embedded, tsne.embedding(features, seed=0))
    assert tsne.plot(embedded, labels, tmp_path / "t.png", "t").stat().st_size > 1000
