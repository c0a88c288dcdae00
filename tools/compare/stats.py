"""The statistics behind every accuracy in the report: Wilson's interval for one accuracy, McNemar's exact test
and Newcombe's interval for two accuracies on the same examples, and the paired tests between runs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scipy.stats import binom, norm

from common import artifacts
from common.artifacts import PHASES
from tools.compare.runs import PHASE_TITLES, Run

ALPHA = 0.05  # significance level of every test in the report
Z_95 = float(norm.ppf(1 - ALPHA / 2))
# Accuracy measures with per-example predictions: (method, prediction key, table name).
MEASURES = (("loglik", "prediction", "acc"), ("loglik", "prediction_norm", "acc_norm"), ("generate", "prediction", "acc"))


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion, as fractions; good at small n and near 0 or 1."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs b and c (1 when there are none)."""
    if b + c == 0:
        return 1.0
    return min(1.0, 2 * float(binom.cdf(min(b, c), b + c, 0.5)))


def paired_difference_interval(both: int, first_only: int, second_only: int, neither: int) -> tuple[float, float]:
    """95% interval for accuracy(second) - accuracy(first) on the same examples, as fractions.

    Newcombe's (1998) square-and-add interval for paired proportions, as in Fagerland, Lydersen & Laake,
    "Statistical Analysis of Contingency Tables" (ch. 8): the Wilson intervals of the two accuracies, combined
    with a continuity-corrected estimate of their correlation.
    """
    n = both + first_only + second_only + neither
    if n == 0:
        return (-1.0, 1.0)
    right1, right2 = both + first_only, both + second_only
    p1, p2 = right1 / n, right2 / n
    l1, u1 = wilson_interval(right1, n)
    l2, u2 = wilson_interval(right2, n)
    margins = right1 * (n - right1) * right2 * (n - right2)
    phi = 0.0
    if margins > 0:
        cross = both * neither - first_only * second_only
        if cross > n / 2:
            phi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            phi = cross / math.sqrt(margins)
    d = p2 - p1
    low = d - math.sqrt(max(0.0, (p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1)))
    high = d + math.sqrt(max(0.0, (u2 - p2) ** 2 + (p1 - l1) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1)))
    return (max(-1.0, low), min(1.0, high))


@dataclass(frozen=True)
class PairedTest:
    n_common: int
    only_first: int  # example ids scored by the first run alone
    only_second: int
    right_first: int
    right_second: int
    b: int  # first right, second wrong
    c: int  # first wrong, second right
    p_value: float
    diff_low_pts: float
    diff_high_pts: float

    @property
    def acc_first_pct(self) -> float:
        return 100 * self.right_first / self.n_common

    @property
    def acc_second_pct(self) -> float:
        return 100 * self.right_second / self.n_common

    @property
    def diff_pts(self) -> float:
        return self.acc_second_pct - self.acc_first_pct

    def verdict(self) -> str:
        if self.b + self.c == 0:
            return "same examples right in both: nothing to test"
        level = f"{100 * ALPHA:g}%"
        if self.p_value < ALPHA:
            return f"significant at {level}"
        return f"not significant at {level}: may be noise"


def paired_test(first: dict[str, bool], second: dict[str, bool]) -> PairedTest | None:
    """McNemar's exact test and the paired 95% interval on the example ids both runs scored."""
    common = sorted(first.keys() & second.keys())
    if not common:
        return None
    b = sum(first[i] and not second[i] for i in common)
    c = sum(second[i] and not first[i] for i in common)
    both = sum(first[i] and second[i] for i in common)
    low, high = paired_difference_interval(both, b, c, len(common) - both - b - c)
    return PairedTest(
        n_common=len(common),
        only_first=len(first.keys() - second.keys()),
        only_second=len(second.keys() - first.keys()),
        right_first=both + b,
        right_second=both + c,
        b=b,
        c=c,
        p_value=mcnemar_exact_p(b, c),
        diff_low_pts=100 * low,
        diff_high_pts=100 * high,
    )


def correctness(records: dict[str, dict[str, Any]], key: str) -> dict[str, bool]:
    """Example id -> answered right; an unparsed answer (None) is wrong."""
    return {i: r.get(key) is not None and r.get(key) == r.get("label") for i, r in records.items()}


@dataclass(frozen=True)
class Comparison:
    """One paired test, with what it compares in words."""

    what: str  # e.g. "modified vs baseline, fine-tuned loglik acc"
    test: PairedTest


def find_comparisons(runs: Sequence[Run]) -> tuple[list[Comparison], list[str]]:
    """Paired tests: each run against the first, and fine-tuned against zero-shot within each run.
    Returns the tests and, in words, those that could not be run."""
    found: list[Comparison] = []
    skipped: list[str] = []

    def add_test(what: str, a: dict[str, dict] | None, b: dict[str, dict] | None, key: str) -> None:
        if a is None or b is None:
            return
        test = paired_test(correctness(a, key), correctness(b, key))
        if test is None:
            skipped.append(f"{what}: the runs share no example id")
        else:
            found.append(Comparison(what, test))

    first = runs[0]
    for run in runs[1:]:
        for phase in PHASES:
            skipped.extend(_missing_predictions(first, run, phase))
            for method, key, name in MEASURES:
                what = f"{run.label} vs {first.label}, {PHASE_TITLES[phase]} {method} {name}"
                add_test(what, first.predictions.get((phase, method)), run.predictions.get((phase, method)), key)
    for run in runs:
        for method, key, name in MEASURES:
            what = f"{run.label}: fine-tuned vs zero-shot, {method} {name}"
            add_test(what, run.predictions.get(("zero_shot", method)), run.predictions.get(("fine_tuned", method)), key)
    return found, skipped


def _missing_predictions(first: Run, run: Run, phase: str) -> list[str]:
    """The paired tests of `run` against `first` in `phase` that one of the two lacks the predictions for."""
    skipped = []
    for method in ("loglik", "generate"):
        a, b = first.predictions.get((phase, method)), run.predictions.get((phase, method))
        if (a is None) != (b is None):
            missing = first if a is None else run
            skipped.append(
                f"no paired test of {run.label} vs {first.label}, {PHASE_TITLES[phase]} {method}: "
                f"{missing.label} has no {artifacts.predictions(phase, method)}"
            )
    return skipped
