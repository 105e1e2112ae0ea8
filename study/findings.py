"""The variant grid, the rows of results.csv, and the paper's three findings as verdicts.

A row is one variant of the grid: a dict with the results.csv columns, `leak` (bool), `reset`,
`recurrence`, `status` ("ok" | "failed" | "missing") and metric columns holding a float, or None
when not measured. Accuracies and firing rates are fractions in [0, 1].

Verdict rules (pure functions of the rows, so the rules are tested on hand-made rows):

- A claim compares the mean of one metric over two groups of ok variants that differ in one
  factor, e.g. robust accuracy of leak=true against leak=false. Only variants whose other two
  factors also occur, ok and measured, in the other group are counted ("matched"), so a failed or
  missing variant cannot tilt a comparison through the factors it does not test.
- With d = mean(group expected higher) - mean(group expected lower) and the margin m (0.01,
  absolute): d > m holds, d < -m does not hold, |d| <= m is inconclusive. A claim is
  inconclusive too when either group has no ok variant measuring the metric.
- A finding holds when all its claims hold, does not hold when any claim does not hold, and is
  inconclusive otherwise.
- Robust accuracy of a variant (`robust_top1`) is the mean of its noise_top1_<sigma>,
  fgsm_top1_<eps> and pgd_top1_<eps> columns over the nonzero sigma and eps (0 is clean accuracy).

The findings and their claims:

1. Leakage balances memory against robustness.
   robustness: robust_top1 of leak=true > leak=false;
   memory:     stream_top1 of leak=false (IF) > leak=true (temporal data sets only).
2. Reset is essential for uninterrupted temporal processing and for sparsity.
   stream:     stream_top1 of reset=hard/soft > reset=none (temporal data sets only);
   sparsity:   firing_rate of reset=none > reset=hard/soft.
3. Recurrence adds capacity at a cost in robustness.
   capacity:   top1 of recurrence=self/lateral > recurrence=none;
   robustness: robust_top1 of recurrence=none > recurrence=self/lateral.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

LEAKS = (True, False)
RESETS = ("hard", "soft", "none")
RECURRENCES = ("none", "self", "lateral")
FACTORS = ("leak", "reset", "recurrence")
GRID = tuple(itertools.product(LEAKS, RESETS, RECURRENCES))  # the 18 variants, in results.csv order

MARGIN = 0.01
HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"

SWEPT_KINDS = ("noise", "fgsm", "pgd")  # columns <kind>_top1_<sigma or eps>, one per grid value
_SWEPT = re.compile(r"^(noise|fgsm|pgd)_top1_(.+)$")

Row = Mapping[str, object]


def variant_name(leak: bool, reset: str, recurrence: str) -> str:
    """The trainer's `neuron` tag for a variant, e.g. "if-reset_none-rec_self"."""
    return f"{'lif' if leak else 'if'}-reset_{reset}-rec_{recurrence}"


def swept_value(column: str) -> tuple[str, float] | None:
    """("pgd", 0.05) for "pgd_top1_0.05"; None for a column that is not a noise/attack grid value."""
    match = _SWEPT.match(column)
    if not match:
        return None
    try:
        return match.group(1), float(match.group(2))
    except ValueError:
        return None


def swept_columns(columns: Iterable[str]) -> list[str]:
    """The noise, FGSM and PGD columns among `columns`, grouped in that order, each sorted by its
    sigma or eps (numerically)."""
    found = {c: swept_value(c) for c in set(columns)}
    found = {c: v for c, v in found.items() if v is not None}
    return sorted(found, key=lambda c: (SWEPT_KINDS.index(found[c][0]), found[c][1]))


def robust_top1(row: Row) -> float | None:
    """Mean accuracy of a row under nonzero noise sigma, FGSM eps and PGD eps; None if unmeasured."""
    values = [v for c, v in row.items()
              if v is not None and (s := swept_value(c)) is not None and s[1] != 0]
    return sum(values) / len(values) if values else None


def metric_value(row: Row, metric: str) -> float | None:
    """A row's value of `metric`: a column, or "robust_top1" (computed); None when not measured."""
    value = robust_top1(row) if metric == "robust_top1" else row.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


@dataclass(frozen=True)
class Claim:
    """One comparison: `higher` is expected to have the larger mean of `metric` than `lower`."""
    key: str               # short name, e.g. "robustness"
    statement: str         # what the paper expects, in words
    metric: str
    higher: str            # the group expected higher, e.g. "leak=true"
    lower: str
    higher_mean: float | None
    lower_mean: float | None
    n_higher: int          # matched ok variants counted in each group
    n_lower: int
    verdict: str
    reason: str = ""       # why the verdict is inconclusive; empty otherwise

    @property
    def difference(self) -> float | None:
        if self.higher_mean is None or self.lower_mean is None:
            return None
        return self.higher_mean - self.lower_mean


@dataclass(frozen=True)
class Finding:
    key: str               # "leakage" | "reset" | "recurrence"
    title: str             # the paper's finding, in words
    claims: tuple[Claim, ...]

    @property
    def verdict(self) -> str:
        return combine(c.verdict for c in self.claims)


def combine(verdicts: Iterable[str]) -> str:
    """Holds if every claim holds, does not hold if any does not, else inconclusive."""
    verdicts = list(verdicts)
    if any(v == DOES_NOT_HOLD for v in verdicts):
        return DOES_NOT_HOLD
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return INCONCLUSIVE


def _label(factor: str, values: Sequence) -> str:
    return f"{factor}=" + "/".join(str(v).lower() for v in values)


def compare(rows: Iterable[Row], factor: str, higher: Sequence, lower: Sequence, metric: str, *,
            key: str, statement: str, margin: float = MARGIN) -> Claim:
    """The verdict on "variants with `factor` in `higher` have a larger mean `metric` than those
    with it in `lower`", over the matched ok variants (see the module docstring)."""
    others = [f for f in FACTORS if f != factor]
    groups: tuple[dict, dict] = ({}, {})  # context (the other factors' values) -> metric values
    for row in rows:
        value = metric_value(row, metric)
        if row.get("status") != "ok" or value is None:
            continue
        for group, values in zip(groups, (higher, lower)):
            if row[factor] in values:
                group.setdefault(tuple(row[f] for f in others), []).append(value)
    hi_label, lo_label = _label(factor, higher), _label(factor, lower)
    matched = groups[0].keys() & groups[1].keys()
    hi = [v for c in matched for v in groups[0][c]]
    lo = [v for c in matched for v in groups[1][c]]
    claim = dict(key=key, statement=statement, metric=metric, higher=hi_label, lower=lo_label,
                 n_higher=len(hi), n_lower=len(lo))
    empty = [label for label, group in ((hi_label, groups[0]), (lo_label, groups[1])) if not group]
    if empty:
        return Claim(**claim, higher_mean=None, lower_mean=None, verdict=INCONCLUSIVE,
                     reason=f"no ok {' or '.join(empty)} variant has {metric}")
    if not matched:
        return Claim(**claim, higher_mean=None, lower_mean=None, verdict=INCONCLUSIVE,
                     reason=f"no ok {hi_label} and {lo_label} variants share {' and '.join(others)}")
    hi_mean, lo_mean = sum(hi) / len(hi), sum(lo) / len(lo)
    d = hi_mean - lo_mean
    verdict = HOLDS if d > margin else DOES_NOT_HOLD if d < -margin else INCONCLUSIVE
    reason = f"difference {d:+.4f} is within the margin {margin:g}" if verdict == INCONCLUSIVE else ""
    return Claim(**claim, higher_mean=hi_mean, lower_mean=lo_mean, verdict=verdict, reason=reason)


def leakage(rows: Sequence[Row], margin: float = MARGIN) -> Finding:
    """Finding 1: leak trades memory (IF remembers better) against robustness (LIF is more robust)."""
    return Finding("leakage", "Leakage balances memory retention against robustness", (
        compare(rows, "leak", [True], [False], "robust_top1", key="robustness", margin=margin,
                statement="leaky neurons are more robust to noise and attacks"),
        compare(rows, "leak", [False], [True], "stream_top1", key="memory", margin=margin,
                statement="non-leaky (IF) neurons remember better over a stream"),
    ))


def reset(rows: Sequence[Row], margin: float = MARGIN) -> Finding:
    """Finding 2: reset enables uninterrupted (stream) processing and keeps firing sparse."""
    return Finding("reset", "Reset is essential for uninterrupted temporal processing and for "
                            "computational efficiency (sparsity)", (
        compare(rows, "reset", ["hard", "soft"], ["none"], "stream_top1", key="stream", margin=margin,
                statement="with a reset, an uninterrupted stream is classified better"),
        compare(rows, "reset", ["none"], ["hard", "soft"], "firing_rate", key="sparsity", margin=margin,
                statement="without a reset, neurons fire more"),
    ))


def recurrence(rows: Sequence[Row], margin: float = MARGIN) -> Finding:
    """Finding 3: recurrence adds capacity (accuracy) at a cost in robustness."""
    return Finding("recurrence", "Recurrence adds capacity for complex dynamics at a cost in "
                                 "robustness", (
        compare(rows, "recurrence", ["self", "lateral"], ["none"], "top1", key="capacity",
                margin=margin, statement="recurrent neurons are more accurate"),
        compare(rows, "recurrence", ["none"], ["self", "lateral"], "robust_top1", key="robustness",
                margin=margin, statement="recurrence costs robustness to noise and attacks"),
    ))


def findings(rows: Sequence[Row], margin: float = MARGIN) -> list[Finding]:
    """The paper's three findings, each with its verdict on `rows`."""
    return [leakage(rows, margin), reset(rows, margin), recurrence(rows, margin)]
