"""Static charts that go into a run's artifacts (rendered headless with matplotlib's Agg backend)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # training nodes have no display; never let matplotlib probe for one
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
import numpy as np  # noqa: E402


def plot_firing_rates(history: dict[int, dict[str, float]], path: Path) -> Path:
    """Render per-layer firing rates over epochs to a PNG.

    history: epoch -> {neuron layer name: firing rate}, a rate being spikes per neuron per
        timestep in [0, 1]. Layers missing at some epoch are drawn blank there.
    Left panel: heatmap, one row per layer (network order as first seen), one column per epoch.
    Right panel: the rates at the last epoch as horizontal bars, with the mean over layers.
    Returns `path`.
    """
    if not history:
        raise ValueError("plot_firing_rates needs at least one epoch of firing rates")
    epochs = sorted(history)
    layers: list[str] = []
    for e in epochs:  # keep network order as the trainer reported it, not alphabetical
        layers.extend(name for name in history[e] if name not in layers)
    rates = np.full((len(layers), len(epochs)), np.nan)
    for j, e in enumerate(epochs):
        for i, name in enumerate(layers):
            if name in history[e]:
                rates[i, j] = history[e][name]

    height = max(3.0, 0.22 * len(layers) + 1.5)
    fig, (ax_map, ax_bar) = plt.subplots(
        1, 2, figsize=(12, height), gridspec_kw={"width_ratios": [3, 1]}, constrained_layout=True)
    image = ax_map.imshow(rates, aspect="auto", cmap="viridis", vmin=0.0,
                          vmax=max(float(np.nanmax(rates)), 1e-6), interpolation="nearest")
    ax_map.set_yticks(range(len(layers)), layers, fontsize=7)
    step = max(1, len(epochs) // 20)  # at most ~20 epoch labels however long the run
    ax_map.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs[::step]])
    ax_map.set_xlabel("epoch")
    ax_map.set_title("firing rate per neuron layer (spikes / neuron / timestep)")
    fig.colorbar(image, ax=ax_map, fraction=0.04)

    last = rates[:, -1]
    ax_bar.barh(range(len(layers)), np.nan_to_num(last), color="tab:orange")
    ax_bar.set_yticks(range(len(layers)), [])
    ax_bar.set_ylim(ax_map.get_ylim())  # rows line up with the heatmap's
    mean = float(np.nanmean(last))
    ax_bar.axvline(mean, color="black", linestyle="--", linewidth=1)
    ax_bar.set_title(f"epoch {epochs[-1]} (mean {mean:.3f})")
    ax_bar.set_xlabel("firing rate")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_latency(top1_by_step: dict[int, float], path: Path) -> Path:
    """Validation top-1 against the number of time steps inference ran (the mean of the first
    t steps' logits): the latency/accuracy curve of SNN papers. Returns `path`."""
    if not top1_by_step:
        raise ValueError("plot_latency needs the top-1 of at least one step")
    steps = sorted(top1_by_step)
    fig, ax = plt.subplots(figsize=(5, 3.5), constrained_layout=True)
    ax.plot(steps, [top1_by_step[t] for t in steps], marker="o")
    ax.set_xticks(steps)
    ax.set_xlabel("time steps of inference")
    ax.set_ylabel("validation top-1")
    ax.set_title("accuracy against latency")
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
