"""Paired comparisons of sweep variants, seed by seed.

Two variants run at the same seed share the teacher, the data order and the
student's initialisation, so the difference of their metrics at that seed is
free of what the seed alone explains. `paired_difference` takes the seeds both
variants finished, their differences (variant minus reference), the mean
difference and a percentile bootstrap interval of that mean (`RESAMPLES`
resamples of the seeds with replacement, numpy's generator seeded with
`BOOTSTRAP_SEED`, so a report is the same each time it is written). The verdict
is read off the interval, not by eye: `better` or `worse` when the whole
interval lies on one side of 0 (the metric's good side: higher, unless its name
says it is a loss or an error), `tie` when it holds 0.

With few seeds the interval is rough: with 3 pairs it can only span the spread
of their means, so `better` there means every seed's difference had that sign.

`reference_variant` picks the reference: `layerwise` (the paper's baseline,
distilling every layer every round) when the sweep has it, else the first
variant; `TASK_ALONE` (`task-only`, the student trained without a teacher) is
the second comparison when present.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
BOOTSTRAP_SEED = 0
#: The default reference: distilling every layer each round (the paper's Table 1 baseline).
DEFAULT_REFERENCE = "layerwise"
#: The variant that trains the student on the task alone (gin/sweeps/baselines.toml).
TASK_ALONE = "task-only"
#: Metric names holding one of these are better lower.
LOWER_IS_BETTER = ("loss", "error", "perplexity")


@dataclass(frozen=True)
class Paired:
    """`variant` against `against` over the seeds both finished."""

    variant: str
    against: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]  # variant minus reference, seed by seed
    mean: float
    low: float  # the bootstrap interval of the mean difference (nan with fewer than 2 pairs)
    high: float
    verdict: str  # 'better', 'worse', 'tie', or 'n < 2'

    @property
    def n(self) -> int:
        return len(self.seeds)

    def cell(self) -> str:
        """One results.md cell: `+0.0123 [-0.0040, +0.0290] tie (5 seeds)`."""
        if self.n < 2:
            return f"{self.mean:+.4f} (1 seed: no interval)"
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] {self.verdict} ({self.n} seeds)"


def higher_is_better(metric: str) -> bool:
    return not any(word in metric.lower() for word in LOWER_IS_BETTER)


def bootstrap_interval(differences: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `differences`."""
    d = np.asarray(differences, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_difference(variant: str, values: Mapping[int, float], against: str, reference: Mapping[int, float],
                      higher: bool = True) -> Paired | None:
    """`values` and `reference`: {seed: metric}; None when no seed has both
    finite. `higher`: whether a higher metric is better."""
    seeds = tuple(s for s in sorted(values) if s in reference
                  and math.isfinite(values[s]) and math.isfinite(reference[s]))
    if not seeds:
        return None
    diffs = tuple(values[s] - reference[s] for s in seeds)
    mean = float(np.mean(diffs))
    if len(seeds) < 2:
        return Paired(variant, against, seeds, diffs, mean, math.nan, math.nan, "n < 2")
    low, high = bootstrap_interval(diffs)
    if low > 0 or high < 0:
        verdict = "better" if (low > 0) == higher else "worse"
    else:
        verdict = "tie"
    return Paired(variant, against, seeds, diffs, mean, low, high, verdict)


def reference_variant(variants: Sequence[str]) -> str | None:
    """`layerwise` if among `variants`, else the first; None for none."""
    if DEFAULT_REFERENCE in variants:
        return DEFAULT_REFERENCE
    return variants[0] if variants else None


def references(variants: Sequence[str]) -> list[str]:
    """What every variant is compared with: the reference, and the task alone when present."""
    out = [r for r in (reference_variant(variants),) if r is not None]
    if TASK_ALONE in variants and TASK_ALONE not in out:
        out.append(TASK_ALONE)
    return out


def compare_all(per_variant: Mapping[str, Mapping[int, float]], against: str, metric: str
                ) -> dict[str, Paired]:
    """Every variant but `against` paired with it: {variant: Paired}."""
    if against not in per_variant:
        return {}
    higher = higher_is_better(metric)
    out = {}
    for v, values in per_variant.items():
        if v != against:
            p = paired_difference(v, values, against, per_variant[against], higher)
            if p is not None:
                out[v] = p
    return out
