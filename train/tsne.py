"""t-SNE of a trained network's penultimate-layer features, as the functional-roles paper shows
them (how well the classes separate before the classifier).

The features are the input of the classifier `model.fc` (the last linear layer of every network
in models/), averaged over time: per-channel spike rates of the last spiking layer (of FC-256 in
ResNet-19), `[N, features]`. The embedding is scikit-learn's `TSNE` (2-D, PCA start, exact
gradient) seeded from run.seed, so a rerun draws the same picture.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # evaluation nodes have no display
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402


@torch.no_grad()
def penultimate_features(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                         samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(features `[N, F]` float32, labels `[N]` int64) of the first `samples` samples of
    `batches`: the input of `model.fc`, averaged over time when it is `[T, B, F]`."""
    classifier = getattr(model, "fc", None)
    if not isinstance(classifier, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no linear classifier `fc` to read features before")
    seen: list[Tensor] = []
    hook = classifier.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    features, labels, count = [], [], 0
    try:
        for x, y in batches:
            seen.clear()
            model(x)
            f = seen[-1].float()
            f = f.mean(0) if f.ndim == 3 else f  # [T, B, F] -> [B, F]
            features.append(f.cpu())
            labels.append(y.cpu())
            count += len(y)
            if count >= samples:
                break
    finally:
        hook.remove()
    if not features:
        raise ValueError("penultimate_features: no batches")
    return torch.cat(features)[:samples].numpy(), torch.cat(labels)[:samples].numpy()


def embedding(features: np.ndarray, seed: int) -> np.ndarray:
    """`[N, 2]` t-SNE embedding of `features [N, F]` (N >= 2, not all equal), a function of
    (features, seed). The exact gradient: at the few hundred samples a plot holds it is faster
    than Barnes-Hut, and Barnes-Hut's tree can crash the process on many duplicate points (a
    network whose last layer is silent for most samples)."""
    # scikit-learn takes seconds to import and the trainer imports this module (through
    # train.evaluate, for eval.after_train): load it only when a t-SNE is drawn.
    from sklearn.manifold import TSNE

    n = len(features)
    perplexity = min(30.0, max(1.0, (n - 1) / 3))  # sklearn needs perplexity < N
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                method="exact").fit_transform(features)


def plot(embedding: np.ndarray, labels: np.ndarray, path: Path, title: str) -> Path:
    """Scatter of `embedding [N, 2]` coloured by `labels [N]` as a PNG at `path`; returns `path`."""
    fig, ax = plt.subplots(figsize=(5, 5), constrained_layout=True)
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for k, c in enumerate(classes):
        at = labels == c
        ax.scatter(embedding[at, 0], embedding[at, 1], s=6, color=cmap(k % cmap.N), label=str(c))
    if len(classes) <= 20:
        ax.legend(fontsize=6, markerscale=2, loc="best", ncol=2)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
