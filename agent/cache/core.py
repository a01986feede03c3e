"""The cache itself: the exact layer, the near-duplicate decision against the last computed input,
and the verdicts that feed its evidence. See the package docstring and docs/cache.md."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import xxhash
from pydantic import ValidationError

from agent.cache.bounds import poisson_quantile
from agent.cache.evidence import (
    _BAND_BASE,
    _BANDS,
    _CONTEXT_REACH,
    _CONTEXTS,
    _RECENT,
    EVIDENCE_FORMAT,
    EvidenceError,
    EvidenceMismatch,
    _band,
    _Evidence,
    parse_evidence,
)
from agent.cache.judges import OutputJudge, _margin, _scaled, output_change, output_ranges
from agent.cache.signature import _SIGNATURE_CELLS, _distance, _signature_index, _signature_part, _value_range
from agent.tensors import TensorInfo
from edgefleet.errors import ConfigError
from edgefleet.profiles import CacheSettings, format_validation_error
from edgefleet.quant import dequantize

__all__ = ["CacheSpec", "InferenceCache", "Lookup", "resolve_cache"]

_ENTRY_OVERHEAD = 128  # bytes per entry for the key, tuple and OrderedDict node
_INF = math.inf
_MIN_DISTANCE = 1.0 / 255  # non-classifiers: a sensitivity is never taken over a smaller input step
# Savings are capped at _BUDGET_ANSWERS answers' worth (each answer earns ``target``, a budgeted reuse
# spends its bound), so a long clean run cannot fund a burst of risky reuse later.
_BUDGET_ANSWERS = 200
# The distance envelope: reuse only within _ENVELOPE_FACTOR x the typical distance at which verdicts
# agree (a running mean over agreeing verdicts, weight _ENVELOPE_WEIGHT each). Frames farther away
# are still candidates up to near_threshold, so their verdicts can move it; a scene cut ten times
# farther than the stream's noise is computed even where a band's pooled evidence would allow it,
# and one cut whose answer happened to agree moves the envelope a little, not to the cut.
_ENVELOPE_FACTOR = 3.0
_ENVELOPE_WEIGHT = 0.05
_SENSITIVITY_WEIGHT = 0.2  # non-classifiers: weight of each computed pair in the running sensitivity


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
