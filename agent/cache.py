"""Input-locality cache: reuse model outputs for repeated or nearly repeated inputs, and check itself.

Three layers (see ``docs/cache.md``):

1. **Exact**: key = xxh3-64 of the input bytes *after* conversion to the model's input dtype,
   seeded with the model's sha256, so two float frames that quantize to the same tensor share an
   entry and two models never do. LRU, bounded in bytes.
2. **Near duplicate**: a cheap signature of the input (strided subsample, coarsely quantized to
   256 levels over the input's value range) is compared with the signature of the *last input that
   was actually computed* (never with the previous input, so small drifts cannot pile up). Its
   outputs are reused only when the mean absolute difference is within the current threshold,
   the computed result is younger than ``max_age_s`` and fewer than ``max_consecutive`` reuses
   happened in a row.
3. **Self-verification**: a sampled ``verify_fraction`` of near hits is run anyway and compared
   (top-1 for classifiers, a tolerance on outputs otherwise); half of them while the threshold is
   young (its first 10 verdicts after starting or moving). A running disagreement rate tightens
   the threshold when it exceeds ``target_disagreement`` and loosens it slowly, never beyond the
   configured value, when well under.

All state sits behind one lock: callers on several threads share one cache.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import xxhash
from pydantic import ValidationError

from agent.tensors import TensorInfo
from edgefleet.errors import ConfigError
from edgefleet.profiles import CacheSettings, format_validation_error
from edgefleet.quant import dequantize, top1

__all__ = ["CacheSpec", "InferenceCache", "Lookup", "input_signature", "resolve_cache", "signature_distance"]

_ENTRY_OVERHEAD = 128  # bytes per entry for the key, tuple and OrderedDict node
_SIGNATURE_CELLS = 32  # samples per spatial axis
_EWMA_ALPHA = 0.05  # the running disagreement rate remembers about the last 20 verifications
_TIGHTEN = 0.7
_LOOSEN = 1.05
_LOOSEN_AFTER = 20  # verifications without trouble before loosening
_MIN_THRESHOLD = 1e-4
# A threshold that just started or moved is unproven: verify this share of near hits until it has
# this many verdicts, then fall back to ``verify_fraction``. At 5 % a drifting stream needed a
# hundred near hits to see a single disagreement; the threshold learned too late.
_YOUNG_FRACTION = 0.5
_YOUNG_VERIFICATIONS = 10


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
    """What the cache said about one sample: ``kind`` is exact, near or miss."""

    kind: str
    outputs: tuple[np.ndarray, ...] | None
    verify: bool
    key: int
    signature: np.ndarray | None


def _strides(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Index that subsamples a batch-1 tensor to at most ~_SIGNATURE_CELLS per axis."""
    index: list[slice] = [slice(0, 1)]
    body = shape[1:]
    for axis, size in enumerate(body):
        last_and_small = axis == len(body) - 1 and size <= 4  # channels: keep them all
        step = 1 if last_and_small else max(1, size // _SIGNATURE_CELLS)
        index.append(slice(step // 2, None, step))
    return tuple(index)


def input_signature(sample: Sequence[np.ndarray], infos: Sequence[TensorInfo],
                    ranges: Sequence[tuple[float, float]]) -> np.ndarray:
    """Strided subsample of every input, mapped to 0..255 over its value range, as uint8."""
    parts = []
    for arr, info, (lo, hi) in zip(sample, infos, ranges):
        sub = arr.reshape(info.shape)[_strides(info.shape)]
        if arr.dtype == np.uint8:
            parts.append(sub.ravel())
            continue
        if arr.dtype == np.int8:
            parts.append((sub.ravel().astype(np.int16) + 128).astype(np.uint8))
            continue
        scaled = (sub.astype(np.float32).ravel() - lo) * (255.0 / max(hi - lo, 1e-12))
        parts.append(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def signature_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two signatures, as a fraction of the full range (0..1)."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) / 255.0


class InferenceCache:
    """Exact + near-duplicate cache for one model, with self-verification. Thread-safe."""

    def __init__(self, config: CacheSettings, model_sha256: str, inputs: Sequence[TensorInfo],
                 outputs: Sequence[TensorInfo], *, classifier: bool,
                 input_ranges: Sequence[tuple[float, float]] | None = None) -> None:
        self.config = config
        self._seed = int(model_sha256[:16], 16)
        self._inputs = tuple(inputs)
        self._outputs = tuple(outputs)
        self._classifier = classifier
        self._ranges: list[tuple[float, float] | None] = (
            list(input_ranges) if input_ranges is not None else [None] * len(self._inputs))
        self._lock = threading.Lock()
        self._rng = random.Random(config.seed)
        self._entries: OrderedDict[int, tuple[tuple[np.ndarray, ...], int]] = OrderedDict()
        self._bytes = 0
        self.threshold = config.near_threshold
        self._reset_counts()
        self._reference: tuple[np.ndarray, tuple[np.ndarray, ...], float] | None = None
        self._consecutive = 0

    def _reset_counts(self) -> None:
        self.exact_hits = self.near_hits = self.misses = 0
        self.verified = self.disagreements = self.evictions = 0
        self.disagreement_rate = 0.0
        self._since_adjust = 0
        self._lookup_s = 0.0
        self._lookups = 0
        self.threshold_changes = 0

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
        for i, (arr, info) in enumerate(zip(sample, self._inputs)):
            if ranges[i] is None:
                ranges[i] = _value_range(arr, info)
        return input_signature(sample, self._inputs, ranges)  # type: ignore[arg-type]

    def lookup(self, sample: Sequence[np.ndarray]) -> Lookup:
        """Decide for one sample (arrays in model dtype): exact hit, near hit (maybe to verify) or miss.

        Hashing and the signature are computed outside the lock; only the decisions hold it.
        """
        start = time.perf_counter()
        cfg = self.config
        key = self.key(sample) if cfg.max_bytes else 0
        if cfg.max_bytes:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.exact_hits += 1
                    self._lookup_s += time.perf_counter() - start
                    self._lookups += 1
                    return Lookup("exact", entry[0], False, key, None)
        signature = self._signature(sample) if cfg.near else None
        with self._lock:
            ref = self._reference
            if (signature is not None and ref is not None and self._consecutive < cfg.max_consecutive
                    and start - ref[2] <= cfg.max_age_s
                    and signature_distance(signature, ref[0]) <= self.threshold):
                self._consecutive += 1
                fraction = (max(cfg.verify_fraction, _YOUNG_FRACTION) if self._since_adjust < _YOUNG_VERIFICATIONS
                            else cfg.verify_fraction)
                verify = cfg.verify_fraction > 0 and self._rng.random() < fraction
                if not verify:
                    self.near_hits += 1
                self._lookup_s += time.perf_counter() - start
                self._lookups += 1
                return Lookup("near", ref[1], verify, key, signature)
            self.misses += 1
            self._lookup_s += time.perf_counter() - start
            self._lookups += 1
            return Lookup("miss", None, False, key, signature)

    def record(self, lookup: Lookup, outputs: tuple[np.ndarray, ...]) -> None:
        """Store outputs just computed for ``lookup``'s sample; score a verification if it was one.

        The arrays are made read-only and kept as they are: the engine copies on the way out.
        """
        now = time.perf_counter()
        for arr in outputs:
            arr.setflags(write=False)
        with self._lock:
            if lookup.verify and lookup.outputs is not None:
                self._score(lookup.outputs, outputs)
            if self.config.max_bytes:
                self._store(lookup.key, outputs)
            if lookup.signature is not None:
                self._reference = (lookup.signature, outputs, now)
                self._consecutive = 0

    # ------------------------------------------------------------------ internals
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

    def _agree(self, reused: tuple[np.ndarray, ...], fresh: tuple[np.ndarray, ...]) -> bool:
        for old, new, info in zip(reused, fresh, self._outputs):
            a, b = dequantize(old, info), dequantize(new, info)
            if self._classifier:
                if not np.array_equal(top1(a), top1(b)):
                    return False
                continue
            span = float(b.max() - b.min()) if b.size else 0.0
            if float(np.abs(a - b).max(initial=0.0)) > self.config.output_tolerance * max(span, 1e-6):
                return False
        return True

    def _score(self, reused: tuple[np.ndarray, ...], fresh: tuple[np.ndarray, ...]) -> None:
        """Update the running disagreement rate and move the threshold (tighten fast, loosen slowly)."""
        agree = self._agree(reused, fresh)
        self.verified += 1
        self._since_adjust += 1
        if not agree:
            self.disagreements += 1
        self.disagreement_rate += _EWMA_ALPHA * ((0.0 if agree else 1.0) - self.disagreement_rate)
        target = self.config.target_disagreement
        if not agree and self.disagreement_rate > target:
            self.threshold = max(self.threshold * _TIGHTEN, _MIN_THRESHOLD)
            self._since_adjust = 0
            self.threshold_changes += 1
        elif (agree and self._since_adjust >= _LOOSEN_AFTER and self.disagreement_rate < target / 2
              and self.threshold < self.config.near_threshold):
            self.threshold = min(self.threshold * _LOOSEN, self.config.near_threshold)
            self._since_adjust = 0
            self.threshold_changes += 1

    # ------------------------------------------------------------------ status
    def clear(self) -> None:
        """Drop every entry and the near-duplicate reference (counters and threshold stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._reference = None
            self._consecutive = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            lookups = self.exact_hits + self.near_hits + self.misses + self.verified
            saved = self.exact_hits + self.near_hits
            return {
                "enabled": True,
                "exact_hits": self.exact_hits,
                "near_hits": self.near_hits,
                "misses": self.misses,
                "verified_hits": self.verified,
                "disagreements": self.disagreements,
                "disagreement": round(self.disagreements / self.verified, 4) if self.verified else None,
                "disagreement_rate": round(self.disagreement_rate, 4),
                "threshold": round(self.threshold, 6),
                "threshold_changes": self.threshold_changes,
                "hit_rate": round(saved / lookups, 4) if lookups else 0.0,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.config.max_bytes,
                "evictions": self.evictions,
                "lookup_us": round(self._lookup_s / self._lookups * 1e6, 2) if self._lookups else None,
                "config": self.config.model_dump(exclude={"enabled"}),
            }


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

