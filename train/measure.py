"""What a trained spiking network is measured on: clean accuracy with firing statistics, and the
functional-roles study's generalisation, noise, gradient-attack and stream accuracies, with the
attacks that keep robustness from being overestimated: a transfer through another surrogate, the
per-sample worst case over every attack run, and a spike flip that keeps event input valid.

Every function takes batches `(x, y)` as the loaders yield them (normalised inputs, `[B, C, H, W]`
images or time-major `[T, B, ...]` sequences) and returns numbers summed over ranks before
dividing, so each rank measures its own shard. Perturbations are defined in pixel scale (see
`InputSpace`) and applied in the normalised space the model reads.

FGSM and PGD are written here rather than taken from torchattacks: torchattacks expects images in
[0, 1] of one layout, and our inputs are normalised per channel, sometimes sequences, and for DVS
event counts with no upper bound. tests/train/test_measure.py checks FGSM and PGD against
torchattacks on images, where both apply. torchattacks has no attack that keeps an input binary
or a whole event count (its sparse attacks, JSMA, OnePixel, SparseFool, move values to arbitrary
reals), so the spike flip is ours too.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from data_pipelines.meta import Meta
from data_pipelines.registry import spec as data_spec
from models import firing_counts, firing_report, reset_firing_counts, set_firing_recording
from models.neuron_config import Surrogate
from models.neurons import LIF
from train import distributed

Batches = Iterable[tuple[Tensor, Tensor]]
#: (batch index, normalised input, labels) -> the input the model is scored on.
Perturbation = Callable[[int, Tensor, Tensor], Tensor]

# Which measurement a random draw belongs to (the second word of its seed).
NOISE_DRAWS, PGD_DRAWS = 1, 2


@dataclass(frozen=True)
class InputSpace:
    """How the pixel scale maps onto the normalised input `x = (pixel - mean) / std`.

    unit: one full input range in normalised units (`pixel_max / std`, per channel), so a
        perturbation of size `s` (a fraction of the range) is `s * unit` in the model's input.
    lo, hi: the valid range in normalised units (pixel 0 and pixel_max); None = unbounded.
    batch_dim: 0 for image batches `[B, ...]`, 1 for time-major sequences `[T, B, ...]`.

    Event frames, and sequences stored as raw spike counts (SHD/SSC, delayed XOR: mean 0 and
    std 1, i.e. not normalised), are counts: the unit is one event or spike, counts stay >= 0 and
    have no upper bound (`counts` is true). That is the threat model for event and spike data: an
    attacker who adds or removes (fractional) events per frame, channel and pixel, never below
    zero; `spike_flip` keeps them whole.
    """
    unit: Tensor | float
    lo: Tensor | float | None
    hi: Tensor | float | None
    batch_dim: int = 0
    counts: bool = False

    @classmethod
    def from_meta(cls, meta: Meta, device: torch.device) -> InputSpace:
        """From a data set's `Meta` (`pixel_max`, per-channel `mean`, `std`) and its spec's kind
        (image `[B, C, H, W]`; sequence `[T, B, F]`; events `[T, B, 2, H, W]`)."""
        kind = data_spec(meta.dataset).kind
        batch_dim = 1 if kind in ("sequence", "events") else 0
        if kind == "events" or (kind == "sequence" and meta.mean == [0.0] and meta.std == [1.0]):
            return cls(1.0, 0.0, None, batch_dim, counts=True)
        pixel_max = float(meta.pixel_max)
        mean = torch.tensor(meta.mean, dtype=torch.float32, device=device)
        std = torch.tensor(meta.std, dtype=torch.float32, device=device)
        if mean.numel() > 1:  # per channel of an image batch [B, C, H, W]
            mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        else:
            mean, std = mean.reshape(()), std.reshape(())
        return cls(pixel_max / std, (0.0 - mean) / std, (pixel_max - mean) / std, batch_dim)

    def per_sample(self, values: Tensor, ndim: int) -> Tensor:
        """`values [B]` shaped to broadcast against an input of `ndim` dimensions."""
        shape = [1] * ndim
        shape[self.batch_dim] = -1
        return values.view(shape)

    def clip(self, x: Tensor) -> Tensor:
        """`x` limited to the valid range."""
        if self.lo is not None:
            x = torch.maximum(x, torch.as_tensor(self.lo, dtype=x.dtype, device=x.device))
        if self.hi is not None:
            x = torch.minimum(x, torch.as_tensor(self.hi, dtype=x.dtype, device=x.device))
        return x


def generator(seed: int, *words: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *words): draws depend on nothing else, so a rerun on
    any device gives the same numbers."""
    state = np.random.SeedSequence([seed, *words]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def mean_over_time(logits: Tensor) -> Tensor:
    """Logits `[B, classes]`, averaging per-step logits `[T, B, classes]` over time."""
    return logits.mean(0) if logits.ndim == 3 else logits


def limit(batches: Batches, count: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The first `count` batches (all when 0)."""
    return itertools.islice(batches, count or None)


# ---------------------------------------------------------------------------------- clean


@torch.no_grad()
def clean_metrics(model: nn.Module, batches: Batches, *, device: torch.device,
                  forward: Callable[[Tensor], Tensor] | None = None,
                  criterion: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> dict[str, float]:
    """Loss, top-1, top-5 and per-layer firing statistics of `model` in eval mode.

    forward: how to call the model (autocast, input casts of a strategy); `model(x)` if None.
        Per-step logits `[T, B, classes]` also give `val/top1_t<k>`: top-1 of the mean of the
        first k steps' logits, the accuracy had inference stopped after k steps.
    criterion: the batch-mean loss on mean logits (the trainer's, label smoothing included).
    Returns `val/loss`, `val/top1`, `val/top5` and `firing_report`'s keys (rates, sparsity, SOPs
    and energy per image), over all ranks.
    """
    forward = forward or model
    was_training = model.training
    model.eval()
    set_firing_recording(model, True)
    reset_firing_counts(model)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, n
    per_step: Tensor | None = None  # correct after k = 1..T steps
    try:
        for x, y in batches:
            logits = forward(x).float()
            if logits.ndim == 3:
                steps = torch.arange(1, logits.shape[0] + 1, device=logits.device).view(-1, 1, 1)
                early = (logits.cumsum(0) / steps).argmax(-1) == y  # [T, B]
                correct = early.sum(1).double()
                per_step = correct if per_step is None else per_step + correct
                logits = logits.mean(0)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            totals += torch.stack([criterion(logits, y).double() * len(y),
                                   (top5[:, 0] == y).sum().double(), (top5 == y[:, None]).any(1).sum().double(),
                                   torch.tensor(len(y), dtype=torch.float64, device=device)])
        counts = firing_counts(model)
    finally:
        set_firing_recording(model, False)
        model.train(was_training)
    names = list(counts)
    if names:
        stacked = distributed.all_reduce_sum(torch.stack([counts[k] for k in names]))
        counts = {k: stacked[i] for i, k in enumerate(names)}
    loss_sum, top1, top5, n = distributed.all_reduce_sum(totals).tolist()
    if n == 0:
        raise ValueError("clean_metrics: no batches to evaluate")
    early_top1 = {}
    if per_step is not None:
        early_top1 = {f"val/top1_t{k}": c / n for k, c in enumerate(distributed.all_reduce_sum(per_step).tolist(), 1)}
    return {"val/loss": loss_sum / n, "val/top1": top1 / n, "val/top5": top5 / n, **early_top1,
            **firing_report(counts, model, images=int(n))}


# ------------------------------------------------------------------------------- perturbed


def top1(model: nn.Module, batches: Batches, perturb: Perturbation | None = None, *,
         device: torch.device) -> float:
    """Top-1 of `model` (eval mode) on `batches`, each input first passed through `perturb`."""
    return fraction(correct_under(model, batches, {"x": perturb})["x"], device=device)


def correct_under(model: nn.Module, batches: Batches, perturbs: Mapping[str, Perturbation | None]) -> dict[str, Tensor]:
    """Per-sample correctness under each named perturbation (None: the clean input): name ->
    bool `[N]` over this rank's samples in batch order. Every perturbation sees each batch
    before the next is read (the loaders' buffers hold one batch)."""
    out: dict[str, list[Tensor]] = {name: [] for name in perturbs}
    for i, (x, y) in enumerate(batches):
        for name, perturb in perturbs.items():
            x_p = perturb(i, x, y) if perturb is not None else x
            with torch.no_grad():
                out[name].append(mean_over_time(model(x_p)).argmax(-1) == y)
    return {name: torch.cat(rows) if rows else torch.zeros(0, dtype=torch.bool) for name, rows in out.items()}


def worst_case(correct: Mapping[str, Tensor]) -> Tensor:
    """`[N]` bool: a sample counts correct only if it is correct under every one of `correct`'s
    perturbations (all over the same samples), so its mean is <= each one's top-1."""
    rows = list(correct.values())
    if not rows:
        raise ValueError("worst_case: no perturbation to take the worst of")
    return torch.stack(rows).all(0)


def fraction(correct: Tensor, *, device: torch.device) -> float:
    """Mean of per-sample `correct [N]` over every rank's samples (nan when there are none)."""
    counts = torch.tensor([float(correct.sum()), float(correct.numel())], dtype=torch.float64, device=device)
    right, n = distributed.all_reduce_sum(counts).tolist()
    return right / n if n else float("nan")


def gaussian_noise(space: InputSpace, sigma: float, seed: int, rank: int) -> Perturbation:
    """Adds N(0, sigma^2) pixel-scale noise (sigma a fraction of the range), then clips; the draw
    for batch i is a function of (seed, sigma, i, rank)."""
    def perturb(i: int, x: Tensor, y: Tensor) -> Tensor:
        if sigma == 0:
            return x
        g = generator(seed, NOISE_DRAWS, int(round(sigma * 1e6)), i, rank)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device)
        return space.clip(x + sigma * space.unit * noise)
    return perturb


def input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """d(mean cross-entropy)/dx through the surrogate gradients and through time (BPTT)."""
    return _loss_and_gradient(model, x, y)[1]


def _loss_and_gradient(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(per-sample loss [B], d(mean loss)/dx, correct [B] bool) at `x`."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = mean_over_time(model(x)).float()
        losses = F.cross_entropy(logits, y, reduction="none")
        (grad,) = torch.autograd.grad(losses.mean(), x)
    return losses.detach(), grad, logits.detach().argmax(-1) == y


def fgsm(model: nn.Module, space: InputSpace, eps: float) -> Perturbation:
    """Fast gradient sign method (Goodfellow et al. 2015), L-inf budget `eps` of the range."""
    def perturb(i: int, x: Tensor, y: Tensor) -> Tensor:
        if eps == 0:
            return x
        return space.clip(x + eps * space.unit * input_gradient(model, x, y).sign())
    return perturb


def pgd(model: nn.Module, space: InputSpace, eps: float, *, steps: int, step_size: float,
        random_start: bool, seed: int, rank: int, best_iterate: bool = True) -> Perturbation:
    """Projected gradient descent (Madry et al. 2018), L-inf ball of `eps` (fraction of the range):
    `steps` signed-gradient steps of `step_size * eps / steps`, each projected back into the
    ball around the clean input and into the valid range. The random start for batch i is a
    function of (seed, eps, i, rank). `best_iterate`: each sample keeps its most damaging
    iterate instead of the last one."""
    def perturb(i: int, x: Tensor, y: Tensor) -> Tensor:
        if eps == 0:
            return x
        radius = eps * space.unit
        alpha = step_size * radius / steps
        clean = x.detach()
        adv = clean.clone()
        if random_start:
            g = generator(seed, PGD_DRAWS, int(round(eps * 1e6)), i, rank)
            start = torch.rand(x.shape, generator=g, dtype=torch.float32).to(x.device) * 2 - 1
            adv = space.clip(adv + start * radius)
        # Surrogate gradients of a spiking network are coarse: a later iterate can be less
        # damaging than an earlier one, so each sample keeps its most damaging iterate
        # (misclassified first, then highest loss), as robust evaluations do (e.g. APGD).
        if not best_iterate:
            for _ in range(steps):
                adv = adv + alpha * input_gradient(model, adv, y).sign()
                adv = space.clip(torch.minimum(torch.maximum(adv, clean - radius), clean + radius))
            return adv.detach()
        best, best_score = adv, None
        for step in range(steps + 1):
            loss, grad, correct = _loss_and_gradient(model, adv, y)
            score = loss - correct.float() * 1e9  # any misclassified iterate beats a correct one
            if best_score is None:
                best_score = score
            else:
                better = score > best_score
                best = torch.where(space.per_sample(better, adv.ndim), adv, best)
                best_score = torch.where(better, score, best_score)
            if step == steps:
                break
            adv = adv + alpha * grad.sign()
            adv = space.clip(torch.minimum(torch.maximum(adv, clean - radius), clean + radius))
        return best.detach()
    return perturb


# ----------------------------------------------------------- another surrogate, spike flips

#: Each surrogate's usual width, for an attack through a surrogate the model was not trained with:
#: STBP-tdBN's a = 1, SpikingJelly's sigmoid alpha = 4 and atan alpha = 2, a triangle of half-width 1.
USUAL_WIDTH = {Surrogate.rectangular: 1.0, Surrogate.sigmoid: 4.0, Surrogate.atan: 2.0, Surrogate.triangle: 1.0}


@contextmanager
def surrogate_swapped(model: nn.Module, kind: Surrogate, width: float) -> Iterator[None]:
    """Within the block every LIF layer of `model` backpropagates through surrogate `kind` of
    `width` instead of its own; forward is unchanged (a spike is H(u - V_th) whatever the
    surrogate), weights too. Restored on exit, also after an error."""
    layers = [m for m in model.modules() if isinstance(m, LIF)]
    saved = [m.spec for m in layers]
    try:
        for m in layers:
            m.spec = dataclasses.replace(m.spec, surrogate=kind, surrogate_width=width)
        yield
    finally:
        for m, spec in zip(layers, saved):
            m.spec = spec


def through_surrogate(model: nn.Module, attack: Perturbation, kind: Surrogate, width: float) -> Perturbation:
    """`attack` (on `model`) with every gradient it takes passed through surrogate `kind` of
    `width`: a robustness that only one surrogate's gradient fails to break is overestimated."""
    def perturb(i: int, x: Tensor, y: Tensor) -> Tensor:
        with surrogate_swapped(model, kind, width):
            return attack(i, x, y)
    return perturb


def spike_flip(model: nn.Module, budget: int, *, rounds: int, batch_dim: int = 1) -> Perturbation:
    """Gradient-guided spike flipping (after Liang et al. 2020's restricted spike flipper): at
    most `budget` entries of each sample change, each by one spike/event, so the input stays a
    valid one.

    The input is binary spikes (every value 0 or 1: a flip is 0 -> 1 or 1 -> 0, values stay in
    {0, 1}) or whole event counts >= 0 (a flip adds or removes one event, never below 0).
    In each of `rounds` rounds the input gradient of the loss (through the surrogate and time)
    ranks the entries by the first-order loss increase of their best one-spike change; the
    round's share of the budget goes to the highest positive ones not changed before. x:
    `[T, B, ...]` (`batch_dim` 1) or `[B, ...]` (0); deterministic (no random draw).
    """
    def perturb(i: int, x: Tensor, y: Tensor) -> Tensor:
        if budget == 0:
            return x
        binary = bool(((x == 0) | (x == 1)).all())
        if not binary and bool((x < 0).any() | (x != x.round()).any()):
            raise ValueError("spike_flip: the input is neither binary spikes nor whole event counts >= 0")
        adv = x.detach().clone()
        changed = torch.zeros_like(adv, dtype=torch.bool)
        for r in range(rounds):
            share = budget * (r + 1) // rounds - budget * r // rounds
            if share == 0:
                continue
            grad = _loss_and_gradient(model, adv, y)[1]
            # +1 spike raises the loss by ~grad, -1 spike by ~-grad; a -1 needs one to remove,
            # a +1 on binary input needs an empty entry.
            can_add = adv < 1 if binary else torch.ones_like(changed)
            gain = torch.where(grad > 0, grad * can_add, -grad * (adv >= 1)).masked_fill(changed, 0)
            flat = gain.movedim(batch_dim, 0).flatten(1)  # [B, entries]
            top = flat.topk(min(share, flat.shape[1]), dim=1)
            chosen = torch.zeros_like(flat).scatter_(1, top.indices, (top.values > 0).to(flat.dtype))
            chosen = chosen.view(gain.movedim(batch_dim, 0).shape).movedim(0, batch_dim)
            adv = adv + chosen * torch.where(grad > 0, 1.0, -1.0).to(adv.dtype)
            changed |= chosen.bool()
        return adv
    return perturb


# ---------------------------------------------------------------------------------- stream


def stream_logits(model: nn.Module, x: Tensor, length: int) -> Tensor:
    """Logits `[B, classes]` of a time-major batch `[T, B, ...]` when each run of `length`
    consecutive samples is fed back to back as one stream, without resetting the neurons
    between samples (the last stream may be shorter).

    The samples of a stream are concatenated along time and run in one call of
    `model.forward_steps` (`[steps, B, classes]`): the neuron op is a loop over time, so this is
    the same as carrying each layer's `LIFState` from one sample into the next. A sample's
    logits are the mean of its own T steps. `length=1` is ordinary per-sample evaluation.
    """
    steps, batch = x.shape[:2]
    full = batch // length * length
    parts = [(x[:, :full], length)] if full else []
    if full < batch:
        parts.append((x[:, full:], batch - full))
    out = []
    for part, per_stream in parts:
        streams = part.shape[1] // per_stream
        # [T, S*L, ...] -> [L*T, S, ...]: step l*T + t of stream s is step t of sample s*L + l.
        seq = part.unflatten(1, (streams, per_stream)).movedim(2, 0).flatten(0, 1)
        logits = model.forward_steps(seq).unflatten(0, (per_stream, steps)).mean(1)  # [L, S, classes]
        out.append(logits.transpose(0, 1).flatten(0, 1))  # back to sample order
    return torch.cat(out)


@torch.no_grad()
def stream_top1(model: nn.Module, batches: Batches, length: int, *, device: torch.device) -> float:
    """Top-1 over samples evaluated as streams of `length` (see `stream_logits`)."""
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        pred = stream_logits(model, x, length).argmax(-1)
        correct += torch.tensor([float((pred == y).sum()), float(len(y))], dtype=torch.float64, device=device)
    right, n = distributed.all_reduce_sum(correct).tolist()
    return right / n if n else float("nan")
