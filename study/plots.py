"""The figures of a study report, drawn from the rows (see study.findings) as PNGs.

- `curves.png`: small multiples, one row of panels per factor and one column per swept measure
  (noise sigma, FGSM/PGD/transfer/worst-case eps, flipped spikes k, frame duration): per level of
  the factor, the mean top-1 over its ok runs (every seed and every level of the other factors)
  with a 95 % t-interval band;
- `heatmap_<metric>.png`: the mean over seeds of each variant, the last factor across, the others
  down; failed or missing cells blank and named;
- `forest.png`: every claim's effect with its 95 % CI, coloured by verdict.

Figures are built with `matplotlib.figure.Figure` and saved through the Agg canvas directly, so no
pyplot state or global backend is touched. Every file is written atomically.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from study import atomic_path
from study.findings import DERIVED, SWEPT_AXIS, Claim, swept_columns, swept_value
from study.stats import DOES_NOT_HOLD, HOLDS, mean_ci

HEATMAP_METRICS = {"top1": "validation top-1", "robust_top1": DERIVED["robust_top1"],
                   "shift_top1": DERIVED["shift_top1"], "stream_top1": "stream top-1 (ours)",
                   "firing_rate": "mean firing rate", "sharpness": "sharpness", "sops": "SOPs per sample"}
_VERDICT_COLOUR = {HOLDS: "tab:green", DOES_NOT_HOLD: "tab:red"}


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def _band(values: list[float]) -> tuple[float, float, float]:
    mean, _, lo, hi = mean_ci(values)
    return mean, (mean if lo is None else lo), (mean if hi is None else hi)


def plot_curves(rows: Sequence[Mapping], factors: Mapping[str, Sequence[str]], path: Path) -> Path | None:
    """Per factor (panel rows) and swept kind (panel columns): mean top-1 per level with its 95 %
    CI band against the swept value. None when no ok run has a swept column."""
    ok = [r for r in rows if r["status"] == "ok"]
    columns = swept_columns(c for r in ok for c, v in r.items() if v is not None)
    kinds = list(dict.fromkeys(swept_value(c)[0] for c in columns))
    varied = [f for f, levels in factors.items() if len(levels) > 1]
    if not kinds or not varied:
        return None
    fig = Figure(figsize=(3.6 * len(kinds), 2.9 * len(varied)))
    axes = fig.subplots(len(varied), len(kinds), squeeze=False)
    colours = colormaps["tab10"]
    for i, f in enumerate(varied):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            kind_columns = [c for c in columns if swept_value(c)[0] == kind]
            for k, level in enumerate(factors[f]):
                xs, mean, lo, hi = [], [], [], []
                for c in kind_columns:
                    values = [float(r[c]) for r in ok if str(r.get(f)) == level and r.get(c) is not None]
                    if values:
                        m, a, b = _band(values)
                        xs.append(swept_value(c)[1]), mean.append(m), lo.append(a), hi.append(b)
                if xs:
                    ax.plot(xs, mean, marker="o", markersize=3, color=colours(k), label=f"{f}={level}")
                    # a t-interval over few runs may pass the ends of [0, 1]; top-1 cannot
                    ax.fill_between(xs, np.clip(lo, 0, 1), np.clip(hi, 0, 1), color=colours(k), alpha=0.2, linewidth=0)
            ax.set_xlabel(SWEPT_AXIS[kind], fontsize=8)
            ax.set_ylabel("top-1", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=7, title=f, title_fontsize=7)
    fig.suptitle("Mean top-1 per level, 95 % CI band (over seeds and the other factors)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_heatmap(summary: Sequence[Mapping], factors: Mapping[str, Sequence[str]], metric: str,
                 path: Path) -> Path | None:
    """The variants' mean `metric`: the last factor across, the product of the others down."""
    keys = list(factors)
    across, down = keys[-1], keys[:-1]
    ylabels = list(itertools.product(*(factors[k] for k in down))) or [()]
    by = {tuple(str(s[k]) for k in keys): s for s in summary}
    data = np.full((len(ylabels), len(factors[across])), np.nan)
    notes = {}
    for i, y in enumerate(ylabels):
        for j, x in enumerate(factors[across]):
            s = by.get((*y, x))
            value = s.get(f"{metric}_mean") if s else None
            if value is None:
                notes[i, j] = "n/a" if s and s["n_ok"] else "no ok run"
            else:
                data[i, j] = value
    if np.isnan(data).all():
        return None
    fig = Figure(figsize=(1.4 * len(factors[across]) + 3.2, 0.45 * len(ylabels) + 1.8))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(data), cmap=colormaps["viridis"].with_extremes(bad="white"), aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.85)
    lo, hi = np.nanmin(data), np.nanmax(data)
    for (i, j), value in np.ndenumerate(data):
        if np.isnan(value):
            ax.text(j, i, notes[i, j], ha="center", va="center", fontsize=7, color="0.45")
        else:
            dark = hi > lo and (value - lo) / (hi - lo) < 0.5  # viridis is dark at its low end
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(factors[across])), [f"{across}={v}" for v in factors[across]], fontsize=7)
    ax.set_yticks(range(len(ylabels)), [" ".join(f"{k}={v}" for k, v in zip(down, y)) for y in ylabels], fontsize=7)
    ax.set_title(f"{HEATMAP_METRICS.get(metric, metric)}: mean over seeds", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_forest(claims: Sequence[Claim], path: Path, adjusted: Mapping[int, float | None]) -> Path | None:
    """Every claim with an effect: the effect and its 95 % CI, one line each, coloured by verdict."""
    shown = [c for c in claims if c.comparison.effect is not None]
    if not shown:
        return None
    fig = Figure(figsize=(8.5, 0.32 * len(shown) + 1.4))
    ax = fig.subplots()
    for i, c in enumerate(reversed(shown)):
        comp = c.comparison
        colour = _VERDICT_COLOUR.get(c.verdict, "0.4")
        if comp.ci:
            ax.plot(comp.ci, [i, i], color=colour, linewidth=2)
        ax.plot([comp.effect], [i], "o", color=colour, markersize=4)
    ax.axvline(0, color="black", linewidth=0.8)
    labels = [f"{c.task}: {c.spec.key} ({c.protocol}, n={c.comparison.n}"
              + (f", Holm p={adjusted[id(c)]:.2g}" if adjusted.get(id(c)) is not None else "") + ")"
              for c in reversed(shown)]
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.set_xlabel("effect: mean paired difference (expected higher - expected lower), 95 % CI", fontsize=8)
    ax.set_title("Claims: green holds, red does not hold, grey inconclusive", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _save(fig, path)


def write_plots(rows: Sequence[Mapping], factors: Mapping[str, Sequence[str]], summary: Sequence[Mapping],
                claims: Sequence[Claim], out: Path, adjusted: Mapping[int, float | None]) -> list[Path]:
    """Every figure the rows have data for, as PNGs in `out`; returns the files written."""
    out = Path(out)
    written = [plot_curves(rows, factors, out / "curves.png"),
               plot_forest(claims, out / "forest.png", adjusted),
               *(plot_heatmap(summary, factors, m, out / f"heatmap_{m}.png") for m in HEATMAP_METRICS)]
    return [p for p in written if p is not None]
