"""Input-locality cache: reuse model outputs for repeated or nearly repeated inputs, with a measured bound.

Three layers (see ``docs/cache.md``):

1. **Exact**: key = xxh3-64 of the input bytes *after* conversion to the model's input dtype,
   seeded with the model's sha256, so two float frames that quantize to the same tensor share an
   entry and two models never do. LRU, bounded in bytes.
2. **Near duplicate**: a cheap signature of the input (strided subsample, coarsely quantized to
   256 levels over the input's value range) is compared with the signature of the *last input that
   was actually computed* (the reference; never the previous input, so small drifts cannot pile
   up). The distance is divided by the reference's *margin* (classifiers: top-1 minus top-2 score;
   other models: the input distance at which the outputs move by a whole tolerance, a running
   mean over the computed pairs), giving a *score*: confident answers get small scores, fragile
   ones large or infinite. Reuse happens only below the score limit that the evidence supports, within
   ``near_threshold`` (a ceiling), 3x the mean distance of agreeing verdicts (the envelope),
   ``max_age_s`` and ``max_consecutive``. A manifest's ``output_roles`` make the verdict judge a
   detector on its detections (scores after their activation, boxes only where one is detected).
3. **Evidence**: every computed frame that had a reference is a free verdict (would reusing the
   reference have changed the answer?), and a share of near hits is recomputed on purpose (more
   where a cell's evidence is thin). Verdicts are counted per cell of (context, score band); the
   context is how many recent verdicts disagreed at or near that score, so a scene whose answers
   flicker is not judged on the evidence of a calm one at the same scores. Disagreement only grows
   with the score and the context, so a cell is bounded by the verdicts at and above it: a
   one-sided Clopper-Pearson upper bound (at ``confidence``) under ``target_disagreement`` lets it
   be reused freely; under 4x the target, on a budget that keeps the expected disagreement over
   all answers under the target. Every reuse stays charged at its cell's *current* bound, and the
   reported upper bound is the Poisson quantile of that expected count: a bound on how many
   reused answers really differed, not only on how many were expected to. No evidence, no reuse.

All state sits behind one lock: callers on several threads share one cache.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import xxhash
from pydantic import ValidationError

from agent.tensors import TensorInfo
from edgefleet.errors import ConfigError
from edgefleet.profiles import CacheSettings, format_validation_error
from edgefleet.quant import dequantize, top1

__all__ = ["EVIDENCE_FORMAT", "EVIDENCE_MAX_BYTES", "CacheSpec", "EvidenceError", "EvidenceMismatch",
           "InferenceCache", "Lookup", "OutputJudge", "binomial_upper", "input_signature", "output_change",
           "output_judges", "output_ranges", "output_tolerances", "parse_evidence", "poisson_quantile",
           "resolve_cache", "signature_distance"]

_ENTRY_OVERHEAD = 128  # bytes per entry for the key, tuple and OrderedDict node
_SIGNATURE_CELLS = 32  # samples per spatial axis
_INF = math.inf
# Bands of score (distance / margin): band 0 is [0, _BAND_BASE), band b >= 1 is
# [_BAND_BASE * r**(b-1), _BAND_BASE * r**b) with r = sqrt(2); the last band is open and never reused.
_BANDS = 26
_BAND_BASE = 2e-3
_LOG_RATIO = math.log(math.sqrt(2.0))
_BAND_TOP = _BAND_BASE * math.sqrt(2.0) ** (_BANDS - 1)
_THIN_VERDICTS = 30  # a band with this many verdicts is verified at about half of max_verify_fraction
_MIN_DISTANCE = 1.0 / 255  # non-classifiers: a sensitivity is never taken over a smaller input step
_FLIP = 2.0  # output_change of a classifier whose top-1 changed (anything > 1 disagrees)
# While no band is proven under the target, bands whose bound is under _RAMP_FACTOR x target may be
# reused on a budget: every answer earns ``target`` and a reuse spends its bound, so the expected
# disagreement over all answers stays under the target. Savings are capped at _BUDGET_ANSWERS answers'
# worth, so a long clean run cannot fund a burst of risky reuse later. (10x, tried for a faster
# warm-up, let the fer classifier's scene cuts overrun their bound: 4x it stays.)
_RAMP_FACTOR = 4.0
_POOL_SPAN = 8  # a band borrows evidence from at most this many bands at and above it (16x its score)
# A cell borrows only once it has verdicts of its own: where frames that fall in it were never seen,
# a run of calm verdicts above it says little (a hand-held classifier flips at scores below frames
# that kept their answer across a large shift).
_OWN_VERDICTS = 10  # this run's own: verdicts carried over from an earlier run do not count here
# A cell holding verdicts carried over from an earlier run uses them only once this run has confirmed
# them with this many verdicts of its own there (any disagreement voids them instead): the fewer, the
# likelier a scene that changed to answers flipping a few % of the time slips through unseen.
_CONFIRM_VERDICTS = 30
_FLOOR_VERDICTS = 30  # a cell's rate counts as a floor for the cells above it from this many verdicts
_BUDGET_ANSWERS = 200
# The context of a decision at score band b: how many of the last _RECENT verdicts disagreed at a
# band <= b + _CONTEXT_REACH, capped at _CONTEXTS - 1. A scene cut or an object crossing disagrees
# far above the stream's noise and leaves the calm frames' context alone; a flickering answer
# disagrees at the very scores it would be reused at.
_RECENT = 16
_CONTEXT_REACH = 4
_CONTEXTS = 3
# The distance envelope: reuse only within _ENVELOPE_FACTOR x the typical distance at which verdicts
# agree (a running mean over agreeing verdicts, weight _ENVELOPE_WEIGHT each). Frames farther away
# are still candidates up to near_threshold, so their verdicts can move it; a scene cut ten times
# farther than the stream's noise is computed even where a band's pooled evidence would allow it,
# and one cut whose answer happened to agree moves the envelope a little, not to the cut.
_ENVELOPE_FACTOR = 3.0
_ENVELOPE_WEIGHT = 0.05
_SENSITIVITY_WEIGHT = 0.2  # non-classifiers: weight of each computed pair in the running sensitivity
EVIDENCE_FORMAT = "edgefleet.cache-evidence/1"
EVIDENCE_MAX_BYTES = 64 * 1024
"""Largest evidence file read or written: 78 cells of four integers need about 2 KB."""
_EVIDENCE_KEYS = {"format", "model_sha256", "source", "layout", "verdicts", "cells"}
_MAX_COUNT = 10**9


class EvidenceError(ValueError):
    """Evidence from an earlier run that cannot be used here: unreadable, or for another model, camera or layout."""


class EvidenceMismatch(EvidenceError):
    """Readable evidence for another model (sha256) or camera: expected after an update, nothing wrong."""


CacheSpec = bool | CacheSettings | Mapping[str, Any] | None
"""How callers ask for a cache: off (None/False), the profile's (True), the profile's with some
settings overridden (a mapping of :class:`CacheSettings` keys), or complete settings."""


def resolve_cache(cache: CacheSpec, profile: Any) -> CacheSettings | None:
    """The cache settings to run with, or None for no cache: the one place a request meets the profile.

    Asking for a cache (True or a mapping) turns it on whatever the profile's ``enabled`` says:
    that default is the service's to apply; ``{"enabled": False}`` turns it off.

    Raises:
        ConfigError: unknown keys, or a value outside its bounds (named in the message).
    """
    if cache is None or cache is False:
        return None
    if isinstance(cache, CacheSettings):
        return cache if cache.enabled else None
    base: CacheSettings = profile.cache
    if cache is True:
        return base
    if not isinstance(cache, Mapping):
        raise ConfigError(f"cache: expected None, a bool, a mapping or CacheSettings, got {type(cache).__name__}")
    known = set(CacheSettings.model_fields)
    unknown = sorted(set(cache) - known)
    if unknown:
        raise ConfigError(f"cache: unknown keys {unknown}; expected some of {sorted(known)}")
    try:
        settings = CacheSettings.model_validate({**base.model_dump(), "enabled": True, **cache})
    except ValidationError as exc:
        raise ConfigError(format_validation_error("cache", exc)) from exc
    return settings if settings.enabled else None


class Lookup(NamedTuple):
    """What the cache said about one sample: ``kind`` is exact, near or miss.

    ``candidate`` is what reuse would have returned (the reference's outputs) when the sample was
    close enough to be judged, so computing it yields a verdict; ``band`` is its evidence cell
    (context x 26 + score band, see ``_Evidence``).
    """

    kind: str
    outputs: tuple[np.ndarray, ...] | None
    verify: bool
    key: int
    signature: np.ndarray | None
    candidate: tuple[np.ndarray, ...] | None = None
    band: int = -1
    distance: float = 0.0


# ---------------------------------------------------------------------------------- statistics
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


def _band(score: float) -> int:
    if score < _BAND_BASE:
        return 0
    if score >= _BAND_TOP:
        return _BANDS - 1
    return min(_BANDS - 1, 1 + int(math.log(score / _BAND_BASE) / _LOG_RATIO))


def _band_top(band: int) -> float:
    return _BAND_BASE * math.sqrt(2.0) ** band


class _Evidence:
    """Verdict counts per cell of (context, score band) and what each cell may do; pure bookkeeping, no clock.

    The *context* is how many of the last _RECENT verdicts disagreed (0, 1, or 2 and more): a
    scene whose answers flicker under noise shows it within a few verdicts, and from then on its
    frames are judged on the evidence of flickering spells, not on that of the calm scene that
    sat at the same scores before it (the reason a classifier's margin alone undercovered).
    Disagreement can only grow with the score and with the context, so a cell's rate is at most
    the pooled rate of any run of bands from it upwards (up to _POOL_SPAN bands long), pooled
    over any run of contexts from it upwards: its bound is the best one-sided upper bound over
    those runs. Under the target the cell is reused freely, under _RAMP_FACTOR x target on the
    budget. A cell whose own verdicts show it worse than the target blocks itself and every cell
    at a higher band or context.
    """

    def __init__(self, config: CacheSettings) -> None:
        self.target = config.target_disagreement
        self.ramp_target = min(1.0, self.target * _RAMP_FACTOR)
        self.confidence = config.confidence
        self.window = config.evidence_window
        self.floor = config.verify_fraction
        self.thin = max(config.max_verify_fraction, config.verify_fraction)
        cells = _CONTEXTS * _BANDS
        self.n = [0] * cells
        self.e = [0] * cells
        self.bad = [False] * cells
        self.upper = [1.0] * cells  # the best pooled upper bound of each cell
        self.best = [1.0] * cells  # what a reuse in the cell is charged: upper, or more (below), blocking aside
        # Read on the hot path, one index each: verification share, reuse cost (-1: none), budget?
        self.share = [self.thin] * cells
        self.cost = [-1.0] * cells
        self.on_budget = [False] * cells
        self.pooled = [(0, 0)] * cells  # verdicts and disagreements behind each cell's bound
        # Reuses served from each cell, and their risk: sum over cells of reuses x the cell's bound
        # *now*, so a reuse served on thin evidence is re-charged as its cell's evidence grows (less
        # once it stays clean, more once it disagrees). ``charged`` collects the changes for the budget.
        self.reused = [0] * cells
        self.risk = self.charged = 0.0
        self.changes = self.total_n = self.total_e = 0
        # Verdicts carried over from an earlier run of this model on this camera (``carry``), counted in
        # n / e until a disagreement of this run voids them (``_void_carried``); own = n - carried.
        self.carried_n = [0] * cells
        self.carried_e = [0] * cells
        self.voided = 0  # carried agreements voided so far

    def add(self, cell: int, agree: bool) -> None:
        """Count one verdict in ``cell`` and recompute what the cells it bounds may do."""
        self.total_n += 1
        self.total_e += 0 if agree else 1
        voided = not agree and self._void_carried(cell)
        self.n[cell] += 1
        self.e[cell] += 0 if agree else 1
        if self.n[cell] >= self.window:  # old evidence fades: a changed stream must show
            self.n[cell] //= 2
            self.e[cell] = (self.e[cell] + 1) // 2
            self.carried_n[cell] = self.carried_e[cell] = 0  # what was carried is mostly outweighed by now
        self._judge(cell)
        self._refresh(None if voided else cell)

    def _judge(self, cell: int) -> None:
        """Shown worse than the target on its own: P(X >= e | n, target) < 1 - confidence."""
        n, e = self.n[cell], self.e[cell]
        self.bad[cell] = e > 0 and 1.0 - _binomial_cdf(e - 1, n, self.target) < 1.0 - self.confidence

    # ------------------------------------------------------------ evidence carried over from an earlier run
    def carry_cap(self) -> int:
        """Most verdicts a cell takes from an earlier run: fewer than prove the target alone (299 at 1 %, 95 %)."""
        if self.target <= 0.0:
            return 0
        return max(0, min(self.window // 2, math.ceil(_poisson_upper(0, self.confidence) / self.target) - 1))

    def carry(self, cells: Iterable[tuple[int, int, int, int]]) -> int:
        """Take an earlier run's counts ``(context, band, verdicts, disagreements)``: halved, capped, marked carried.

        Halving makes each restart count for half of the one before (a camera's evidence fades
        over restarts as it fades within a run), and disagreements round up. The cap keeps any one
        cell from being proven on carried verdicts alone. Returns the verdicts carried.
        """
        if self.total_n or any(self.n):
            raise EvidenceError("the cache has verdicts of its own already: evidence is carried only into a new one")
        cap, total = self.carry_cap(), 0
        for ctx, band, n, e in cells:
            cell = ctx * _BANDS + band
            kept, events = n // 2, (e + 1) // 2
            if kept > cap:
                events, kept = math.ceil(events * cap / kept), cap
            events = min(events, kept)
            if kept <= 0:
                continue
            self.n[cell] = self.carried_n[cell] = kept
            self.e[cell] = self.carried_e[cell] = events
            total += kept
        for cell in range(len(self.n)):
            self._judge(cell)
        self._refresh(None)
        return total

    def _void_carried(self, cell: int) -> bool:
        """A verdict of this run disagreed in ``cell``: what was carried near and above its score goes, in every context.

        The earlier run's record there is contradicted: disagreement only grows with the score, and
        a disagreement within _CONTEXT_REACH bands is what moves a cell's context, so the frames that
        would be reused on its calm are the ones now disagreeing (a scene whose answers flicker
        disagrees in neighbouring cells and in stricter contexts first). Those cells go back to
        what a cold start would know, this run's own verdicts: carried calm must never dilute this
        run's disagreements, and the carried disagreements, about a stream that is not this one any
        more, would only keep shut cells that this run's own evidence may open. Reuses served on
        the voided evidence are re-charged at the bounds left (``risk``).
        """
        lowest = max(0, cell % _BANDS - _CONTEXT_REACH)
        voided, changed = 0, False
        for ctx in range(_CONTEXTS):
            for band in range(lowest, _BANDS):
                c = ctx * _BANDS + band
                if self.carried_n[c]:
                    changed = True
                    voided += self.carried_n[c] - self.carried_e[c]
                    self.n[c] -= self.carried_n[c]
                    self.e[c] -= self.carried_e[c]
                    self.carried_n[c] = self.carried_e[c] = 0
                    self._judge(c)
        self.voided += voided
        return changed

    def export_cells(self) -> list[list[int]]:
        """``[context, band, verdicts, disagreements]`` of every cell with verdicts (carried ones included)."""
        return [[c // _BANDS, c % _BANDS, self.n[c], self.e[c]] for c in range(len(self.n)) if self.n[c]]

    def _refresh(self, changed: int | None) -> None:
        """Re-bound the cells whose runs pass through ``changed`` (None: every cell), then apply blocking to all."""
        before = self.free_limit()
        ctx0, band0 = divmod(changed, _BANDS) if changed is not None else (_CONTEXTS - 1, _BANDS - 2)
        lowest = max(0, band0 - _POOL_SPAN + 1) if changed is not None else 0
        counts, events, carried, confidence, upper = self.n, self.e, self.carried_n, self.confidence, _poisson_upper
        for ctx in range(ctx0 + 1):
            for band in range(lowest, min(band0 + 1, _BANDS - 1)):
                best, behind, behind_own = 1.0, (0, 0), 0
                run_n = [0] * _CONTEXTS  # per last context of the run: verdicts, disagreements, carried so far
                run_e = [0] * _CONTEXTS
                run_c = [0] * _CONTEXTS
                for top in range(band, min(band + _POOL_SPAN, _BANDS - 1)):
                    n = e = c = 0
                    for last in range(ctx, _CONTEXTS):
                        n += counts[last * _BANDS + top]
                        e += events[last * _BANDS + top]
                        c += carried[last * _BANDS + top]
                        if n:  # else the run has the counts, and the bound, of the shorter one
                            run_n[last] += n
                            run_e[last] += e
                            run_c[last] += c
                            bound = min(1.0, upper(run_e[last], confidence) / run_n[last])
                            if bound < best:
                                best, behind = bound, (run_n[last], run_e[last])
                                behind_own = run_n[last] - run_c[last]
                cell = ctx * _BANDS + band
                self.upper[cell], self.pooled[cell] = best, behind
                # Verified as often as this run's own evidence behind its bound is thin: carried verdicts
                # do not lower it, so a stream that changed since shows as soon as it would from cold.
                seen = max(self.n[cell] - self.carried_n[cell], behind_own)
                self.share[cell] = min(self.thin, max(self.floor, self.thin * _THIN_VERDICTS / (seen + _THIN_VERDICTS)))
        blocked_from = _BANDS - 1  # the last band is open-ended and never reused
        # Disagreement only grows with band and context: a well-evidenced cell below that disagrees
        # more than a cell's own bound contradicts that bound, and the larger rate is charged.
        seen_rate = [0.0] * _BANDS  # per band: the highest such rate in the contexts so far
        for ctx in range(_CONTEXTS):
            below = 0.0
            for band in range(_BANDS):
                cell = ctx * _BANDS + band
                if self.bad[cell]:
                    blocked_from = min(blocked_from, band)
                best = max(self.upper[cell], below, seen_rate[band])
                if self.reused[cell] and best != self.best[cell]:
                    delta = self.reused[cell] * (best - self.best[cell])
                    self.risk += delta
                    self.charged += delta
                self.best[cell] = best
                if counts[cell] >= _FLOOR_VERDICTS:
                    seen_rate[band] = max(seen_rate[band], events[cell] / counts[cell])
                below = max(below, seen_rate[band])
                own = self.n[cell] - self.carried_n[cell]
                needed = _CONFIRM_VERDICTS if self.carried_n[cell] else _OWN_VERDICTS
                usable = band < blocked_from and best < self.ramp_target and own >= needed
                self.cost[cell] = best if usable else -1.0
                self.on_budget[cell] = usable and best >= self.target
        if self.free_limit() != before:
            self.changes += 1

    def free_limit(self) -> float:
        """The top of the highest band reused freely in any context (0: none yet)."""
        free = [c % _BANDS for c in range(len(self.cost)) if self.cost[c] >= 0 and not self.on_budget[c]]
        return _band_top(max(free)) if free else 0.0

    def widest(self) -> tuple[int, int, float] | None:
        """Verdicts, disagreements and bound behind the highest band in use (calmest context first), if any."""
        used = [c for c in range(len(self.cost)) if self.cost[c] >= 0]
        if not used:
            return None
        cell = max(used, key=lambda c: (c % _BANDS, -c))
        n, e = self.pooled[cell]
        return n, e, self.cost[cell]

    def bands(self) -> list[dict[str, Any]]:
        return [{"context": c // _BANDS, "band": c % _BANDS,
                 "score_below": round(_band_top(c % _BANDS), 5) if c % _BANDS < _BANDS - 1 else None,
                 "verdicts": self.n[c], "disagreements": self.e[c], "verify_share": round(self.share[c], 3),
                 "reuse": ("no" if self.cost[c] < 0 else "budget" if self.on_budget[c] else "free"),
                 "bound": round(self.cost[c], 4) if self.cost[c] >= 0 else None}
                for c in range(len(self.n)) if self.n[c]]


# ---------------------------------------------------------------------------------- signatures
def _strides(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Index that subsamples a batch-1 tensor to at most ~_SIGNATURE_CELLS per axis."""
    index: list[slice] = [slice(0, 1)]
    body = shape[1:]
    for axis, size in enumerate(body):
        last_and_small = axis == len(body) - 1 and size <= 4  # channels: keep them all
        step = 1 if last_and_small else max(1, size // _SIGNATURE_CELLS)
        index.append(slice(step // 2, None, step))
    return tuple(index)


@lru_cache(maxsize=64)
def _signature_index(shape: tuple[int, ...]) -> np.ndarray:
    """Flat positions of the strided subsample of a ``shape`` tensor, in C order, computed once.

    Why: one gather (``take``) of 3072 bytes costs a fifth of slicing the 4-d view and copying it
    (numpy walks a 3-byte inner loop a thousand times for the latter).
    """
    size = int(np.prod(shape))
    index = np.arange(size, dtype=np.intp).reshape(shape)[_strides(shape)].ravel()
    index.setflags(write=False)
    return index


def _signature_part(arr: np.ndarray, index: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """One input's signature: the samples at ``index``, mapped to 0..255 over ``lo..hi``, as uint8.

    One new array per call (it may become the reference) and no other temporary: the float
    path scales that array in place.
    """
    sub = arr.reshape(-1).take(index)
    if sub.dtype == np.uint8:
        return sub
    if sub.dtype == np.int8:  # v + 128 is v's two's-complement byte with the sign bit flipped
        flipped = sub.view(np.uint8)
        np.bitwise_xor(flipped, 0x80, out=flipped)
        return flipped
    if sub.dtype != np.float32:
        sub = sub.astype(np.float32)
    np.subtract(sub, lo, out=sub)
    np.multiply(sub, 255.0 / max(hi - lo, 1e-12), out=sub)
    np.rint(sub, out=sub)
    np.clip(sub, 0, 255, out=sub)
    return sub.astype(np.uint8)


def input_signature(sample: Sequence[np.ndarray], infos: Sequence[TensorInfo],
                    ranges: Sequence[tuple[float, float]]) -> np.ndarray:
    """Strided subsample of every input, mapped to 0..255 over its value range, as uint8."""
    parts = [_signature_part(arr, _signature_index(info.shape), lo, hi)
             for arr, info, (lo, hi) in zip(sample, infos, ranges)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _distance(signature: np.ndarray, reference: np.ndarray, scratch: np.ndarray) -> float:
    """Mean absolute difference of a uint8 signature and an int16 one, as a fraction of 0..255.

    ``scratch`` (int16, the signatures' size) takes the difference, so nothing is allocated:
    three ufunc passes over 3 KB instead of two casts, a subtraction, an abs and a mean.
    """
    np.subtract(signature, reference, out=scratch)
    np.abs(scratch, out=scratch)
    return int(np.add.reduce(scratch, dtype=np.int32)) / scratch.size / 255.0


def signature_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two signatures, as a fraction of the full range (0..1)."""
    return _distance(a, b.astype(np.int16), np.empty(a.size, np.int16))


class OutputJudge(NamedTuple):
    """How one output is judged when a reuse is compared with a fresh result (docs/cache.md, "Output roles").

    ``role``: ``logits`` (top-1), ``regression`` (within tolerance x range, the default),
    ``scores`` (after ``activation``, only where either result has a score >= ``threshold``),
    ``boxes`` / ``landmarks`` (per-anchor values, only at the anchors output ``scores`` detects).
    """

    role: str = "regression"
    activation: str = "none"
    threshold: float = 0.5
    scores: int = -1


def output_judges(resolved: Mapping[int, tuple[Any, int]], outputs: int) -> tuple[OutputJudge, ...]:
    """One judge per output from :func:`edgefleet.manifest.resolve_output_roles`; undeclared: regression."""
    judges = [OutputJudge()] * outputs
    for i, (role, link) in resolved.items():
        judges[i] = OutputJudge(role.role, role.activation or "none",
                                role.score_threshold if role.role == "scores" else 0.5, link)
    return tuple(judges)


def _activate(arr: np.ndarray, judge: OutputJudge) -> np.ndarray:
    if judge.activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-np.clip(arr, -80.0, 80.0)))
    if judge.activation == "softmax":
        shifted = np.exp(arr - arr.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    return arr


def _anchor_rows(arr: np.ndarray) -> np.ndarray:
    """Per-anchor values ``[anchors, values]`` of a boxes/landmarks output ``[1, ..., anchors, values]``."""
    return arr.reshape(-1, arr.shape[-1] if arr.ndim >= 2 else 1)


def _anchor_mask(detected: np.ndarray, anchors: int) -> np.ndarray:
    """Which anchors have a detection, from a scores output's element mask (any class counts)."""
    return detected.reshape(anchors, -1).any(axis=1)


def _roles_change(reused: Sequence[np.ndarray], fresh: Sequence[np.ndarray], judges: Sequence[OutputJudge],
                  tolerances: Sequence[float]) -> float:
    worst = 0.0
    detected: dict[int, np.ndarray] = {}  # scores output -> element mask: a detection in either result
    for k, judge in enumerate(judges):
        if judge.role == "scores":
            old, new = _activate(reused[k], judge), _activate(fresh[k], judge)
            either = (old >= judge.threshold) | (new >= judge.threshold)
            detected[k] = either
            if either.any():
                diff = float(np.abs(old - new)[either].max())
                worst = max(worst, _in_tolerances(diff, tolerances[k]))
    for k, judge in enumerate(judges):
        if judge.role == "logits":
            if not np.array_equal(top1(reused[k]), top1(fresh[k])):
                return _FLIP
        elif judge.role in ("boxes", "landmarks"):
            old, new = _anchor_rows(reused[k]), _anchor_rows(fresh[k])
            mask = _anchor_mask(detected[judge.scores], old.shape[0])
            if mask.any():
                worst = max(worst, _in_tolerances(float(np.abs(old[mask] - new[mask]).max()), tolerances[k]))
        elif judge.role == "regression":
            worst = max(worst, _in_tolerances(float(np.abs(reused[k] - fresh[k]).max(initial=0.0)), tolerances[k]))
    return worst


def _in_tolerances(diff: float, tol: float) -> float:
    return diff / tol if tol > 0 else (_INF if diff > 0 else 0.0)


def output_change(reused: Sequence[np.ndarray], fresh: Sequence[np.ndarray], *, classifier: bool,
                  tolerances: Sequence[float], judges: Sequence[OutputJudge] | None = None) -> float:
    """How far reusing ``reused`` would be from ``fresh``, in tolerances: <= 1 agrees.

    With ``judges`` (the manifest's ``output_roles``), each output is judged by its role: logits
    on their top-1, detection scores after their activation where some result detects, boxes and
    landmarks only at detected anchors, regression outputs everywhere. Without: classifiers give
    0 when every output keeps its top-1, else 2; other models the largest absolute difference of
    any output divided by that output's tolerance. ``tolerances``: one per output, in the
    outputs' own units (see :func:`output_tolerances`). Arrays are float.
    """
    if judges is not None:
        return _roles_change(reused, fresh, judges, tolerances)
    worst = 0.0
    for old, new, tol in zip(reused, fresh, tolerances):
        if classifier:
            if not np.array_equal(top1(old), top1(new)):
                return _FLIP
            continue
        worst = max(worst, _in_tolerances(float(np.abs(old - new).max(initial=0.0)), tol))
    return worst


def output_ranges(fresh: Sequence[np.ndarray], judges: Sequence[OutputJudge] | None) -> list[tuple[float, float]]:
    """The value range each output of one result spans, as its tolerance measures it.

    Activated scores span 0..1; boxes and landmarks count only at the anchors this result
    detects (none: an empty range, ``(inf, -inf)``); anything else its whole array.
    """
    ranges = []
    for k, arr in enumerate(fresh):
        judge = judges[k] if judges is not None else None
        if arr.size == 0:
            ranges.append((_INF, -_INF))
        elif judge is not None and judge.role == "scores" and judge.activation != "none":
            ranges.append((0.0, 1.0))
        elif judge is not None and judge.role in ("boxes", "landmarks"):
            rows = _anchor_rows(arr)
            scores = _activate(fresh[judge.scores], judges[judge.scores])  # type: ignore[index]
            chosen = rows[_anchor_mask(scores >= judges[judge.scores].threshold, rows.shape[0])]  # type: ignore[index]
            ranges.append((float(chosen.min()), float(chosen.max())) if chosen.size else (_INF, -_INF))
        else:
            ranges.append((float(arr.min()), float(arr.max())))
    return ranges


def output_tolerances(results: Iterable[Sequence[np.ndarray]], judges: Sequence[OutputJudge] | None,
                      output_tolerance: float) -> list[float]:
    """Each output's tolerance over ``results``: ``output_tolerance`` x the range its values took there."""
    lo: list[float] = []
    hi: list[float] = []
    for fresh in results:
        for k, (a, b) in enumerate(output_ranges(fresh, judges)):
            if k == len(lo):
                lo.append(_INF)
                hi.append(-_INF)
            lo[k], hi[k] = min(lo[k], a), max(hi[k], b)
    return _scaled(lo, hi, output_tolerance)


def _scaled(lo: Sequence[float], hi: Sequence[float], tol: float) -> list[float]:
    return [tol * max(b - a, 1e-6) if b >= a else tol * 1e-6 for a, b in zip(lo, hi)]


def _margin(outputs: Sequence[np.ndarray]) -> float:
    """Top-1 minus top-2 score of each output, the smallest one (0 = a tie: never reuse)."""
    margin = _INF
    for arr in outputs:
        flat = arr.reshape(-1)
        if flat.size >= 2:
            top2 = np.partition(flat, flat.size - 2)[-2:]
            margin = min(margin, float(top2[1] - top2[0]))
    return margin


# ---------------------------------------------------------------------------------- carried evidence
def _count(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_COUNT:
        raise EvidenceError(f"{what}: expected an integer 0..{_MAX_COUNT}, got {value!r:.40}")
    return value


def parse_evidence(raw: bytes) -> dict[str, Any]:
    """Read an evidence file written by :meth:`InferenceCache.export_evidence`, checking every field.

    Why strict: the file sits on a device's disk across restarts and power cuts; whatever is in
    it (truncated, edited, from another version) must be refused here, whole, with a reason,
    never half-used. Which model, camera and layout it is for is checked by ``import_evidence``.

    Raises:
        EvidenceError: too large, not JSON, or any field missing, unknown or out of range.
    """
    if len(raw) > EVIDENCE_MAX_BYTES:
        raise EvidenceError(f"{len(raw)} bytes, more than the {EVIDENCE_MAX_BYTES} an evidence file may hold")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise EvidenceError(f"not JSON: {str(exc)[:80]}") from None
    if not isinstance(data, dict) or set(data) != _EVIDENCE_KEYS:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise EvidenceError(f"expected the keys {sorted(_EVIDENCE_KEYS)}, got {keys!s:.120}")
    if data["format"] != EVIDENCE_FORMAT:
        raise EvidenceError(f"format {data['format']!r:.40}, expected {EVIDENCE_FORMAT!r}")
    sha = data["model_sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
        raise EvidenceError("model_sha256: expected 64 lowercase hex digits")
    if not isinstance(data["source"], str) or not 0 < len(data["source"]) <= 256:
        raise EvidenceError("source: expected a string of 1..256 characters")
    if not isinstance(data["layout"], dict):
        raise EvidenceError("layout: expected a mapping")
    _count(data["verdicts"], "verdicts")
    cells = data["cells"]
    if not isinstance(cells, list) or len(cells) > _CONTEXTS * _BANDS:
        raise EvidenceError(f"cells: expected a list of at most {_CONTEXTS * _BANDS}")
    seen = set()
    for i, cell in enumerate(cells):
        if not isinstance(cell, list) or len(cell) != 4:
            raise EvidenceError(f"cells[{i}]: expected [context, band, verdicts, disagreements]")
        ctx, band, n, e = (_count(v, f"cells[{i}]") for v in cell)
        if ctx >= _CONTEXTS or band >= _BANDS or e > n or (ctx, band) in seen:
            raise EvidenceError(f"cells[{i}]: {cell} is outside the layout, repeated, or has more "
                                "disagreements than verdicts")
        seen.add((ctx, band))
    return data


# ---------------------------------------------------------------------------------- the cache
class InferenceCache:
    """Exact + near-duplicate cache for one model, reusing only where its evidence allows. Thread-safe."""

    def __init__(self, config: CacheSettings, model_sha256: str, inputs: Sequence[TensorInfo],
                 outputs: Sequence[TensorInfo], *, classifier: bool,
                 input_ranges: Sequence[tuple[float, float]] | None = None,
                 judges: Sequence[OutputJudge] | None = None) -> None:
        self.config = config
        self._sha256 = model_sha256
        self._seed = int(model_sha256[:16], 16)
        self._inputs = tuple(inputs)
        self._outputs = tuple(outputs)
        if judges is not None and len(judges) != len(self._outputs):
            raise ValueError(f"expected one judge per output ({len(self._outputs)}), got {len(judges)}")
        self._judges = tuple(judges) if judges is not None else None
        for judge in self._judges or ():
            if judge.role in ("boxes", "landmarks") and not (
                    0 <= judge.scores < len(self._judges) and self._judges[judge.scores].role == "scores"):  # type: ignore[index]
                raise ValueError(f"a {judge.role} judge must name a scores output, got index {judge.scores}")
        # A model whose every output is logits keeps the top-1 margin; any other role, the sensitivity.
        self._classifier = classifier if self._judges is None else all(j.role == "logits" for j in self._judges)
        self._ranges: list[tuple[float, float] | None] = (
            list(input_ranges) if input_ranges is not None else [None] * len(self._inputs))
        self._out_lo = [_INF] * len(self._outputs)  # running value range of each output
        self._out_hi = [-_INF] * len(self._outputs)
        self._lock = threading.Lock()
        self._rng = random.Random(config.seed)
        self._entries: OrderedDict[int, tuple[tuple[np.ndarray, ...], int]] = OrderedDict()
        self._bytes = 0
        self._evidence = _Evidence(config)
        self.exact_hits = self.near_hits = self.misses = 0
        self.verified = self.disagreements = self.evictions = 0
        self._lookup_s = 0.0
        self._lookups = 0
        # The settings the hot path reads, as plain attributes (a pydantic read costs more).
        self._max_bytes, self._near, self._target = config.max_bytes, config.near, config.target_disagreement
        self._max_age_s, self._near_threshold = config.max_age_s, config.near_threshold
        self._max_consecutive = config.max_consecutive
        self._sig_index = [_signature_index(info.shape) for info in self._inputs]
        self._scratch = np.empty(sum(i.size for i in self._sig_index), np.int16)  # used under the lock
        self._budget = 0.0  # expected disagreements the answers so far can still absorb
        self._budget_cap = config.target_disagreement * _BUDGET_ANSWERS
        # (signature, the same as int16, outputs, computed at, 1 / margin): the last input actually computed
        self._reference: tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...], float, float] | None = None
        self._consecutive = 0
        self._recent = [-1] * _RECENT  # score band of each of the last _RECENT verdicts that disagreed, else -1
        self._recent_at = 0
        self._context = [0] * _BANDS  # per score band: first cell of its context (context x _BANDS)
        self._sensitivity = 0.0  # non-classifiers: running mean of change / distance (0: none yet)
        self._envelope = 0.0  # typical distance of agreeing verdicts (running mean; 0: none yet)
        self._reuse_ceiling = 0.0  # min(near_threshold, _ENVELOPE_FACTOR x envelope)

    # ------------------------------------------------------------------ hot path
    def key(self, sample: Sequence[np.ndarray]) -> int:
        if len(sample) == 1:
            return xxhash.xxh3_64_intdigest(_contiguous(sample[0]), seed=self._seed)
        hasher = xxhash.xxh3_64(seed=self._seed)
        for arr in sample:
            hasher.update(_contiguous(arr))
        return hasher.intdigest()

    def _signature(self, sample: Sequence[np.ndarray]) -> np.ndarray:
        ranges = self._ranges  # filled once; two threads racing here compute the same range
        parts = []
        for i, arr in enumerate(sample):
            span = ranges[i]
            if span is None:
                span = ranges[i] = _value_range(arr, self._inputs[i])
            parts.append(_signature_part(arr, self._sig_index[i], span[0], span[1]))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def lookup(self, sample: Sequence[np.ndarray]) -> Lookup:
        """Decide for one sample (arrays in model dtype): exact hit, near hit (maybe to verify) or miss.

        Hashing and the signature are computed outside the lock; under it, the distance to the
        reference (into a scratch buffer the lock protects) and a few comparisons against figures
        prepared when results were recorded.
        """
        start = time.perf_counter()
        key = 0
        if self._max_bytes:
            key = self.key(sample)
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.exact_hits += 1
                    self._budget = min(self._budget + self._target, self._budget_cap)
                    self._lookup_s += time.perf_counter() - start
                    self._lookups += 1
                    return Lookup("exact", entry[0], False, key, None)
        signature = self._signature(sample) if self._near else None
        with self._lock:
            self._budget = min(self._budget + self._target, self._budget_cap)
            ref = self._reference
            found = None
            if signature is not None and ref is not None and start - ref[3] <= self._max_age_s:
                distance = _distance(signature, ref[1], self._scratch)
                if distance <= self._near_threshold:
                    score = distance * ref[4] if ref[4] < _INF else _INF
                    band = _band(score)
                    band += self._context[band]
                    ev = self._evidence
                    cost = ev.cost[band]
                    if ev.on_budget[band] and self._budget < cost:
                        cost = -1.0
                    if cost >= 0.0 and self._consecutive < self._max_consecutive and distance <= self._reuse_ceiling:
                        self._consecutive += 1
                        verify = self._rng.random() < ev.share[band]
                        if not verify:
                            self.near_hits += 1
                            self._budget -= cost
                            ev.reused[band] += 1
                            ev.risk += cost
                        found = Lookup("near", ref[2], verify, key, signature, ref[2], band, distance)
                    else:
                        self.misses += 1
                        found = Lookup("miss", None, False, key, signature, ref[2], band, distance)
            if found is None:
                self.misses += 1
                found = Lookup("miss", None, False, key, signature)
            self._lookup_s += time.perf_counter() - start
            self._lookups += 1
            return found

    def record(self, lookup: Lookup, outputs: tuple[np.ndarray, ...]) -> None:
        """Store outputs just computed for ``lookup``'s sample; count the verdict if it had a candidate.

        The arrays are made read-only and kept as they are: the engine copies on the way out.
        The verdict and the new reference's margin are worked out before taking the lock.
        """
        now = time.perf_counter()
        for arr in outputs:
            arr.setflags(write=False)
        fresh = self._floats(outputs)
        if not self._classifier or self._judges is not None:
            self._widen_ranges(fresh)
        change = None
        if lookup.candidate is not None:
            change = output_change(self._floats(lookup.candidate), fresh, classifier=self._classifier,
                                   tolerances=self._tolerances(), judges=self._judges)
        # A score is never below the distance itself (margin at most the whole input range): a
        # reference whose outputs did not move at all, or a classifier's raw-logit margin of 8, must
        # not make a frame 0.2 away look as safe as one 0.01 away.
        if self._classifier:
            margin = _margin(fresh)
            inv_margin = max(1.0, 1.0 / margin) if margin > 0 else _INF
        elif change is not None:  # the outputs moved by `change` tolerances over `distance`
            inv_margin = max(1.0, change / max(lookup.distance, _MIN_DISTANCE)) if change < _INF else _INF
        else:
            inv_margin = _INF  # nothing seen yet about how fast these outputs move
        wide = lookup.signature.astype(np.int16) if lookup.signature is not None else None
        with self._lock:
            if change is not None:
                agree = change <= 1.0
                if lookup.verify:
                    self.verified += 1
                    self.disagreements += 0 if agree else 1
                ev = self._evidence
                ev.add(lookup.band, agree)
                if ev.charged:
                    # Past reuses re-charged (or refunded) at their cells' new bounds. A refund restores
                    # savings up to the cap; a re-charge takes the budget down to zero at most, so one
                    # disagreement in a cell with a long history pauses budgeted reuse rather than
                    # stopping it for hundreds of frames. The reported bound keeps the whole re-charge.
                    self._budget = min(max(self._budget - ev.charged, min(self._budget, 0.0)), self._budget_cap)
                    ev.charged = 0.0
                self._note_recent(lookup.band % _BANDS, agree)
                if agree:
                    self._envelope = (lookup.distance if self._envelope == 0.0 else
                                      self._envelope + _ENVELOPE_WEIGHT * (lookup.distance - self._envelope))
                self._reuse_ceiling = min(self.config.near_threshold, _ENVELOPE_FACTOR * self._envelope)
            if self.config.max_bytes:
                self._store(lookup.key, outputs)
            if not self._classifier and change is not None and inv_margin < _INF:
                # One pair's sensitivity is noisy (outputs swing by a fraction of a tolerance under
                # sensor noise): a running mean ranks frames by their distance, as they should be.
                self._sensitivity = (inv_margin if self._sensitivity == 0.0 else
                                     self._sensitivity + _SENSITIVITY_WEIGHT * (inv_margin - self._sensitivity))
                inv_margin = self._sensitivity
            if lookup.signature is not None and wide is not None:
                self._reference = (lookup.signature, wide, outputs, now, inv_margin)
                self._consecutive = 0

    # ------------------------------------------------------------------ internals
    def _note_recent(self, band: int, agree: bool) -> None:
        """Remember one verdict and recompute every band's context (under the lock, at record time)."""
        self._recent[self._recent_at] = -1 if agree else band
        self._recent_at = (self._recent_at + 1) % _RECENT
        below = [0] * _BANDS  # recent disagreements at each band
        for b in self._recent:
            if b >= 0:
                below[b] += 1
        seen = sum(below[:_CONTEXT_REACH])
        for b in range(_BANDS):
            if b + _CONTEXT_REACH < _BANDS:
                seen += below[b + _CONTEXT_REACH]
            self._context[b] = min(seen, _CONTEXTS - 1) * _BANDS

    def _floats(self, outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [dequantize(a, info) if info.quantized else a for a, info in zip(outputs, self._outputs)]

    def _widen_ranges(self, fresh: Sequence[np.ndarray]) -> None:
        # Two threads recording at once may each miss the other's widening: a narrower range
        # only makes the tolerance stricter, never looser.
        for i, (lo, hi) in enumerate(output_ranges(fresh, self._judges)):
            self._out_lo[i] = min(self._out_lo[i], lo)
            self._out_hi[i] = max(self._out_hi[i], hi)

    def _tolerances(self) -> list[float]:
        """Each output's tolerance: ``output_tolerance`` x the range its values have taken so far."""
        return _scaled(self._out_lo, self._out_hi, self.config.output_tolerance)

    def _store(self, key: int, outputs: tuple[np.ndarray, ...]) -> None:
        size = sum(a.nbytes for a in outputs) + _ENTRY_OVERHEAD
        if size > self.config.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._entries[key] = (outputs, size)
        self._bytes += size
        while self._bytes > self.config.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted
            self.evictions += 1

    # ------------------------------------------------------------------ evidence across restarts
    def _layout(self) -> dict[str, Any]:
        """What a cell of evidence means here: its bands, contexts, signature and judgement (not the ranges)."""
        judged = self._judged_by()
        return {"bands": _BANDS, "band_base": _BAND_BASE, "contexts": _CONTEXTS, "context_reach": _CONTEXT_REACH,
                "recent": _RECENT, "signature_cells": _SIGNATURE_CELLS, "judged_by": judged,
                "judges": [list(j) for j in self._judges] if self._judges is not None else None,
                "output_tolerance": None if judged == "top-1" else self.config.output_tolerance}

    def export_evidence(self, source: str) -> bytes:
        """This cache's verdict counts per cell, for the next run of this model on camera ``source`` (JSON).

        Only counts: no outputs, no reference, no exact entries (those are this run's).
        """
        with self._lock:
            cells = self._evidence.export_cells()
            own = self._evidence.total_n
            ranges = [list(r) if r is not None else None for r in self._ranges]
        data = {"format": EVIDENCE_FORMAT, "model_sha256": self._sha256, "source": source, "verdicts": own,
                "layout": {**self._layout(), "input_ranges": ranges}, "cells": cells}
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def import_evidence(self, raw: bytes, source: str) -> int:
        """Carry an earlier run's evidence into this new cache (see ``_Evidence.carry``); the verdicts carried.

        Raises:
            EvidenceError: unreadable (:func:`parse_evidence`), for another model (sha256) or camera,
                counted in another layout or judgement, or this cache has verdicts of its own already.
        """
        data = parse_evidence(raw)
        if data["model_sha256"] != self._sha256:
            raise EvidenceMismatch(f"for model {data['model_sha256'][:12]}..., this one is {self._sha256[:12]}...")
        if data["source"] != source:
            raise EvidenceMismatch(f"for camera {data['source']!r:.60}, this one is {source!r:.60}")
        layout = dict(data["layout"])
        ranges = layout.pop("input_ranges", None)
        if layout != json.loads(json.dumps(self._layout())):
            raise EvidenceError("counted with other bands, signature or judgement settings")
        if not isinstance(ranges, list) or len(ranges) != len(self._inputs):
            raise EvidenceError("layout.input_ranges: expected one entry per input")
        adopted = list(self._ranges)
        for i, (theirs, ours) in enumerate(zip(ranges, self._ranges)):
            if theirs is None:
                continue
            if (not isinstance(theirs, list) or len(theirs) != 2 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in theirs)
                    or not theirs[0] < theirs[1]):
                raise EvidenceError(f"layout.input_ranges[{i}]: expected [low, high]")
            if ours is None:  # guessed from the first frame there: distances keep the same scale here
                adopted[i] = (float(theirs[0]), float(theirs[1]))
            elif (float(theirs[0]), float(theirs[1])) != (float(ours[0]), float(ours[1])):
                raise EvidenceError(f"input {i} was scaled over {theirs}, here over {list(ours)}")
        with self._lock:
            carried = self._evidence.carry((c[0], c[1], c[2], c[3]) for c in data["cells"])
            self._ranges[:] = adopted
            return carried

    # ------------------------------------------------------------------ status
    @property
    def verdicts(self) -> int:
        """Verdicts of this run (carried ones not counted)."""
        return self._evidence.total_n

    def _judged_by(self) -> str:
        return (("roles: " + ", ".join(j.role for j in self._judges)) if self._judges is not None
                else "top-1" if self._classifier else "tolerance per output")

    def clear(self) -> None:
        """Drop every entry and the near-duplicate reference (counters and evidence stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._reference = None
            self._consecutive = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            ev = self._evidence
            samples = self.exact_hits + self.near_hits + self.misses + self.verified
            saved = self.exact_hits + self.near_hits
            widest = ev.widest()
            # Each reuse disagreed with probability at most its cell's bound: their sum is the expected
            # count, and its Poisson quantile bounds the count that really happened, at `confidence`.
            # (Never below the expected count itself.)
            worst = min(max(float(poisson_quantile(ev.risk, ev.confidence)), ev.risk), self.near_hits)
            region_n, region_e = (widest[0], widest[1]) if widest else (0, 0)
            return {
                "enabled": True,
                "exact_hits": self.exact_hits,
                "near_hits": self.near_hits,
                "misses": self.misses,
                "verified_hits": self.verified,
                "disagreements": self.disagreements,
                "disagreement": round(self.disagreements / self.verified, 4) if self.verified else None,
                "disagreement_rate": round(region_e / region_n, 4) if region_n else 0.0,
                "disagreement_upper": _round_up(worst / self.near_hits) if self.near_hits else None,
                "expected_disagreements": round(ev.risk, 3),
                "verifications": region_n,
                "answer_disagreement_upper": _round_up(worst / samples) if samples else None,
                "bound_in_force": round(widest[2], 4) if widest else None,
                "confidence": ev.confidence,
                "verdicts": ev.total_n,
                "verdict_disagreements": ev.total_e,
                "score_limit": round(ev.free_limit(), 6),
                "threshold": self.config.near_threshold,
                "reuse_ceiling": round(self._reuse_ceiling, 5),
                "judged_by": self._judged_by(),
                "carried_verdicts": sum(ev.carried_n),
                "carried_voided": ev.voided,
                "threshold_changes": ev.changes,
                "bands": ev.bands(),
                "hit_rate": round(saved / samples, 4) if samples else 0.0,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.config.max_bytes,
                "evictions": self.evictions,
                "lookup_us": round(self._lookup_s / self._lookups * 1e6, 2) if self._lookups else None,
                "config": self.config.model_dump(exclude={"enabled"}),
            }


def _round_up(bound: float, digits: int = 4) -> float:
    """A reported upper bound, rounded up: rounded to nearest, 8/600 read 0.0133, under 8/600 itself."""
    scale = 10**digits
    return math.ceil(bound * scale - 1e-9) / scale


def _contiguous(arr: np.ndarray) -> Any:
    return arr.data if arr.flags.c_contiguous else np.ascontiguousarray(arr).data


def _value_range(arr: np.ndarray, info: TensorInfo) -> tuple[float, float]:
    """The range a signature is scaled over: the dtype's for integers, else the first sample's."""
    if arr.dtype.kind in "iu":
        limits = np.iinfo(arr.dtype)
        return float(limits.min), float(limits.max)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    if lo >= -1.0 and hi <= 1.0:
        return -1.0, 1.0
    if lo >= 0.0 and hi <= 255.0:
        return 0.0, 255.0
    return lo, hi if hi > lo else lo + 1.0

