"""The figures of a study report, drawn from the results rows (see study.findings) as PNGs.

Figures are built with `matplotlib.figure.Figure` and saved through the Agg canvas directly, so
no pyplot state or global backend is touched. Every file is written atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from study import atomic_path
from study.findings import (GRID, LEAKS, RECURRENCES, RESETS, Row, metric_value, swept_columns,
                            swept_value, variant_name)

HEATMAP_METRICS = {"top1": "validation top-1", "robust_top1": "robust top-1 (mean over nonzero "
                   "sigma and eps)", "stream_top1": "stream top-1", "generalization_gap":
                   "generalisation gap (train - val top-1)", "firing_rate": "mean firing rate",
                   "sops": "SOPs per image", "energy": "energy per image (uJ)"}
_KIND_AXIS = {"noise": "Gaussian noise sigma", "fgsm": "FGSM eps", "pgd": "PGD eps"}
_RESET_MARKER = {"hard": "o", "soft": "s", "none": "^"}


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def _name(row: Row) -> str:
    return variant_name(row["leak"], row["reset"], row["recurrence"])


def _style(row: Row) -> dict:
    """One colour per variant (grid position), dashed lines for IF (no leak)."""
    index = GRID.index((row["leak"], row["reset"], row["recurrence"]))
    return {"color": colormaps["tab20"](index % 20), "linestyle": "-" if row["leak"] else "--",
            "marker": _RESET_MARKER.get(row["reset"], "o")}


def plot_accuracy_curves(rows: Sequence[Row], kinds: Sequence[str], path: Path, title: str) -> Path | None:
    """Top-1 against sigma or eps, one panel per kind ("noise" | "fgsm" | "pgd"), one line per ok
    variant. Returns the PNG path, or None when no variant has any of these columns."""
    columns = swept_columns(c for row in rows for c in row)
    kinds = [k for k in kinds if any(swept_value(c)[0] == k for c in columns)]
    if not kinds:
        return None
    fig = Figure(figsize=(5.5 * len(kinds) + 2.5, 4.2))
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        kind_columns = [c for c in columns if swept_value(c)[0] == kind]
        for row in rows:
            points = [(swept_value(c)[1], row[c]) for c in kind_columns
                      if row["status"] == "ok" and row.get(c) is not None]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, label=_name(row), linewidth=1.3, markersize=4, **_style(row))
        ax.set_xlabel(_KIND_AXIS[kind])
        ax.set_ylabel("top-1")
        ax.set_title(f"{title}: {kind.upper() if kind != 'noise' else 'noise'}")
        ax.grid(alpha=0.3)
    legend = {}  # label -> handle, over every panel: a variant may lack one kind
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
               title="variant (dashed: no leak)", title_fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_heatmap(rows: Sequence[Row], metric: str, path: Path) -> Path | None:
    """`metric` over the grid: rows leak x reset, columns recurrence; failed and missing variants
    are blank cells named by their status. None when no ok variant has the metric."""
    by_variant = {(r["leak"], r["reset"], r["recurrence"]): r for r in rows}
    ylabels = [f"{'lif' if leak else 'if'} reset={reset}" for leak in LEAKS for reset in RESETS]
    data = np.full((len(ylabels), len(RECURRENCES)), np.nan)
    notes: dict[tuple[int, int], str] = {}
    for i, (leak, reset) in enumerate((l, r) for l in LEAKS for r in RESETS):
        for j, rec in enumerate(RECURRENCES):
            row = by_variant.get((leak, reset, rec))
            status = row["status"] if row else "missing"
            value = metric_value(row, metric) if status == "ok" else None
            if value is None:
                notes[i, j] = status if status != "ok" else "n/a"
            else:
                data[i, j] = value
    if np.isnan(data).all():
        return None
    cmap = colormaps["viridis"].with_extremes(bad="white")
    fig = Figure(figsize=(6.2, 5.4))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.85)
    lo, hi = np.nanmin(data), np.nanmax(data)
    for (i, j), value in np.ndenumerate(data):
        if np.isnan(value):
            ax.text(j, i, notes[i, j], ha="center", va="center", fontsize=8, color="0.45")
        else:
            dark = hi > lo and (value - lo) / (hi - lo) < 0.5  # viridis is dark at its low end
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(RECURRENCES)), [f"rec={r}" for r in RECURRENCES])
    ax.set_yticks(range(len(ylabels)), ylabels)
    ax.set_title(HEATMAP_METRICS.get(metric, metric))
    fig.tight_layout()
    return _save(fig, path)


def plot_firing_vs_accuracy(rows: Sequence[Row], path: Path) -> Path | None:
    """Scatter of mean firing rate against top-1, each ok variant labelled; None without data."""
    points = [(r["firing_rate"], r["top1"], r) for r in rows
              if r["status"] == "ok" and r.get("firing_rate") is not None and r.get("top1") is not None]
    if not points:
        return None
    fig = Figure(figsize=(7.5, 5.5))
    ax = fig.subplots()
    for x, y, row in points:
        style = _style(row)
        ax.scatter([x], [y], marker=style["marker"], s=40, edgecolors=[style["color"]],
                   facecolors=[style["color"]] if row["leak"] else "none")
        ax.annotate(_name(row), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("mean firing rate (spikes per neuron per step)")
    ax.set_ylabel("validation top-1")
    ax.set_title("Firing rate against accuracy (hollow: no leak; marker: reset)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def write_plots(rows: Sequence[Row], out: Path) -> list[Path]:
    """Every figure the rows have data for, as PNGs in `out`; returns the files written."""
    out = Path(out)
    written = [
        plot_accuracy_curves(rows, ["fgsm", "pgd"], out / "attacks.png", "Accuracy under attack"),
        plot_accuracy_curves(rows, ["noise"], out / "noise.png", "Accuracy under noise"),
        plot_firing_vs_accuracy(rows, out / "firing_rate_vs_top1.png"),
        *(plot_heatmap(rows, m, out / f"heatmap_{m}.png") for m in HEATMAP_METRICS),
    ]
    return [p for p in written if p is not None]
