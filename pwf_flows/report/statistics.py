"""The statistics a reviewer asks for, computed with :mod:`scipy.stats`.

Runs are grouped into *settings* (one config under several seeds: every replicate of it), each
final metric of a setting summarised as mean, standard deviation (``ddof=1``), ``n`` and the 95 %
Student-t interval of the mean. Methods are compared at matched budgets (the best mean top-1
of each method among its settings whose mean count of shared values is within ``K``) and,
against a reference method, on the replicates both ran (paired by dataset, model, base seed
and replicate index): the mean difference of top-1, its 95 % interval and the p-values of the
paired t-test and of Wilcoxon's signed-rank test.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from pwf_flows.report.collect import ReportError, ReportRun

CONFIDENCE = 0.95
ALPHA = 0.05
MIN_REPLICATES = 3  # fewer, and the page warns: an interval on two seeds is hardly one
DEFAULT_BUDGETS = (8, 16, 32, 64)
ACCURACY = "cls/acc"
DELTA = "vs_pretrained/cls/acc"  # top-1 minus the pretrained model's, per run
BUDGET = "budget/values"  # what a budget counts: shared values (2DGBNN's Gaussians alone)
TEST_SAMPLES = "data/test_samples"


@dataclass(frozen=True)
class Summary:
    """One metric over a setting's replicates.

    Args:
        n: Replicates that recorded the metric.
        mean: Their mean.
        sd: Their standard deviation (``ddof=1``); NaN for fewer than two.
        low: The 95 % Student-t interval of the mean, lower end (NaN for fewer than two).
        high: Its upper end.
    """

    n: int
    mean: float
    sd: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """The interval's half-width (it is symmetric about the mean)."""
        return (self.high - self.low) / 2


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def summarize(values: Iterable[float | None]) -> Summary:
    """Mean, sd, n and the 95 % Student-t interval of the finite ``values``."""
    return summarize_columns({"": list(values)})[""]


def summarize_columns(columns: dict[str, list[float | None]]) -> dict[str, Summary]:
    """:func:`summarize` of each column; the columns every replicate recorded in one pass
    (scipy's test runs along an axis: a setting's metrics at once)."""
    complete = [key for key, values in columns.items() if all(map(_finite, values))]
    found = {
        key: _summaries(np.array([[v for v in values if _finite(v)]], dtype=float).T)[0]
        for key, values in columns.items()
        if key not in complete
    }
    if complete:
        matrix = np.array([columns[key] for key in complete], dtype=float).T
        found |= dict(zip(complete, _summaries(matrix), strict=True))
    return {key: found[key] for key in columns}


def _summaries(matrix: np.ndarray) -> list[Summary]:
    """One :class:`Summary` per column of ``matrix`` (a row per replicate)."""
    n, columns = matrix.shape
    if n == 0:
        return [Summary(0, math.nan, math.nan, math.nan, math.nan)] * columns
    mean = matrix.mean(axis=0)
    if n == 1:
        return [Summary(1, float(m), math.nan, math.nan, math.nan) for m in mean]
    sd = matrix.std(axis=0, ddof=1)
    with warnings.catch_warnings():  # identical values: scipy warns (their interval: the point)
        warnings.simplefilter("ignore", RuntimeWarning)
        interval = stats.ttest_1samp(matrix, 0.0, axis=0).confidence_interval(CONFIDENCE)
    low, high = np.atleast_1d(interval.low), np.atleast_1d(interval.high)
    return [
        Summary(n, float(m), float(s), float(m if s == 0 else lo), float(m if s == 0 else hi))
        for m, s, lo, hi in zip(mean, sd, low, high, strict=True)
    ]


def run_values(run: ReportRun) -> dict[str, float]:
    """A run's final metrics plus the quantities computed from them: top-1 against the
    pretrained model, and the count a budget limits (shared values; the unique values of a
    run that recorded no shared count)."""
    values = dict(run.metrics)
    accuracy = run.metric(ACCURACY)
    if accuracy is not None and run.pretrained_acc is not None:
        values[DELTA] = accuracy - run.pretrained_acc
    count = run.metric("ws/shared_values")
    count = run.metric("ws/unique_values") if count is None else count
    if count is not None:
        values[BUDGET] = count
    return values


@dataclass
class Setting:
    """One config of one method on one panel, over its replicates.

    Args:
        panel: The model and dataset (or the report's one panel).
        method: The compression method.
        key: The ``setting`` tag its replicates share.
        runs: Its replicates, one per (base seed, replicate index), by replicate index.
        dropped: Earlier runs of a replicate that was run again (only the newest counts).
    """

    panel: str
    method: str
    key: str
    runs: list[ReportRun]
    dropped: int = 0
    stats: dict[str, Summary] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = [run_values(run) for run in self.runs]
        keys = sorted({key for run in values for key in run})
        self.stats = summarize_columns({key: [run.get(key) for run in values] for key in keys})

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def knobs(self) -> dict[str, str]:
        """The size knobs as the replicates resolved them (``b=5/6`` where they differ)."""
        keys = dict.fromkeys(key for run in self.runs for key in run.knobs)
        return {
            key: "/".join(dict.fromkeys(run.knobs[key] for run in self.runs if key in run.knobs))
            for key in keys
        }

    @property
    def knobs_text(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.knobs.items()) or "no size knob"

    @property
    def label(self) -> str:
        """What names the setting on the page: its method and resolved size knobs."""
        return f"{self.method} {self.knobs_text}"

    def mean(self, key: str) -> float:
        summary = self.stats.get(key)
        return math.nan if summary is None else summary.mean

    def by_pair(self) -> dict[tuple[str, str, str, int], ReportRun]:
        return {run.pair: run for run in self.runs}


def settings_of(panels: dict[str, list[ReportRun]]) -> dict[str, list[Setting]]:
    """Each panel's runs grouped into settings, by method, then by mean budget count.

    A replicate that finished twice (a rerun with ``--fresh``) counts once: its newest run.
    """
    grouped: dict[str, list[Setting]] = {}
    for panel, runs in panels.items():
        buckets: dict[tuple[str, str], dict[tuple, ReportRun]] = {}
        dropped: dict[tuple[str, str], int] = {}
        for run in sorted(runs, key=lambda r: (r.start_time, r.run_id)):
            key = (run.method, run.setting)
            bucket = buckets.setdefault(key, {})
            dropped[key] = dropped.get(key, 0) + (run.pair in bucket)
            bucket[run.pair] = run
        settings = [
            Setting(panel, method, key, sorted(bucket.values(), key=lambda r: r.replicate))
            for (method, key), bucket in buckets.items()
        ]
        for setting in settings:
            setting.dropped = dropped[(setting.method, setting.key)]
        grouped[panel] = sorted(
            settings, key=lambda s: (s.method, _sortable(s.mean(BUDGET)), s.knobs_text)
        )
    return grouped


def _sortable(value: float) -> float:
    return math.inf if math.isnan(value) else value


def methods_in(settings: Sequence[Setting]) -> list[str]:
    """The methods of a report, in its order (by name)."""
    return sorted({setting.method for setting in settings})


def best_within(settings: Sequence[Setting], method: str, budget: float) -> Setting | None:
    """``method``'s setting with the best mean top-1 among those whose mean budget count is
    at most ``budget`` (``None`` when it has none)."""
    within = [s for s in settings if s.method == method and _sortable(s.mean(BUDGET)) <= budget]
    within = [s for s in within if not math.isnan(s.mean(ACCURACY))]
    return max(within, key=lambda s: s.mean(ACCURACY)) if within else None


@dataclass(frozen=True)
class Paired:
    """A method's top-1 against the reference's on the replicates both ran.

    Args:
        n: Shared pairs.
        mean: Mean difference of top-1 (method minus reference; fractions).
        low: 95 % Student-t interval of the mean difference, lower end.
        high: Its upper end.
        p_t: Two-sided p-value of the paired t-test (:func:`scipy.stats.ttest_rel`).
        p_wilcoxon: Two-sided p-value of Wilcoxon's signed-rank test
            (:func:`scipy.stats.wilcoxon`).
    """

    n: int
    mean: float = math.nan
    low: float = math.nan
    high: float = math.nan
    p_t: float = math.nan
    p_wilcoxon: float = math.nan

    @property
    def significant(self) -> bool:
        """Whether the paired t-test finds a difference at :data:`ALPHA` (pairs that differ by
        one same amount have no spread to test: not counted)."""
        return self.n >= 2 and self.low != self.high and self.p_t < ALPHA

    @property
    def verdict(self) -> str:
        """What a reader may conclude, in words."""
        if self.n == 0:
            return "n/a, no shared seeds"
        if self.n == 1:
            return "n/a, one shared seed: no test"
        if self.low == self.high == self.mean == 0:
            return f"no difference on any of the {self.n} pairs"
        better = "higher" if self.mean > 0 else "lower"
        if self.low == self.high:  # no spread: the t-test's p of 0 says nothing more
            return f"{better} by the same Δ on all {self.n} pairs: no spread to test"
        if not self.significant:
            return f"not significant at n = {self.n}"
        return f"{better}, significant at n = {self.n} (paired t, p < {ALPHA})"


def paired(method: Setting, reference: Setting) -> Paired:
    """Top-1 of ``method`` against ``reference`` on their shared (seed, replicate) pairs."""
    mine, theirs = method.by_pair(), reference.by_pair()
    shared = sorted(set(mine) & set(theirs))
    a = np.array([mine[p].metric(ACCURACY) for p in shared], dtype=float)
    b = np.array([theirs[p].metric(ACCURACY) for p in shared], dtype=float)
    if len(shared) < 2:
        return Paired(len(shared), float(a[0] - b[0]) if shared else math.nan)
    if np.all(a == b):
        return Paired(len(shared), 0.0, 0.0, 0.0, 1.0, 1.0)
    with warnings.catch_warnings():  # equal differences on every pair: scipy warns
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_rel(a, b)
        interval = test.confidence_interval(CONFIDENCE)
        wilcoxon = stats.wilcoxon(a, b)
    return Paired(
        len(shared),
        float(np.mean(a - b)),
        float(interval.low),
        float(interval.high),
        float(test.pvalue),
        float(wilcoxon.pvalue),
    )


@dataclass(frozen=True)
class BudgetRow:
    """One method at one budget: its best setting within it, and how it compares.

    Args:
        budget: ``K``: the most shared values allowed.
        method: The method.
        setting: Its best setting within ``K`` (``None``: it has none).
        reference: The reference method's best setting within ``K``.
        comparison: ``setting`` against ``reference`` (``None`` for the reference itself or
            where either is missing).
    """

    budget: int
    method: str
    setting: Setting | None
    reference: Setting | None
    comparison: Paired | None

    @property
    def is_reference(self) -> bool:
        return self.reference is not None and self.setting is self.reference

    @property
    def verdict(self) -> str:
        if self.setting is None:
            return f"no setting within {self.budget} values"
        if self.is_reference:
            return "reference"
        if self.reference is None:
            return f"n/a, no reference setting within {self.budget} values"
        return self.comparison.verdict if self.comparison is not None else ""


def budget_rows(
    settings: Sequence[Setting], reference: str, budgets: Sequence[int]
) -> list[BudgetRow]:
    """The table "top-1 at <= K values": every method at every budget, against ``reference``
    (the reference first at each budget)."""
    methods = methods_in(settings)
    order = sorted(methods, key=lambda method: method != reference)  # the reference first
    rows = []
    for budget in budgets:
        anchor = best_within(settings, reference, budget)
        for method in order:
            best = best_within(settings, method, budget)
            comparison = None
            if best is not None and anchor is not None and best is not anchor:
                comparison = paired(best, anchor)
            rows.append(BudgetRow(budget, method, best, anchor, comparison))
    return rows


def parse_budgets(text: str) -> tuple[int, ...]:
    """``"8,16,32"`` as budgets.

    Raises:
        ReportError: for anything but positive whole numbers.
    """
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        budgets = tuple(int(part) for part in parts)
    except ValueError:
        budgets = ()
    if not budgets or any(b <= 0 for b in budgets):
        raise ReportError(
            f"--budgets '{text}': give counts of values as positive whole numbers, e.g. 8,16,32,64"
        )
    return tuple(sorted(set(budgets)))


def pick_reference(settings: Sequence[Setting], asked: str | None) -> str:
    """The reference method: the one asked for, else the first of the report's order.

    Raises:
        ReportError: when the one asked for has no run in the report.
    """
    methods = methods_in(settings)
    if asked is None:
        return methods[0]
    if asked not in methods:
        raise ReportError(
            f"--reference '{asked}' has no run in this report; its methods are: "
            + ", ".join(methods)
        )
    return asked


def resolution(runs: Iterable[ReportRun]) -> str:
    """What one test sample is worth in top-1, for the runs of a table."""
    sizes = sorted({int(n) for run in runs if (n := run.metric(TEST_SAMPLES))})
    if not sizes:
        return (
            "These runs did not record their test split's size (an older pwf): the resolution "
            "of top-1 is not known."
        )
    shown = "; ".join(f"one test sample = {100 / n:.2f} pt, n = {n}" for n in sizes)
    return f"Resolution of top-1: {shown}."


def few_replicates(settings: Iterable[Setting]) -> list[Setting]:
    """The settings with fewer than :data:`MIN_REPLICATES` replicates."""
    return [s for s in settings if s.n < MIN_REPLICATES]
