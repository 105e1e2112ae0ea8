"""Loss-landscape flatness of a trained network along filter-normalised random directions (Li,
Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018).

A direction `d` has the shape of the weights; each filter of it (a slice along a weight's first
axis: one output channel of a convolution, one row of a linear or recurrent matrix) is Gaussian,
rescaled to the norm of the same filter of the trained weights, so that a step `alpha` moves
every filter by the same fraction of its own size whatever the scale its normalisation layer
(tdBN) made irrelevant. As in Li et al. (their `ignore='biasbn'`) the direction is zero on 1-D
parameters: tdBN/BN scales and shifts, biases, and a neuron's per-channel thresholds, decays
and self-recurrent weights. BN running statistics are buffers and stay as trained (eval mode).

The curve is `L(theta + alpha d)` for alpha on an even grid over [-radius, radius] that holds 0,
the surface `L(theta + alpha d1 + beta d2)`, and the sharpness the largest rise of the curve
above the trained loss, `max_alpha L(theta + alpha d) - L(theta)` (a flat minimum gives a small
number). Directions are a function of (run.seed, direction index, parameter index) only, the
same on every rank, so a run's curve is the same at every rerun and world size; losses are
summed over ranks. The loss is the evaluation's: cross-entropy of the mean-over-time logits.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import matplotlib

matplotlib.use("Agg")  # evaluation nodes have no display
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from train import distributed  # noqa: E402
from train.measure import generator, mean_over_time  # noqa: E402

#: Which measurement a random draw belongs to (the second word of its seed; train.measure has 1, 2).
DIRECTION_DRAWS = 3


def filter_normalised_direction(model: nn.Module, seed: int, index: int) -> list[Tensor]:
    """One random direction, a tensor per parameter of `model` (in `parameters()` order, each of
    its parameter's shape, dtype and device): zero on 1-D parameters, else Gaussian per filter
    (slice along dim 0) scaled to that filter's norm in the current weights. Drawn on the CPU
    from (seed, DIRECTION_DRAWS, index, parameter index)."""
    direction = []
    for k, p in enumerate(model.parameters()):
        if p.ndim <= 1:
            direction.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator(seed, DIRECTION_DRAWS, index, k), dtype=torch.float32)
        d = d.to(device=p.device, dtype=p.dtype)
        scale = p.detach().flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-10)  # Li et al.'s 1e-10
        direction.append(d * scale.view(-1, *[1] * (p.ndim - 1)))
    return direction


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], *, device: torch.device) -> float:
    """Mean cross-entropy of the mean-over-time logits over every sample of `batches` on every
    rank (summed as `clean_metrics` sums its `val/loss`)."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        logits = mean_over_time(model(x).float())
        totals += torch.stack([F.cross_entropy(logits, y).double() * len(y),
                               torch.tensor(len(y), dtype=torch.float64, device=device)])
    loss_sum, n = distributed.all_reduce_sum(totals).tolist()
    if n == 0:
        raise ValueError("mean_loss: no batches")
    return loss_sum / n


@contextmanager
def _restored(model: nn.Module) -> Iterator[list[Tensor]]:
    """The trained weights (copies), written back into `model` on exit."""
    trained = [p.detach().clone() for p in model.parameters()]
    try:
        yield trained
    finally:
        with torch.no_grad():
            for p, t in zip(model.parameters(), trained):
                p.copy_(t)


def _moved(model: nn.Module, trained: list[Tensor], steps: Sequence[tuple[float, list[Tensor]]]) -> None:
    """Weights = trained + sum of alpha * direction over `steps` (exactly trained when all alphas are 0)."""
    with torch.no_grad():
        for k, (p, t) in enumerate(zip(model.parameters(), trained)):
            moved = t.clone()
            for alpha, direction in steps:
                if alpha != 0:
                    moved += alpha * direction[k]
            p.copy_(moved)


def grid(points: int, radius: float) -> np.ndarray:
    """`2 * points + 1` step sizes evenly over [-radius, radius]; the middle one is exactly 0."""
    return np.concatenate([-radius * np.arange(points, 0, -1) / points, [0.0], radius * np.arange(1, points + 1) / points])


def loss_curve(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], direction: list[Tensor],
               alphas: np.ndarray, *, device: torch.device) -> np.ndarray:
    """`L(theta + alpha * direction)` for each alpha (same length as `alphas`); `model`'s
    weights are restored afterwards."""
    with _restored(model) as trained:
        curve = []
        for alpha in alphas:
            _moved(model, trained, [(float(alpha), direction)])
            curve.append(mean_loss(model, batches, device=device))
    return np.array(curve)


def loss_surface(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], directions: tuple[list[Tensor], list[Tensor]],
                 alphas: np.ndarray, *, device: torch.device) -> np.ndarray:
    """`[len(alphas), len(alphas)]`: entry (i, j) is `L(theta + alphas[i] d1 + alphas[j] d2)`;
    `model`'s weights are restored afterwards."""
    d1, d2 = directions
    surface = np.zeros((len(alphas), len(alphas)))
    with _restored(model) as trained:
        for i, a in enumerate(alphas):
            for j, b in enumerate(alphas):
                _moved(model, trained, [(float(a), d1), (float(b), d2)])
                surface[i, j] = mean_loss(model, batches, device=device)
    return surface


def sharpness(curve: np.ndarray, alphas: np.ndarray) -> float:
    """The curve's largest rise above its value at alpha = 0 (the trained loss); >= 0."""
    return float(curve.max() - curve[int(np.flatnonzero(alphas == 0)[0])])


def plot_curve(alphas: np.ndarray, curve: np.ndarray, path: Path, title: str) -> Path:
    """The 1-D curve as a PNG at `path`: loss over the step alpha (filter norms), trained weights
    at 0. Returns `path`."""
    fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    ax.plot(alphas, curve, marker="o", markersize=3)
    ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("alpha (step along a filter-normalised direction)")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_surface(alphas: np.ndarray, surface: np.ndarray, path: Path, title: str) -> Path:
    """The 2-D surface as a filled contour PNG at `path` (Li et al.'s contour plots), the trained
    weights marked at the origin. Returns `path`."""
    fig, ax = plt.subplots(figsize=(5, 4.2), constrained_layout=True)
    filled = ax.contourf(alphas, alphas, surface.T, levels=20, cmap="viridis")  # x: alpha (d1), y: beta (d2)
    ax.contour(alphas, alphas, surface.T, levels=filled.levels, colors="white", linewidths=0.3)
    fig.colorbar(filled, ax=ax, label="loss")
    ax.plot([0.0], [0.0], marker="x", color="red")
    ax.set_xlabel("alpha (direction 1)")
    ax.set_ylabel("beta (direction 2)")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
