"""Honest statistics for the fidelity gate: intervals, the decision on them, and the sample count.

A held-out set is a sample: 38 of 40 agreeing is compatible with a true agreement anywhere from
83.5 % to 98.6 %. The gate therefore decides on the lower end of a 95 % Wilson interval (which,
unlike the normal approximation, stays inside 0..100 % and is accurate near 100 %), and when the
point estimate meets the target but the interval does not, it says the set is too small and how
many samples at the same rate would show it. Pure numpy: no TensorFlow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Z95", "ClassAgreement", "Interval", "class_agreement", "expected_calibration_error", "less_faithful",
           "samples_needed", "wilson"]

Z95 = 1.959963984540054  # two-sided 95 %
_MAX_NEEDED = 10_000_000  # above this "samples needed" is reported as unreachable


@dataclass(frozen=True)
class Interval:
    """``successes`` of ``trials`` as a percentage with its 95 % Wilson interval (0..100)."""

    successes: int
    trials: int
    low: float
    high: float

    @property
    def pct(self) -> float:
        return 100.0 * self.successes / self.trials if self.trials else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"successes": self.successes, "trials": self.trials, "pct": self.pct, "low": self.low,
                "high": self.high}

    def text(self) -> str:
        return f"{self.pct:.2f}% [{self.low:.2f}, {self.high:.2f}] ({self.successes}/{self.trials})"


def wilson(successes: int, trials: int, z: float = Z95) -> Interval:
    """The Wilson score interval of a proportion, in percent.

    Raises:
        ValueError: counts are negative or successes exceed trials.
    """
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ValueError(f"expected 0 <= successes <= trials, got {successes}/{trials}")
    if trials == 0:
        return Interval(0, 0, 0.0, 100.0)
    low, high = _wilson_bounds(successes / trials, trials, z)
    return Interval(successes, trials, 0.0 if successes == 0 else low, 100.0 if successes == trials else high)


def _wilson_bounds(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half) * 100, min(1.0, centre + half) * 100


def samples_needed(rate_pct: float, target_pct: float, z: float = Z95) -> int | None:
    """Fewest samples at which a measured ``rate_pct`` has a 95 % lower bound >= ``target_pct``.

    None when no sample count can show it (the rate itself is not above the target).
    """
    if rate_pct <= target_pct:
        return None
    p = rate_pct / 100

    def low(n: int) -> float:  # at the measured rate exactly: monotonic in n
        return _wilson_bounds(p, n, z)[0]

    hi = 8
    while low(hi) < target_pct:
        hi *= 2
        if hi > _MAX_NEEDED:
            return None
    lo = hi // 2
    while lo < hi:
        mid = (lo + hi) // 2
        if low(mid) >= target_pct:
            hi = mid
        else:
            lo = mid + 1
    return hi


def less_faithful(better: np.ndarray, other: np.ndarray, alpha: float = 0.05) -> bool:
    """Whether ``other`` agrees with the float model on fewer of the same samples than ``better``
    by more than chance allows: an exact one-sided sign test (McNemar's) on the samples where
    exactly one of the two agrees (arrays of per-sample agreement, same order).

    Why paired: two candidates measured on the same 360 samples that differ on one sample have
    overlapping intervals *and* no evidence between them; comparing their intervals alone would
    be weaker than the data allows, and comparing point estimates would pick on noise.
    """
    if better.shape != other.shape:
        raise ValueError(f"expected agreements on the same samples, got {better.shape} and {other.shape}")
    wins = int(np.count_nonzero(better & ~other))
    losses = int(np.count_nonzero(other & ~better))
    n = wins + losses
    if wins <= losses:
        return False
    tail = sum(math.comb(n, k) for k in range(wins, n + 1)) / (1 << n)  # P(X >= wins | n, 1/2), exact ints
    return tail < alpha


@dataclass(frozen=True)
class ClassAgreement:
    """Top-1 agreement among the samples the float model puts in one class."""

    label: int
    agreement: Interval

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.label, **self.agreement.to_dict()}


def class_agreement(ref_top: np.ndarray, cand_top: np.ndarray, min_samples: int = 1) -> tuple[ClassAgreement, ...]:
    """Agreement per float class (classes with at least ``min_samples`` samples), worst first."""
    out = []
    for label in np.unique(ref_top):
        mask = ref_top == label
        if int(mask.sum()) >= min_samples:
            out.append(ClassAgreement(int(label), wilson(int((cand_top[mask] == label).sum()), int(mask.sum()))))
    return tuple(sorted(out, key=lambda c: (c.agreement.pct, -c.agreement.trials)))


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """ECE in points: the sample-weighted gap between confidence and accuracy over ``bins`` bins.

    Scores that are not probabilities (logits) go through a softmax first.
    """
    s = scores.astype(np.float64)
    if s.min() < -1e-3 or not np.allclose(s.sum(axis=1), 1, atol=0.05):
        s = np.exp(s - s.max(axis=1, keepdims=True))
        s /= s.sum(axis=1, keepdims=True)
    conf, pred = s.max(axis=1), s.argmax(axis=1)
    right = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            gap += mask.mean() * abs(conf[mask].mean() - right[mask].mean())
    return float(gap * 100)
