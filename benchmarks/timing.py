"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of per-round ratios of interleaved timings: drift between rounds cancels."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))
