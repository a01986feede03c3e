"""Upper confidence bounds for the cache's evidence: Clopper-Pearson on a cell's verdicts, Poisson on a
sum of reuses' risks. Pure Python (math and statistics), memoized where the hot path reads them."""

from __future__ import annotations

import math
import statistics
from functools import lru_cache

__all__ = ["binomial_upper", "poisson_quantile"]


def _binomial_cdf(x: int, n: int, p: float) -> float:
    """P(X <= x) for X ~ Binomial(n, p), summed in log space (x is small where it matters)."""
    if x >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    return min(1.0, sum(math.exp(base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
                        for i in range(x + 1)))


def binomial_upper(x: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen as ``x`` events in ``n`` trials.

    Exact (never narrower than the truth at ``confidence``), unlike Wilson's, which undercovers
    at zero events: the case a cache lives in.
    """
    if n <= 0:
        return 1.0
    if x >= n:
        return 1.0
    alpha = 1.0 - confidence
    lo, hi = x / n, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if _binomial_cdf(x, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


@lru_cache(maxsize=4096)
def _poisson_upper(x: int, confidence: float) -> float:
    """Upper limit of a Poisson mean after ``x`` events: Clopper-Pearson's small-rate form.

    ``_poisson_upper(x) / n`` is never below the exact bound and is within a fraction of a percent
    of it where a cache works (rates of a few %), and it costs one division once memoized.
    """
    alpha = 1.0 - confidence
    lo, hi = float(x), float(x) + 10.0 * math.sqrt(x + 1.0) + 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        cdf = sum(math.exp(-mid + i * math.log(mid) - math.lgamma(i + 1)) for i in range(x + 1))
        lo, hi = (mid, hi) if cdf > alpha else (lo, mid)
    return hi


def poisson_quantile(mean: float, confidence: float) -> int:
    """The smallest ``k`` with P(X <= k) >= ``confidence`` for X ~ Poisson(``mean``).

    A sum of independent Bernoulli events whose probabilities add up to ``mean`` exceeds it no
    more often than the Poisson count does (Anderson and Samuels), so ``k`` bounds how many of
    the reuses really disagreed, not only how many were expected to.
    """
    if mean <= 0.0:
        return 0
    if mean > 500.0:  # the normal approximation, rounded up with a continuity margin
        z = statistics.NormalDist().inv_cdf(confidence)
        return math.ceil(mean + z * math.sqrt(mean) + 1.0)
    k, term = 0, math.exp(-mean)
    total = term
    while total < confidence:
        k += 1
        term *= mean / k
        total += term
    return k
