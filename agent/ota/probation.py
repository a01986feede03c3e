"""Probation: watch a freshly activated model on live traffic, then commit or roll back.

The watcher is a :class:`~agent.host.ModelHost` observer. On the request path it only counts,
checks outputs for NaN/Inf and copies a sampled input for the shadow run; the shadow inference
on the previous model happens on the OTA worker thread (:meth:`ProbationWatcher.run_shadow`), so
live requests never wait for it.

The verdict is a pure function of the counters (:func:`judge`):

- any NaN/Inf output              -> roll back at once
- a call stuck past its deadline  -> roll back at once (the model hangs on that input)
- error rate > max_error_rate     -> roll back (judged once ``inferences`` calls were seen, or at the
                                     time limit, or as soon as the errors alone exceed the limit)
- p95 latency > budget x max_latency_factor -> roll back
- shadow top-1 agreement < min_agreement (with at least ``min_shadow`` comparisons) -> roll back
- ``inferences`` live calls seen, or ``seconds`` elapsed -> commit

Caller mistakes are not the model's failures: an :class:`~edgefleet.errors.InputError` (wrong
shape, dtype, names) is counted apart (``input_errors``) and never judged.

No traffic at all: before waiting, :func:`run_probation` runs the manifest's golden samples
through the new model on the live path (synthetic traffic: catches errors, NaN and latency
there). If no live inference arrives before the time limit, the model commits on that evidence
plus the child-process validation; agreement is then not measured, and the event says so.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from agent.ota.crashpoints import crash_point
from edgefleet.errors import EdgefleetError, InputError
from edgefleet.manifest import Manifest
from edgefleet.profiles import Profile
from edgefleet.quant import first_output, top1

__all__ = ["ProbationCounters", "ProbationPolicy", "ProbationWatcher", "Verdict", "judge", "policy_for",
           "run_probation"]


@dataclass(frozen=True)
class ProbationPolicy:
    inferences: int            # live calls before a commit
    seconds: float             # longest probation, s
    max_error_rate: float      # failed calls / calls
    min_agreement: float       # shadow top-1 agreement with the previous model, 0..1
    shadow_fraction: float     # share of live inputs re-run on the previous model
    max_latency_ms: float      # p95 limit, ms (budget x max_latency_factor)
    min_shadow: int = 5        # comparisons needed before agreement is judged


def policy_for(profile: Profile, manifest: Manifest | None) -> ProbationPolicy:
    """The profile's probation settings with the manifest's overrides applied."""
    p = profile.probation
    o = manifest.probation if manifest is not None and manifest.probation is not None else None
    return ProbationPolicy(
        inferences=(o.inferences if o and o.inferences else p.inferences),
        seconds=(o.seconds if o and o.seconds else p.seconds),
        max_error_rate=p.max_error_rate,
        min_agreement=(o.min_agreement if o and o.min_agreement is not None else p.min_agreement),
        shadow_fraction=p.shadow_fraction,
        max_latency_ms=profile.limits.latency_budget_ms * p.max_latency_factor,
    )


@dataclass(frozen=True)
class ProbationCounters:
    calls: int
    errors: int
    nonfinite: int
    p95_ms: float | None
    shadow: int
    agree: int
    synthetic: int
    last_error: str | None = None
    input_errors: int = 0      # caller mistakes (InputError), never held against the model
    stuck: int = 0             # calls running past their deadline right now
    stuck_s: float = 0.0       # how long the oldest of them has been running, s
    deadline_s: float | None = None  # the engine's per-call deadline, s


@dataclass(frozen=True)
class Verdict:
    decision: str  # "commit" | "rollback" | "continue"
    reason: str | None = None


def _stuck_reason(c: ProbationCounters) -> str:
    return (f"{c.stuck} inference call(s) stuck past the {c.deadline_s or 0:g} s deadline during probation "
            f"(the oldest running for {c.stuck_s:.1f} s)")


def judge(c: ProbationCounters, policy: ProbationPolicy, elapsed_s: float) -> Verdict:
    """Commit, roll back or keep watching; a pure function of the counters and the time.

    A call stuck past its deadline is a failure that has not come back yet, and it is judged at
    once, not as a rate: it holds one of the few interpreters for as long as it runs (so there are
    never more of them than interpreters), the deadline is already 20 x the latency budget, and
    the watchdog treats one stuck call as a dead agent. So no commit is ever given while one runs.
    """
    if c.nonfinite:
        return Verdict("rollback", f"{c.nonfinite} output(s) with NaN/Inf during probation")
    if c.stuck:
        return Verdict("rollback", _stuck_reason(c))
    total = c.calls + c.synthetic
    limit_errors = policy.max_error_rate * max(policy.inferences, total)
    if c.errors and c.errors > limit_errors:
        detail = f": {c.last_error}" if c.last_error else ""
        return Verdict("rollback", f"{c.errors} of {total} inferences failed during probation "
                       f"(max error rate {policy.max_error_rate:g}){detail}")
    if c.p95_ms is not None and c.p95_ms > policy.max_latency_ms and total >= 5:
        return Verdict("rollback", f"p95 latency {c.p95_ms:.2f} ms exceeds {policy.max_latency_ms:g} ms "
                       "during probation")
    if c.shadow >= policy.min_shadow:
        agreement = c.agree / c.shadow
        if agreement < policy.min_agreement and (c.calls >= policy.inferences or elapsed_s >= policy.seconds):
            return Verdict("rollback", f"top-1 agreement with the previous model {agreement:.2f} "
                           f"< {policy.min_agreement:g} over {c.shadow} shadow comparisons")
    if c.calls >= policy.inferences:
        return Verdict("commit")
    if elapsed_s >= policy.seconds:
        if c.calls == 0:
            return Verdict("commit", "no live traffic during probation; committed on validation and "
                           f"{c.synthetic} golden-sample inference(s)")
        return Verdict("commit", f"time limit reached after {c.calls} live inference(s)")
    return Verdict("continue")


def _top1(out: Any) -> np.ndarray:
    return top1(first_output(out))


def _finite(out: Any) -> bool:
    if isinstance(out, dict):
        return all(bool(np.all(np.isfinite(v))) for v in out.values())
    return bool(np.all(np.isfinite(out)))


class ProbationWatcher:
    """Counts what the live path sees; the OTA worker drains the shadow queue and judges."""

    def __init__(self, policy: ProbationPolicy, max_pending_shadow: int = 64) -> None:
        self.policy = policy
        self._lock = threading.Lock()  # observer calls come from every inference thread
        self._calls = self._errors = self._nonfinite = self._synthetic = self._input_errors = 0
        self._shadow = self._agree = 0
        self._lat: collections.deque[float] = collections.deque(maxlen=1024)
        self._last_error: str | None = None
        self._every = max(1, round(1 / policy.shadow_fraction)) if policy.shadow_fraction > 0 else 0
        self._queue: collections.deque[tuple[Any, np.ndarray]] = collections.deque(maxlen=max_pending_shadow)
        self.synthetic_mode = False
        self.wake = threading.Event()

    # -- the observer (request path) ------------------------------------------------------------
    def __call__(self, x: Any, out: Any, latency_s: float, error: BaseException | None) -> None:
        if isinstance(error, InputError):  # the caller's mistake: the model never ran
            with self._lock:
                self._input_errors += 1
            return
        sample = None
        with self._lock:
            if self.synthetic_mode:
                self._synthetic += 1
            else:
                self._calls += 1
            self._lat.append(latency_s)
            if error is not None:
                self._errors += 1
                self._last_error = f"{type(error).__name__}: {error}"
            elif not _finite(out):
                self._nonfinite += 1
            elif self._every and not self.synthetic_mode and self._calls % self._every == 0:
                sample = x
        if sample is not None:
            copied = {k: np.array(v) for k, v in sample.items()} if isinstance(sample, dict) else np.array(sample)
            self._queue.append((copied, _top1(out)))
        if error is not None or sample is not None or self._calls >= self.policy.inferences:
            self.wake.set()

    # -- the OTA worker ---------------------------------------------------------------------------
    def run_shadow(self, infer_previous: Any) -> None:
        """Run queued live inputs on the previous model and count top-1 agreement."""
        while self._queue:
            x, top_new = self._queue.popleft()
            try:
                prev = infer_previous(x)
            except Exception:  # noqa: BLE001, S112 (the old model failing is not the new model's fault)
                continue
            if prev is None:
                continue
            with self._lock:
                self._shadow += 1
                self._agree += int(np.array_equal(_top1(prev), top_new))

    def counters(self) -> ProbationCounters:
        with self._lock:
            lat = np.fromiter(self._lat, dtype=np.float64) if self._lat else None
            return ProbationCounters(
                calls=self._calls, errors=self._errors, nonfinite=self._nonfinite,
                p95_ms=float(np.percentile(lat, 95)) * 1000.0 if lat is not None else None,
                shadow=self._shadow, agree=self._agree, synthetic=self._synthetic,
                last_error=self._last_error, input_errors=self._input_errors)


def _with_stuck(c: ProbationCounters, engine: Any) -> ProbationCounters:
    """The counters plus the calls now stuck in ``engine`` (the observer sees a call only once it returns)."""
    report = getattr(engine, "stuck_calls", None)
    if report is None:
        return c
    stuck = report()
    return replace(c, stuck=stuck.count, stuck_s=round(stuck.oldest_s, 3), deadline_s=stuck.deadline_s)


def run_probation(host: Any, manifest: Manifest, profile: Profile, golden_traffic: int,
                  check_stop: Callable[[], None]) -> tuple[Verdict, ProbationCounters]:
    """Watch the model ``host`` now serves until :func:`judge` commits or rolls back.

    Runs on the OTA worker: first up to ``golden_traffic`` golden samples through the live path
    (synthetic traffic), then live traffic with the shadow runs. ``check_stop`` is called at
    every wake-up and raises to abandon probation (the agent is stopping; the next boot undoes it).
    """
    policy = policy_for(profile, manifest)
    watcher = ProbationWatcher(policy)
    host.set_observer(watcher)
    try:
        watcher.synthetic_mode = True
        for feed, _ in (manifest.golden_arrays()[:golden_traffic] if manifest.golden else []):
            try:
                host.infer(feed)
            except EdgefleetError:
                pass  # counted by the observer
        watcher.synthetic_mode = False
        start = time.monotonic()
        crashed = False
        while True:
            watcher.wake.wait(0.05)
            watcher.wake.clear()
            check_stop()
            watcher.run_shadow(host.infer_previous)
            counters = _with_stuck(watcher.counters(), host.engine)
            if counters.calls and not crashed:
                crashed = True
                crash_point("probation")
            verdict = judge(counters, policy, time.monotonic() - start)
            if verdict.decision != "continue":
                return verdict, counters
    finally:
        host.set_observer(None)
