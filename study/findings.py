"""The paper's findings as claims, each decided by paired comparisons over seeds (study/stats.py).

A row is one run (variant x seed): a dict with a column per factor of the grid (`leak`, `reset`,
`recurrence`, ...: the level as text), `variant`, `seed`, `status` ("ok" | "failed" | "missing")
and metric columns named as eval.json names them without `eval/` (`top1`, `firing_rate`, `sops`,
`noise_top1_<sigma>`, `fgsm_top1_<eps>`, `pgd_top1_<eps>`, `transfer_top1_<eps>`, `flip_top1_<k>`,
`worst_top1_<eps>`, `shift_top1_<ms>ms`, `sharpness`, `stream_top1`), a float or None. Two metrics
are derived from those columns:

- `robust_top1`: the mean of `worst_top1_<eps>` over the nonzero eps when the run has them (the
  per-sample worst case over every attack: robustness that is not overestimated), else the mean of
  its noise, FGSM, PGD, transfer and flip columns at nonzero sigma, eps or k;
- `shift_top1`: the mean of its `shift_top1_<ms>ms` columns (accuracy of the same checkpoint on
  frames of each duration, the trained one included as train.evaluate reports it: generalisation
  as the paper measures it).

Each claim is one level (or group of levels) of one factor against another, on one metric; the
paper's claims quote the paper's sentence (from ../shared/PAPER2.md) and name the tasks on which
the paper decides it. On those tasks the claim is the paper's protocol; on any other task, and for
claims marked `ours` (the stream measure, soft reset, self and lateral recurrence), it is ours. A
claim whose levels are not both in the grid is left out ("not in this grid").
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from study import stats
from study.stats import Comparison

Row = Mapping[str, object]
PAPER, OURS = "paper", "ours"

SWEPT_KINDS = ("noise", "fgsm", "pgd", "transfer", "flip", "worst", "shift")
_SWEPT = re.compile(r"^(noise|fgsm|pgd|transfer|flip|worst)_top1_([0-9.eE+-]+)$|^(shift)_top1_([0-9.eE+-]+)ms$")
SWEPT_AXIS = {"noise": "Gaussian noise sigma", "fgsm": "FGSM eps", "pgd": "PGD eps",
              "transfer": "transfer-attack eps", "flip": "spikes flipped k", "worst": "worst-case eps",
              "shift": "frame duration (ms)"}
DERIVED = {"robust_top1": "worst-case top-1 over attacks (mean over nonzero eps), else mean top-1 "
                          "under nonzero noise/attacks",
           "shift_top1": "mean top-1 over the frame durations evaluated (the trained one included)"}


def swept_value(column: str) -> tuple[str, float] | None:
    """("pgd", 0.05) for "pgd_top1_0.05", ("shift", 2.0) for "shift_top1_2ms"; None otherwise."""
    m = _SWEPT.match(column)
    if not m:
        return None
    kind, value = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    try:
        return kind, float(value)
    except ValueError:
        return None


def swept_columns(columns: Iterable[str]) -> list[str]:
    """The swept columns among `columns`, grouped by kind (SWEPT_KINDS order), each kind sorted by
    its value numerically."""
    found = {c: v for c in set(columns) if (v := swept_value(c)) is not None}
    return sorted(found, key=lambda c: (SWEPT_KINDS.index(found[c][0]), found[c][1]))


def _number(value) -> float | None:
    if value is None or value == "":
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def metric_value(row: Row, metric: str) -> float | None:
    """A row's value of `metric`: a column, or a derived metric (DERIVED); None when not measured."""
    if metric == "robust_top1":
        swept = [(s, _number(v)) for c, v in row.items() if (s := swept_value(c)) is not None]
        worst = [v for (kind, x), v in swept if kind == "worst" and x != 0 and v is not None]
        other = [v for (kind, x), v in swept if kind not in ("worst", "shift") and x != 0 and v is not None]
        values = worst or other
        return sum(values) / len(values) if values else None
    if metric == "shift_top1":
        values = [v for c, raw in row.items() if (s := swept_value(c)) and s[0] == "shift"
                  and (v := _number(raw)) is not None]
        return sum(values) / len(values) if values else None
    return _number(row.get(metric))


@dataclass(frozen=True)
class ClaimSpec:
    """What a claim expects: `metric` larger at `higher` levels of `factor` than at `lower` ones."""
    key: str                     # "<finding>.<what>", unique
    finding: str                 # leakage | reset | recurrence
    statement: str               # the expectation, in words
    factor: str
    higher: tuple[str, ...]
    lower: tuple[str, ...]
    metric: str
    source: str                  # PAPER | OURS
    sentence: str = ""           # the paper's sentence (PAPER2.md), quoted beside the verdict
    paper_tasks: tuple[str, ...] | None = None  # where the paper decides it; None: every task


_MEMORY = ("delayed_xor", "shd", "ssc")
_TEMPORAL = ("delayed_xor", "shd", "ssc")
_LEAK_MEMORY = ("a higher leak (smaller k_tau) makes long-term retention hard (dominant on SHD/SSC)")
_LEAK_ROBUST = "a higher leak improves resistance to input perturbations by reducing error accumulation"
_RESET_XOR = ("on delayed XOR the baseline's reset \"shows a significant degradation in accuracy\" because it "
              "\"erases the membrane potential completely, cleaning all historic information\"")
_RESET_FIRING = ("disabling the reset helps such uninterrupted temporal processing, at the cost of a higher "
                 "firing rate. The reset lowers the firing rate (sparser, more efficient)")
_REC_ACC = "Recurrence: generally better accuracy on temporal tasks, smaller gains on spatial ones"
_REC_COST = "it adds error-propagation paths, costing generalisation and robustness"

CLAIMS: tuple[ClaimSpec, ...] = (
    # k_tau: complete leak 0 < normal < none (IF) 1; memory rises with k_tau, robustness falls.
    ClaimSpec("leakage.memory_none_normal", "leakage", "no leak (IF) remembers better than the normal leak",
              "leak", ("none",), ("normal",), "top1", PAPER, _LEAK_MEMORY, _MEMORY),
    ClaimSpec("leakage.memory_normal_complete", "leakage", "the normal leak remembers better than complete leak",
              "leak", ("normal",), ("complete",), "top1", PAPER, _LEAK_MEMORY, _MEMORY),
    ClaimSpec("leakage.robust_complete_normal", "leakage", "complete leak is more robust than the normal leak",
              "leak", ("complete",), ("normal",), "robust_top1", PAPER, _LEAK_ROBUST),
    ClaimSpec("leakage.robust_normal_none", "leakage", "the normal leak is more robust than no leak (IF)",
              "leak", ("normal",), ("none",), "robust_top1", PAPER, _LEAK_ROBUST),
    ClaimSpec("reset.memory", "reset", "disabling the reset helps uninterrupted temporal processing",
              "reset", ("none",), ("hard",), "top1", PAPER, _RESET_XOR, ("delayed_xor",)),
    ClaimSpec("reset.firing", "reset", "without a reset, neurons fire more",
              "reset", ("none",), ("hard",), "firing_rate", PAPER, _RESET_FIRING),
    ClaimSpec("recurrence.accuracy", "recurrence", "full recurrence is more accurate on temporal tasks",
              "recurrence", ("full",), ("none",), "top1", PAPER, _REC_ACC, _TEMPORAL),
    ClaimSpec("recurrence.generalisation", "recurrence", "full recurrence generalises worse under the "
              "frame-duration shift", "recurrence", ("none",), ("full",), "shift_top1", PAPER, _REC_COST, ("dvs",)),
    ClaimSpec("recurrence.robustness", "recurrence", "full recurrence is less robust",
              "recurrence", ("none",), ("full",), "robust_top1", PAPER, _REC_COST),
    # ours: the stream protocol (samples back to back), soft reset, self and lateral recurrence
    ClaimSpec("leakage.stream_memory", "leakage", "no leak (IF) classifies an uninterrupted stream better",
              "leak", ("none",), ("normal",), "stream_top1", OURS),
    ClaimSpec("reset.stream", "reset", "with a reset, an uninterrupted stream is classified better",
              "reset", ("hard",), ("none",), "stream_top1", OURS),
    ClaimSpec("reset.firing_soft", "reset", "without a reset, neurons fire more than with a soft reset",
              "reset", ("none",), ("soft",), "firing_rate", OURS),
    ClaimSpec("recurrence.accuracy_self_lateral", "recurrence", "self or lateral recurrence is more accurate",
              "recurrence", ("self", "lateral"), ("none",), "top1", OURS),
    ClaimSpec("recurrence.robustness_self_lateral", "recurrence", "self or lateral recurrence is less robust",
              "recurrence", ("none",), ("self", "lateral"), "robust_top1", OURS),
)
FINDINGS = {"leakage": "Leakage balances memory retention against robustness",
            "reset": "Reset: disabling it helps uninterrupted temporal processing; it keeps firing sparse",
            "recurrence": "Recurrence adds accuracy on temporal tasks at a cost in generalisation and robustness"}


@dataclass(frozen=True)
class Claim:
    """A claim decided on one task's rows."""
    spec: ClaimSpec
    task: str
    protocol: str                # PAPER when the paper's claim on one of the paper's tasks, else OURS
    comparison: Comparison

    @property
    def verdict(self) -> str:
        return self.comparison.verdict

    @property
    def label(self) -> str:
        s = self.spec
        return f"{s.metric}: {s.factor}={'/'.join(s.higher)} > {'/'.join(s.lower)}"


def protocol(spec: ClaimSpec, task: str) -> str:
    """PAPER when the paper makes this claim on this task (any task when it names none)."""
    return PAPER if spec.source == PAPER and (spec.paper_tasks is None or task in spec.paper_tasks) else OURS


def applicable(spec: ClaimSpec, grid: Mapping[str, Sequence[str]]) -> bool:
    """Whether the grid (factor -> levels) holds the claim's factor with a level on each side."""
    levels = set(map(str, grid.get(spec.factor, ())))
    return bool(levels & set(spec.higher)) and bool(levels & set(spec.lower))


def decide(rows: Sequence[Row], grid: Mapping[str, Sequence[str]], task: str,
           specs: Sequence[ClaimSpec] = CLAIMS) -> list[Claim]:
    """Every claim the grid (factor -> levels, in order) can test, decided on one task's rows by
    pairs matched on the grid's other factors and the seed; a claim whose metric no run has is
    inconclusive, saying so."""
    claims = []
    for spec in specs:
        if not applicable(spec, grid):
            continue
        others = [f for f in grid if f != spec.factor]
        found = stats.pairs(rows, spec.factor, spec.higher, spec.lower,
                            lambda r, m=spec.metric: metric_value(r, m), others)
        comparison = stats.compare(found)
        if not found and not any(metric_value(r, spec.metric) is not None for r in rows if r.get("status") == "ok"):
            comparison = Comparison((), None, None, None, stats.INCONCLUSIVE, f"no ok run measures {spec.metric}")
        claims.append(Claim(spec, task, protocol(spec, task), comparison))
    return claims
