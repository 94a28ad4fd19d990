"""Statistics for scripts/bench.py: percentiles, medians, summaries and ratios. Pure
functions over lists of floats, so the figures the benchmark prints can be unit-tested."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the two nearest
    ranks (the same rule as numpy's default). Raises ValueError on no values or a bad q."""
    data = sorted(values)
    if not data:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0 or math.isnan(q):
        raise ValueError(f"percentile {q} is outside 0..100")
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return data[lo]
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    return percentile(values, 50.0)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN when the denominator is zero, so a missing figure
    never reads as a pass."""
    if denominator == 0:
        return math.nan
    return numerator / denominator


@dataclass(frozen=True)
class Summary:
    """Distribution of one measured quantity (seconds, unless the caller says otherwise)."""

    n: int
    p50: float
    p95: float
    max: float
    mean: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("summary of no values")
    return Summary(n=len(values), p50=median(values), p95=percentile(values, 95.0),
                   max=max(values), mean=sum(values) / len(values))


def median_of_dicts(rounds: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Key-wise median over several rounds' figures; keys missing from a round are
    taken over the rounds that have them."""
    keys: list[str] = []
    for r in rounds:
        keys += [k for k in r if k not in keys]
    return {k: median([r[k] for r in rounds if k in r]) for k in keys}


def format_ratio(label: str, value: float) -> str:
    shown = "n/a" if math.isnan(value) else f"{value:.2f}"
    return f"ratio thinloop/raw ({label}): {shown}"
