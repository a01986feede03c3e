"""The inference engine: one object that turns arrays into model outputs, fast and thread-safe.

``Engine(model, profile="rpi4", threads=None, cache=None)`` loads a ``.tflite`` file, an artifact
directory (``model.tflite`` + ``manifest.json``) or model bytes, opens a small pool of
interpreters (one per worker, so callers on several threads never share one), laid out as
threads x instances by the profile or by :mod:`agent.autotune`, and serves ``infer``. Each call
is timed once, here (:func:`last_latency_s`).

Inputs may be float (quantized with the model's own parameters) or already in the model's
integer dtype (passed through). A batch ``[N, ...]`` is run sample by sample on a batch-1 model.
Outputs are dequantized to float32 unless ``raw=True``.

Every interpreter call has a deadline (``deadline_s``; by default the profile's latency budget
x :data:`DEADLINE_FACTOR`, at least :data:`DEADLINE_FLOOR_S`). A call cannot be interrupted inside
the runtime, so the deadline is what others see: :meth:`Engine.stuck_calls` counts the calls past
it (the watchdog and OTA probation read it), and a caller who waits that long for a free
interpreter gets :class:`EngineBusy` instead of waiting forever behind a hung one.

Errors: :class:`ModelError` (cannot load/run; :class:`EngineBusy` when no interpreter is free
within the deadline), :class:`InputError` (wrong name, shape or dtype), :class:`ArtifactError`
(artifact dir whose model does not match its manifest), :class:`ConfigError` (bad profile or an
Edge TPU that is required but missing).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from agent.autotune import Layout, TuneResult, choose_layout
from agent.cache import CacheSpec, InferenceCache, OutputJudge, output_judges, resolve_cache
from agent.runtime import Runtime, get_runtime, open_interpreter
from agent.tensors import describe_tensors, split_batch, to_model_dtype
from edgefleet.errors import ArtifactError, ConfigError, InputError, ModelError
from edgefleet.manifest import MODEL_NAME, Manifest, OutputRole, load_manifest, resolve_output_roles
from edgefleet.profiles import Profile, load_profile
from edgefleet.quant import dequantize, first_output, top1

__all__ = ["DEADLINE_FACTOR", "DEADLINE_FLOOR_S", "Engine", "EngineBusy", "Layout", "Outputs", "StuckCalls",
           "call_deadline_s", "last_latency_s", "load_model_bytes"]

Outputs = np.ndarray | dict[str, np.ndarray]
_LATENCY_WINDOW = 2048
_last_call = threading.local()
_monotonic = time.monotonic

DEADLINE_FACTOR = 20.0
"""A call is stuck after this many times the profile's latency budget (generous: first calls,
a loaded board and thermal throttling are all slower than the budget)."""
DEADLINE_FLOOR_S = 2.0
"""...but never sooner than this, s (tight budgets on a busy board would flap)."""


def call_deadline_s(profile: Profile, factor: float = DEADLINE_FACTOR, floor_s: float = DEADLINE_FLOOR_S) -> float:
    """Seconds one interpreter call may take before it counts as stuck, from the profile's budget."""
    return max(floor_s, factor * profile.limits.latency_budget_ms / 1000.0)


class EngineBusy(ModelError):
    """No interpreter became free within the deadline: calls ahead are stuck or the device is overloaded."""

    http_status = 503


class StuckCalls(NamedTuple):
    """Interpreter calls past their deadline right now (see :meth:`Engine.stuck_calls`)."""

    count: int  # calls running longer than deadline_s
    oldest_s: float  # how long the oldest of them has been running, s (0.0 when count is 0)
    deadline_s: float


def last_latency_s() -> float | None:
    """Seconds the last successful :meth:`Engine.infer` on this thread took (None before any).

    Why: the engine is the one clock of an inference. Callers that wrap it (the service's
    Metrics, the result sinks, ``edge-agent bench``) read this instead of timing the call again,
    so every figure for a call is the same number. Read it right after ``infer`` returns, on the
    same thread.
    """
    return getattr(_last_call, "latency_s", None)


class _Worker:
    """One interpreter and the bound methods the hot path needs (looked up once)."""

    __slots__ = ("get_tensor", "interpreter", "invoke", "set_tensor", "slot", "tensor", "threads")

    def __init__(self, interpreter: Any, threads: int, slot: int) -> None:
        self.interpreter = interpreter
        self.slot = slot  # index into Engine._started
        self.threads = threads
        self.set_tensor = interpreter.set_tensor
        self.invoke = interpreter.invoke
        self.get_tensor = interpreter.get_tensor
        self.tensor = interpreter.tensor


def load_model_bytes(model: str | os.PathLike[str] | bytes) -> tuple[bytes, Manifest | None, str]:
    """Read a model from a ``.tflite`` path, an artifact directory or bytes.

    Returns the model bytes, the manifest (artifact directories only) and a source label.

    Raises:
        ModelError: the file is missing or empty.
        ArtifactError: the artifact's manifest is invalid or its sha256/size do not match the file.
    """
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        if not data:
            raise ModelError("model bytes are empty")
        return data, None, "<bytes>"
    path = Path(model)
    manifest = None
    if path.is_dir():
        manifest, _raw, _sig = load_manifest(path)
        file = path / (manifest.model.file or MODEL_NAME)
        if not file.is_file():
            raise ArtifactError(f"{path}: manifest names {manifest.model.file!r}, which is missing")
        data = file.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest.model.sha256 or len(data) != manifest.model.size:
            raise ArtifactError(f"{file}: sha256 {digest[:12]}... / {len(data)} bytes do not match the "
                                f"manifest ({manifest.model.sha256[:12]}... / {manifest.model.size} bytes)")
        return data, manifest, str(file)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found (expected a .tflite file or an artifact directory)")
    data = path.read_bytes()
    if not data:
        raise ModelError(f"{path}: model file is empty")
    return data, None, str(path)


class Engine:
    """Run a TFLite model from any number of threads, with an optional input-locality cache.

    Args:
        model: ``.tflite`` path, artifact directory, or model bytes.
        profile: device profile name, path or :class:`Profile` (threads, accelerator, cache defaults).
        threads: interpreter threads; ``None`` = the profile's (and autotune may choose).
        cache: ``None``/``False`` off, ``True`` the profile's settings, a mapping of overrides, or
            :class:`~edgefleet.profiles.CacheSettings` (see :func:`agent.cache.resolve_cache`).
        instances: interpreters in the pool; ``None`` = the profile's (and autotune may choose).
        autotune: ``None`` = the profile's setting; ``False`` skips it (tests, OTA validation).
        validate: check the file in a child process first (untrusted files can crash the runtime).
        deadline_s: seconds one interpreter call may take before it counts as stuck, and the
            longest wait for a free interpreter; ``None`` = :func:`call_deadline_s` of the profile.
        manifest: the model's manifest when ``model`` is a bare file or bytes (an OTA slot): it
            drives ``task``, ``input_range`` and ``cache_allowed`` for the cache, and wins over
            the manifest of an artifact directory.
        output_roles: what each output means, for the cache's judgement (see
            :class:`~edgefleet.manifest.OutputRole`); ``None`` = the manifest's ``output_roles``.

    Raises:
        ModelError, ArtifactError, ConfigError: see the module docstring.
    """

    def __init__(self, model: str | os.PathLike[str] | bytes, profile: str | Path | Profile = "rpi4",
                 threads: int | None = None, cache: CacheSpec = None, *,
                 instances: int | None = None, autotune: bool | None = None, validate: bool = False,
                 validate_timeout_s: float = 30.0, deadline_s: float | None = None,
                 manifest: Manifest | None = None, output_roles: list[OutputRole] | None = None) -> None:
        self.profile: Profile = profile if isinstance(profile, Profile) else load_profile(profile)
        if deadline_s is not None and not deadline_s > 0:
            raise ConfigError(f"deadline_s must be > 0 seconds, got {deadline_s}")
        self.deadline_s: float = deadline_s if deadline_s is not None else call_deadline_s(self.profile)
        data, found, self.source = load_model_bytes(model)
        self.manifest: Manifest | None = manifest if manifest is not None else found
        if validate:
            self._validate_in_child(data, validate_timeout_s)
        self.sha256: str = hashlib.sha256(data).hexdigest()
        self._model_bytes = data
        self._runtime: Runtime = get_runtime()
        rt = self.profile.runtime
        cores = os.cpu_count() or 1
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        if instances is not None and instances < 1:
            raise ConfigError(f"instances must be >= 1, got {instances}")
        layout = Layout(threads=threads or min(rt.threads, cores), instances=instances or rt.instances)
        first_threads = layout.threads
        first, self.accelerator = open_interpreter(
            data, threads=layout.threads, accelerator=rt.accelerator,
            accelerator_required=rt.accelerator_required, runtime=self._runtime)
        self.input_details, self.output_details = describe_tensors(first)
        self._inputs_by_name = {t.name: t for t in self.input_details}
        for info in self.input_details:
            if not info.shape or info.shape[0] != 1:
                raise ModelError(f"input {info.name!r} has shape {list(info.shape)}; expected batch 1")
        self._tuning = TuneResult(layout)
        wants_autotune = rt.autotune if autotune is None else autotune
        if wants_autotune and threads is None and instances is None and self.accelerator != "edgetpu":
            self._tuning = choose_layout(first, layout, cores, self.input_details, rt.objective, self._open)
            layout = self._tuning.layout
        self.layout = layout
        self._workers = self._build_pool(layout, first, first_threads)
        # When each worker's current interpreter call started (monotonic s; 0.0 = idle). Plain
        # floats written by the one thread that holds the worker, read without a lock by
        # stuck_calls(); kept apart from the workers so close() can free interpreters.
        self._started = [0.0] * len(self._workers)
        self._pool: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()  # None: closed
        for worker in self._workers:
            self._pool.put(worker)
        self._cache: InferenceCache | None = None
        self.cache_disabled_reason: str | None = None
        config = resolve_cache(cache, self.profile)
        if config is not None and self.manifest is not None and not self.manifest.cache_allowed:
            config, self.cache_disabled_reason = None, "manifest says cache_allowed: false"
        if config is not None:
            self._cache = InferenceCache(config, self.sha256, self.input_details, self.output_details,
                                         classifier=self._is_classifier(), input_ranges=self._input_ranges(),
                                         judges=self._output_judges(output_roles))
        self._latencies = np.zeros(_LATENCY_WINDOW, dtype=np.float64)
        self._calls = 0
        self._samples = 0
        self._errors = 0
        self._closed = False
        self._stats_lock = threading.Lock()

    # ------------------------------------------------------------------ building
    def _validate_in_child(self, data: bytes, timeout_s: float) -> None:
        import tempfile

        from agent.validation import validate_model

        with tempfile.TemporaryDirectory(prefix="edgefleet-validate-") as tmp:
            path = Path(tmp) / MODEL_NAME
            path.write_bytes(data)
            report = validate_model(path, profile=self.profile, manifest=self.manifest, timeout_s=timeout_s)
        if not report.ok:
            raise ModelError(f"{self.source}: {report.reason}")

    def _open(self, threads: int) -> Any:
        rt = self.profile.runtime
        interpreter, _ = open_interpreter(self._model_bytes, threads=threads, accelerator=rt.accelerator,
                                          accelerator_required=rt.accelerator_required, runtime=self._runtime)
        return interpreter

    def _build_pool(self, layout: Layout, first: Any, first_threads: int) -> list[_Worker]:
        """One worker per instance; the first interpreter is kept only if it has the chosen threads."""
        workers = [_Worker(first, first_threads, 0)] if first_threads == layout.threads else []
        while len(workers) < layout.instances:
            workers.append(_Worker(self._open(layout.threads), layout.threads, len(workers)))
        return workers

    def _input_ranges(self) -> list[tuple[float, float]] | None:
        """Float input value ranges from the manifest, so near-duplicate signatures use real units."""
        if self.manifest is None or self.manifest.preprocessing.input_range is None:
            return None
        lo, hi = self.manifest.preprocessing.input_range
        return [(float(lo), float(hi)) if t.dtype.kind == "f" else (float(np.iinfo(t.dtype).min),
                float(np.iinfo(t.dtype).max)) for t in self.input_details]

    def _output_judges(self, roles: list[OutputRole] | None) -> tuple[OutputJudge, ...] | None:
        """The cache's judge per output from ``roles`` or the manifest's ``output_roles`` (None: none declared).

        A manifest numbers its outputs in its own ``outputs`` list; they are matched to the
        interpreter's outputs by name.

        Raises:
            ConfigError: a role names an output this model does not have, or does not fit it.
        """
        if roles is None and self.manifest is not None and self.manifest.output_roles:
            specs = [t.name for t in self.manifest.outputs]

            def by_name(ref: str | int | None) -> str | int | None:
                return specs[ref] if isinstance(ref, int) and 0 <= ref < len(specs) else ref

            roles = [r.model_copy(update={"output": by_name(r.output), "scores": by_name(r.scores)})
                     for r in self.manifest.output_roles]
        if not roles:
            return None
        try:
            resolved = resolve_output_roles(list(roles), [t.name for t in self.output_details])
        except ValueError as exc:
            raise ConfigError(f"output_roles: {exc}") from exc
        return output_judges(resolved, len(self.output_details))

    def _is_classifier(self) -> bool:
        if self.manifest is not None:
            return self.manifest.task == "classification"
        return len(self.output_details) == 1 and len(self.output_details[0].shape) == 2 \
            and self.output_details[0].shape[-1] > 1

    # ------------------------------------------------------------------ inference
    def _prepare(self, x: np.ndarray | Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], int]:
        """Inputs in model dtype and a sample count (0 = one sample given without batch axis)."""
        if isinstance(x, Mapping):
            missing = [t.name for t in self.input_details if t.name not in x]
            extra = [k for k in x if k not in self._inputs_by_name]
            if missing or extra:
                raise InputError(f"expected inputs {[t.name for t in self.input_details]}, got {sorted(x)}")
            values = [x[t.name] for t in self.input_details]
        else:
            if len(self.input_details) != 1:
                raise InputError(f"model has {len(self.input_details)} inputs: pass a dict with "
                                 f"{[t.name for t in self.input_details]}")
            values = [x]
        arrays: list[np.ndarray] = []
        count = None
        for info, value in zip(self.input_details, values):
            arr = value if isinstance(value, np.ndarray) else np.asarray(value)
            n = split_batch(arr, info)
            if count is None:
                count = n
            elif n != count:
                raise InputError(f"inputs disagree on the batch size: {count or 1} vs {n or 1}")
            arrays.append(to_model_dtype(arr, info))
        return arrays, int(count or 0)

    def _run(self, sample: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        """Invoke one worker on one sample (arrays already in model dtype). Returns raw outputs.

        Raises:
            EngineBusy: no worker became free within ``deadline_s``.
            ModelError: closed, or the runtime failed.
        """
        try:
            worker = self._pool.get(timeout=self.deadline_s)
        except queue.Empty:
            raise EngineBusy(f"no interpreter free within {self.deadline_s:g} s "
                             f"({self.stuck_calls().count} call(s) stuck past the deadline)") from None
        if worker is None or self._closed:  # closed while this call waited: wake the next waiter too
            self._pool.put(worker)
            raise ModelError("engine is closed")
        started = self._started
        started[worker.slot] = _monotonic()  # the stuck-call bookkeeping: one clock read, two stores
        try:
            for info, arr in zip(self.input_details, sample):
                worker.set_tensor(info.index, arr.reshape(info.shape))
            worker.invoke()
            return tuple(worker.get_tensor(info.index) for info in self.output_details)
        except (RuntimeError, ValueError) as exc:
            with self._stats_lock:
                self._errors += 1
            raise ModelError(f"inference failed: {exc}") from exc
        finally:
            started[worker.slot] = 0.0
            self._pool.put(worker)

    def _run_cached(self, sample: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        cache = self._cache
        assert cache is not None
        lookup = cache.lookup(sample)
        if lookup.outputs is not None and not lookup.verify:
            return lookup.outputs
        outputs = self._run(sample)
        cache.record(lookup, outputs)
        return outputs

    def infer(self, x: np.ndarray | Mapping[str, np.ndarray], *, raw: bool = False) -> Outputs:
        """Run the model on one sample or a batch.

        ``x`` is an array (single-input models) or a dict name -> array. Returns an array for a
        single-output model, else a dict name -> array; floats unless ``raw=True`` (model dtype).
        A batch ``[N, ...]`` gives outputs ``[N, ...]``; a sample without its batch axis gives
        outputs without it.

        Raises:
            InputError: wrong input names, shapes or dtypes.
            ModelError: the engine is closed or the runtime failed.
        """
        if self._closed:
            raise ModelError("engine is closed")
        start = time.perf_counter()
        arrays, count = self._prepare(x)
        run = self._run if self._cache is None else self._run_cached
        if count <= 1:
            results = run(arrays)
            if count == 0:
                results = tuple(r[0] for r in results)
        else:
            per_sample = [run([a[i:i + 1] for a in arrays]) for i in range(count)]
            results = tuple(np.concatenate([s[k] for s in per_sample]) for k in range(len(self.output_details)))
        if raw:
            final = [r.copy() if not r.flags.writeable else r for r in results]
        else:
            final = [dequantize(r, info) if info.quantized else (r.copy() if not r.flags.writeable else r)
                     for r, info in zip(results, self.output_details)]
        elapsed = time.perf_counter() - start
        _last_call.latency_s = elapsed
        with self._stats_lock:  # uncontended: ~0.1 us; keeps counts exact under threads
            self._latencies[self._calls % _LATENCY_WINDOW] = elapsed
            self._calls += 1
            self._samples += max(count, 1)
        if len(final) == 1:
            return final[0]
        return {info.name: arr for info, arr in zip(self.output_details, final)}

    def top1(self, outputs: Outputs) -> np.ndarray:
        """Class index per sample for a classifier's output (the first output for dicts)."""
        return top1(first_output(outputs))

    def canary(self) -> float:
        """Run a synthetic input (zeros) through an interpreter, bypassing the cache; seconds taken.

        Why: when no traffic comes, this is the watchdog's evidence that the runtime still answers.
        It is not counted as an inference.

        Raises:
            EngineBusy / ModelError: as :meth:`infer`.
        """
        sample = [np.zeros(info.shape, info.dtype) for info in self.input_details]
        start = time.perf_counter()
        self._run(sample)
        return time.perf_counter() - start

    # ------------------------------------------------------------------ health
    def stuck_calls(self, now: float | None = None) -> StuckCalls:
        """Interpreter calls running longer than ``deadline_s`` at ``now`` (``time.monotonic()`` s).

        O(workers), no lock: safe to call from any thread at any rate (watchdog, probation, /healthz).
        """
        now = _monotonic() if now is None else now
        runs = [now - t for t in self._started if t and now - t > self.deadline_s]
        return StuckCalls(len(runs), max(runs, default=0.0), self.deadline_s)

    @property
    def finished_calls(self) -> int:
        """Calls that came back from the interpreter (answers and runtime errors) since the engine was built."""
        return self._calls + self._errors

    def health(self, now: float | None = None) -> dict[str, Any]:
        """``stuck_calls`` and the pool's occupancy as JSON (``/healthz``, telemetry, status)."""
        now = _monotonic() if now is None else now
        stuck = self.stuck_calls(now)
        return {"ok": stuck.count == 0, "stuck_workers": stuck.count, "stuck_for_s": round(stuck.oldest_s, 3),
                "busy_workers": sum(1 for t in self._started if t), "workers": len(self._started),
                "deadline_s": self.deadline_s}

    # ------------------------------------------------------------------ status
    def stats(self) -> dict[str, Any]:
        """Counts, latency percentiles (ms, last 2048 calls), cache stats, runtime and layout."""
        with self._stats_lock:
            calls, samples, errors = self._calls, self._samples, self._errors
            window = self._latencies[: min(calls, _LATENCY_WINDOW)].copy()
        if window.size:
            p50, p95, p99 = (float(v) * 1000.0 for v in np.percentile(window, [50, 95, 99]))
            latency = {"p50": round(p50, 4), "p95": round(p95, 4), "p99": round(p99, 4)}
        else:
            latency = {"p50": None, "p95": None, "p99": None}
        return {
            "calls": calls,
            "inferences": samples,
            "errors": errors,
            "latency_ms": latency,
            "runtime": self._runtime.name,
            "accelerator": self.accelerator,
            "layout": {"threads": self.layout.threads, "instances": self.layout.instances,
                       "autotuned": bool(self._tuning.candidates), "candidates": list(self._tuning.candidates),
                       "note": self._tuning.note,
                       "objective": self.profile.runtime.objective},
            "model": {"sha256": self.sha256, "source": self.source,
                      "name": self.manifest.name if self.manifest else None,
                      "version": self.manifest.version if self.manifest else None},
            "cache": self._cache.stats() if self._cache is not None
            else {"enabled": False, "reason": self.cache_disabled_reason or "off"},
        }

    def export_cache_evidence(self, source: str) -> bytes | None:
        """The cache's verdict counts for the next run of this model on camera ``source`` (None: no cache,
        or no verdict of its own yet, so there is nothing new to keep). See docs/cache.md, "Evidence across restarts".
        """
        if self._cache is None or not self._cache.verdicts:
            return None
        return self._cache.export_evidence(source)

    def import_cache_evidence(self, raw: bytes, source: str) -> int:
        """Start the cache from an earlier run's evidence (halved, capped, voided by disagreements); verdicts carried.

        Returns 0 without a cache.

        Raises:
            EvidenceError: unreadable, or for another model, camera or layout (nothing is taken).
        """
        return self._cache.import_evidence(raw, source) if self._cache is not None else 0

    def clear_cache(self) -> None:
        """Forget every cached output (the engine does this itself when its model changes)."""
        if self._cache is not None:
            self._cache.clear()

    def close(self) -> None:
        """Release the idle interpreters; later calls to ``infer`` raise ModelError.

        Calls already running finish normally (their interpreter is freed with the engine); calls
        waiting for a free interpreter wake up with ModelError instead of waiting forever.
        """
        self._closed = True
        if self._cache is not None:
            self._cache.clear()
        self._workers = []
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                break
        self._pool.put(None)

    def __enter__(self) -> Engine:  # noqa: PYI034 (3.10 has no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Engine({self.source!r}, runtime={self._runtime.name}, accelerator={self.accelerator}, "
                f"threads={self.layout.threads}, instances={self.layout.instances}, "
                f"cache={'on' if self._cache else 'off'})")

