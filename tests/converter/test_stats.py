"""The fidelity gate's statistics: Wilson intervals, the lower-bound decision, the sample count it
would need, per-class agreement and calibration error. Pure numpy, no TensorFlow."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from converter.fidelity import Metrics, misses
from converter.stats import (
    _wilson_bounds,
    class_agreement,
    expected_calibration_error,
    less_faithful,
    samples_needed,
    wilson,
)
from edgefleet.profiles import Fidelity


def _metrics(agree: int, n: int, worst: tuple[int, int] | None = None) -> Metrics:
    ref = np.zeros(n, int)
    cand = np.array([0] * agree + [1] * (n - agree))
    classes = class_agreement(ref, cand)
    return Metrics(n, 100 * agree / n, None, None, {"y": 1.0}, {"y": 40.0}, {"y": 0.0},
                   agreement=wilson(agree, n), worst_class=classes[0])


def test_forty_samples_cannot_tell_95_from_98_percent() -> None:
    """The issue's case: 38 of 40 agreeing is compatible with 98 % (and with 84 %)."""
    iv = wilson(38, 40)
    assert iv.low == pytest.approx(83.50, abs=0.01) and iv.high == pytest.approx(98.62, abs=0.01)
    assert iv.low < 95 and 98 < iv.high


def test_wilson_interval_stays_inside_0_100_and_shrinks_with_samples() -> None:
    assert wilson(40, 40).high == 100 and wilson(0, 40).low == 0
    assert wilson(360, 360).low == pytest.approx(98.94, abs=0.01)
    assert wilson(3550, 3600).high - wilson(3550, 3600).low < wilson(355, 360).high - wilson(355, 360).low
    with pytest.raises(ValueError):
        wilson(5, 4)


def test_samples_needed_is_the_smallest_count_whose_lower_bound_reaches_the_target() -> None:
    n = samples_needed(98.61, 98.0)
    assert n is not None and 1500 < n < 2500  # the MobileNetV2 figure: 360 samples are far too few for 98 %
    assert _wilson_bounds(0.9861, n)[0] >= 98.0 > _wilson_bounds(0.9861, n - 1)[0]
    assert samples_needed(100.0, 96.0) == 93  # 93/93 agreeing: lower bound 96.03 %
    assert samples_needed(95.0, 96.0) is None


def test_gate_passes_on_the_lower_bound_and_says_when_the_held_out_set_is_too_small() -> None:
    target = Fidelity(max_top1_drop_pct=1, min_top1_agreement_pct=96, min_cosine=0.9)
    assert misses(_metrics(360, 360), target) == []
    (small,) = misses(_metrics(40, 40), target)
    assert small.startswith("held-out set too small to show top-1 agreement >= 96%") and "with 93 held-out" in small
    (low,) = misses(_metrics(300, 360), target)
    assert low.startswith("top-1 agreement 83.33% [") and "< 96%" in low


def test_a_silent_regression_on_one_class_misses_the_per_class_bound() -> None:
    ref = np.repeat(np.arange(4), 50)
    cand = ref.copy()
    cand[150:165] = 0  # class 3 loses 15 of 50: 92.5 % overall
    worst = class_agreement(ref, cand)[0]
    assert (worst.label, worst.agreement.successes, worst.agreement.trials) == (3, 35, 50)
    m = Metrics(200, 92.5, None, None, {"y": 1.0}, {"y": 40.0}, {"y": 0.0}, agreement=wilson(185, 200),
                worst_class=worst)
    target = Fidelity(max_top1_drop_pct=1, min_top1_agreement_pct=80, min_cosine=0.9, max_class_drop_pct=15)
    assert misses(m, target) == ["class 3 agreement 70.00% [56.25, 80.90] (35/50): drop 30.00 points > 15"]


def test_expected_calibration_error_is_zero_when_confidence_matches_accuracy() -> None:
    labels = np.array([0, 0, 0, 1] * 25)
    sure = np.eye(2)[labels]
    assert expected_calibration_error(sure, labels) == pytest.approx(0.0)
    unsure = np.tile([0.75, 0.25], (100, 1))  # says 75 % and is right 75 % of the time
    assert expected_calibration_error(unsure, labels) == pytest.approx(0.0, abs=1e-9)
    overconfident = np.tile([0.99, 0.01], (100, 1))
    assert expected_calibration_error(overconfident, labels) == pytest.approx(24.0)
    assert expected_calibration_error(np.log(unsure), labels) == pytest.approx(0.0, abs=1e-6)  # logits


def test_one_sample_in_360_does_not_make_a_candidate_less_faithful() -> None:
    """MobileNetV2 at 50 % sparsity: 332/360 against 331/360 on the same samples is no evidence."""
    better = np.ones(360, bool)
    better[:28] = False
    other = better.copy()
    other[30] = False
    assert not less_faithful(better, other)


def test_many_more_samples_lost_than_won_make_a_candidate_less_faithful() -> None:
    better = np.ones(1200, bool)
    better[:62] = False  # fer, MSE ranges: 62 disagreements
    other = better.copy()
    other[100:130] = False  # 30 more lost, none won: P = 2^-30
    assert less_faithful(better, other)
    mixed = other.copy()
    mixed[:20] = True  # 20 won back: 30 against 20 is chance (P = 0.10)
    assert not less_faithful(better, mixed)


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=300))
def test_less_faithful_never_holds_both_ways_nor_against_itself(pairs: list[tuple[bool, bool]]) -> None:
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    assert not (less_faithful(a, b) and less_faithful(b, a))
    assert not less_faithful(a, a.copy())


def test_less_faithful_decides_on_thousands_of_discordant_samples() -> None:
    """Past 1023 discordant samples a float 2**n overflows: the tail is taken on exact integers."""
    better = np.zeros(3000, bool)
    better[:1100] = True  # won: better agrees, other does not
    other = np.zeros(3000, bool)
    other[1100:2100] = True  # lost: 1000 the other way; 1100 of 2100 is z = 2.2, P = 0.016
    assert less_faithful(better, other)
    other[2100:2200] = True  # 1100 against 1100: a coin
    assert not less_faithful(better, other)


def test_less_faithful_refuses_agreements_on_different_samples() -> None:
    with pytest.raises(ValueError, match="same samples"):
        less_faithful(np.ones(10, bool), np.ones(11, bool))
