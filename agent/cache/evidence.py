"""The cache's evidence: verdict counts per cell of (context, score band), the bound each cell may be
reused under, and the file that carries them across restarts of one model on one camera.
Pure bookkeeping, no clock, no I/O (the caller reads and writes the file)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from agent.cache.bounds import _binomial_cdf, _poisson_upper
from edgefleet.profiles import CacheSettings

__all__ = ["EVIDENCE_FORMAT", "EVIDENCE_MAX_BYTES", "EvidenceError", "EvidenceMismatch", "parse_evidence"]

# Bands of score (distance / margin): band 0 is [0, _BAND_BASE), band b >= 1 is
# [_BAND_BASE * r**(b-1), _BAND_BASE * r**b) with r = sqrt(2); the last band is open and never reused.
_BANDS = 26
_BAND_BASE = 2e-3
_LOG_RATIO = math.log(math.sqrt(2.0))
_BAND_TOP = _BAND_BASE * math.sqrt(2.0) ** (_BANDS - 1)
_THIN_VERDICTS = 30  # a band with this many verdicts is verified at about half of max_verify_fraction
# While no band is proven under the target, bands whose bound is under _RAMP_FACTOR x target may be
# reused on a budget: every answer earns ``target`` and a reuse spends its bound, so the expected
# disagreement over all answers stays under the target (the budget itself lives in the cache). (10x,
# tried for a faster warm-up, let the fer classifier's scene cuts overrun their bound: 4x it stays.)
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
# The context of a decision at score band b: how many of the last _RECENT verdicts disagreed at a
# band <= b + _CONTEXT_REACH, capped at _CONTEXTS - 1. A scene cut or an object crossing disagrees
# far above the stream's noise and leaves the calm frames' context alone; a flickering answer
# disagrees at the very scores it would be reused at.
_RECENT = 16
_CONTEXT_REACH = 4
_CONTEXTS = 3
EVIDENCE_FORMAT = "edgefleet.cache-evidence/1"
EVIDENCE_MAX_BYTES = 64 * 1024
"""Largest evidence file read or written: 78 cells of four integers need about 2 KB."""
_EVIDENCE_KEYS = {"format", "model_sha256", "source", "layout", "verdicts", "cells"}
_MAX_COUNT = 10**9


class EvidenceError(ValueError):
    """Evidence from an earlier run that cannot be used here: unreadable, or for another model, camera or layout."""


class EvidenceMismatch(EvidenceError):
    """Readable evidence for another model (sha256) or camera: expected after an update, nothing wrong."""


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
