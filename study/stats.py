"""Paired comparisons over seeds: the effect, its bootstrap interval, a sign-flip p-value, Holm.

A claim "metric is larger at level(s) `higher` of a factor than at `lower`" is decided on pairs:
two runs matched on every other factor of the grid and on the seed. Each pair gives a difference
d = value(higher) - value(lower) (with several levels on one side, the mean over those present
in that cell and seed). Then, over the n pairs:

- effect: the mean of d;
- 95 % CI: percentile bootstrap of the mean (scipy.stats.bootstrap, 9999 resamples, its random
  state seeded by `SEED`, so a report is reproducible); the percentile method because BCa is
  undefined when every d is equal, as happens with saturated accuracies;
- p: a two-sided sign-flip permutation test of mean(d) = 0 (scipy.stats.permutation_test with
  one sample and permutation_type="samples" flips signs; exact, all 2^n sign patterns, for
  n <= 13, else 9999 seeded random flips);
- verdict: holds when the CI lies above 0, does not hold when below, inconclusive when it contains
  0, and inconclusive with the reason "too few pairs" below `MIN_PAIRS`.

Multiplicity: `holm` adjusts the p-values of every claim of every task of a report together
(Holm-Bonferroni, family-wise error 5 %); the reports print both, and the verdicts stay the
per-claim 95 % CIs, so "holds" with a Holm p above 0.05 reads as "this claim alone, not the
family". Holm is a few lines here because scipy has none (it has Benjamini-Hochberg only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
MIN_PAIRS = 3          # fewer pairs cannot make an interval worth a verdict
CONFIDENCE = 0.95
RESAMPLES = 9999
EXACT_UP_TO = 13       # 2^13 = 8192 sign patterns <= RESAMPLES: the test is exact
SEED = 20240324        # the bootstrap's and the permutation test's random state

Row = Mapping[str, object]


@dataclass(frozen=True)
class Pair:
    """Two matched runs: the cell (the other factors' levels), the seed and the difference."""
    cell: tuple
    seed: int
    difference: float


@dataclass(frozen=True)
class Comparison:
    """The paired comparison of one claim: its pairs and what they say."""
    pairs: tuple[Pair, ...]
    effect: float | None       # mean paired difference, metric units
    ci: tuple[float, float] | None
    p: float | None            # two-sided sign-flip permutation test
    verdict: str
    reason: str = ""           # why inconclusive without a CI; empty otherwise

    @property
    def n(self) -> int:
        return len(self.pairs)


def pairs(rows: Iterable[Row], factor: str, higher: Sequence[str], lower: Sequence[str],
          value, others: Sequence[str]) -> list[Pair]:
    """The matched pairs of `rows` (dicts with factor columns, `seed`, `status`): for every cell of
    the `others` factors and seed where both sides have an ok run with a value (`value(row)`:
    float or None), the difference of the sides' means. Cells and seeds in sorted order."""
    sides: dict[tuple, tuple[list, list]] = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        v = value(row)
        if v is None or not math.isfinite(v):
            continue
        level = str(row.get(factor))
        for i, side in enumerate((higher, lower)):
            if level in side:
                key = (tuple(str(row.get(f)) for f in others), int(row["seed"]))
                sides.setdefault(key, ([], []))[i].append(float(v))
    return [Pair(cell, seed, float(np.mean(hi)) - float(np.mean(lo)))
            for (cell, seed), (hi, lo) in sorted(sides.items()) if hi and lo]


def compare(found: Sequence[Pair], *, min_pairs: int = MIN_PAIRS) -> Comparison:
    """Effect, 95 % CI, p and verdict of the paired differences (see the module docstring)."""
    found = tuple(found)
    d = np.array([p.difference for p in found], dtype=float)
    if len(d) == 0:
        return Comparison(found, None, None, None, INCONCLUSIVE, "no matched pairs")
    effect = float(d.mean())
    if len(d) < min_pairs:
        return Comparison(found, effect, None, None, INCONCLUSIVE,
                          f"too few pairs ({len(d)} < {min_pairs})")
    lo, hi = bootstrap_ci(d)
    p = sign_flip_p(d)
    verdict = HOLDS if lo > 0 else DOES_NOT_HOLD if hi < 0 else INCONCLUSIVE
    return Comparison(found, effect, (lo, hi), p, verdict)


def bootstrap_ci(d: np.ndarray) -> tuple[float, float]:
    """The 95 % percentile bootstrap interval of mean(d), seeded."""
    if np.ptp(d) == 0:  # every resample has the same mean
        return float(d[0]), float(d[0])
    res = stats.bootstrap((d,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES,
                          method="percentile", vectorized=True, rng=np.random.default_rng(SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def sign_flip_p(d: np.ndarray) -> float:
    """Two-sided p of mean(d) = 0 under random sign flips of the d (exact for small n)."""
    if not np.any(d):
        return 1.0
    res = stats.permutation_test((d,), np.mean, permutation_type="samples", vectorized=True,
                                 n_resamples=RESAMPLES if len(d) > EXACT_UP_TO else np.inf,
                                 alternative="two-sided", rng=np.random.default_rng(SEED))
    return float(min(1.0, res.pvalue))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None stays None and does not count in the family)."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(present)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))  # monotone: never below an earlier one
        adjusted[i] = running
    return adjusted


def mean_ci(values: Sequence[float]) -> tuple[float, float, float | None, float | None]:
    """(mean, std (n-1), CI low, CI high): the 95 % t-interval of the mean; None below 2 values."""
    x = np.asarray(values, dtype=float)
    if len(x) == 1:
        return float(x[0]), 0.0, None, None
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return float(x.mean()), std, float(x.mean()) - half, float(x.mean()) + half
