"""Meta-analysis of the sites' aggregate results: the pooled hazard ratio and the weighted C-index.

Per-patient data never leaves a site, so the federation combines what the sites sent: each site's HR with
its 95% CI, and each site's C-index with its number of patients. Inputs come from summaries rebuilt from
received metrics (or older summaries), so a missing or damaged value is skipped, never trusted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeGuard

from fahr_core.survival.results import JsonResult

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class PooledHazardRatio(JsonResult):
    """Fixed-effect pooled HR with its 95% CI, the sites it pools, and I² (spread beyond chance, 0..1)."""

    hr: float
    ci_low: float
    ci_high: float
    n_sites: int
    i2: float


@dataclass(frozen=True)
class WeightedCIndex:
    """The n-weighted mean of the sites' C-indices (None: no site had one) and the patients it covers."""

    mean: float | None
    n: int


def weighted_c_index(sites: Iterable[tuple[object, object]]) -> WeightedCIndex:
    """n-weighted mean of site C-indices over the (n, C-index) pairs that have both.

    This is a summary of site results, not a C-index over all pooled patients: that would need
    per-patient data, which by design never leaves a site.
    """
    scored = [(int(n), float(c)) for n, c in sites if _number(c) and _number(n) and n > 0]
    total = sum(n for n, _ in scored)
    if total == 0:
        return WeightedCIndex(None, 0)
    return WeightedCIndex(sum(n * c for n, c in scored) / total, total)


def _number(v: object) -> TypeGuard[float]:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _positive(v: object) -> TypeGuard[float]:
    """A usable HR or CI bound: a positive number (None, a string or 0 from a damaged summary is not)."""
    return _number(v) and v > 0


def pooled_hazard_ratio(estimates: Iterable[tuple[object, object, object]]) -> PooledHazardRatio | None:
    """Fixed-effect (inverse-variance) pooled hazard ratio from the sites' (HR, CI low, CI high), with I².

    Each site's standard error of log HR is recovered from its CI width: (log hi - log lo) / (2 * 1.96).
    Fixed-effect pooling assumes one true HR across sites; I² (share of the spread between sites beyond
    chance) says how far to trust that. None if no site has a usable HR.
    """
    logs, weights = [], []
    for est, lo, hi in estimates:
        if not (_positive(est) and _positive(lo) and _positive(hi)) or hi <= lo:
            continue
        se = (math.log(hi) - math.log(lo)) / (2 * Z95)
        logs.append(math.log(est))
        weights.append(1.0 / se**2)
    if not logs:
        return None
    w = sum(weights)
    mean = sum(wi * li for wi, li in zip(weights, logs, strict=True)) / w
    se = 1.0 / math.sqrt(w)
    q = sum(wi * (li - mean) ** 2 for wi, li in zip(weights, logs, strict=True))
    i2 = max(0.0, (q - (len(logs) - 1)) / q) if q > 0 else 0.0
    return PooledHazardRatio(
        hr=math.exp(mean),
        ci_low=math.exp(mean - Z95 * se),
        ci_high=math.exp(mean + Z95 * se),
        n_sites=len(logs),
        i2=i2,
    )
