"""ModelHost: the one object that serves inferences and lets OTA swap the model underneath.

Why it exists: an update must never make a request fail. ``activate`` builds the new
:class:`~agent.engine.Engine` completely (load, allocate, autotune) while the old one keeps
serving, then swaps a single reference. The old engine is closed only once the calls that
already entered it have drained, so no request ever sees a closed interpreter.

During OTA probation the previous engine can be kept alive (``keep_previous=True``): the
probation watcher runs it in shadow on live inputs (:meth:`infer_previous`) and an automatic
rollback is a pointer swap back (:meth:`revert`), not a reload, which is what makes "failed
probation -> serving the old model" take milliseconds.

Evidence across restarts: with ``evidence_file``, each engine built for a model starts its
cache from the verdict counts the last engine of the *same* model (sha256) on the same camera
(``evidence_source``) left there, and :meth:`ModelHost.save_evidence` writes the current one's
back (atomic, bounded). A file for another model, another camera, or one that cannot be read
is ignored with a log line: the engine starts cold and serves as always (docs/cache.md).

Observer: ``set_observer(fn)`` makes every inference call ``fn(inputs, outputs, latency_s,
error)`` after it finishes (probation uses it). With no observer the hot path is one attribute
read, a counter under a per-generation lock (needed to know when the old engine is drained)
and the engine call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.atomic import atomic_write_bytes
from edgefleet.errors import ModelError
from edgefleet.manifest import Manifest
from edgefleet.profiles import Profile

__all__ = ["EVIDENCE_SAVE_S", "ModelHost", "Observer"]

log = logging.getLogger(__name__)

EVIDENCE_SAVE_S = 300.0
"""Least time between two routine evidence writes, s (flash wear; a crash loses at most this much)."""

Observer = Callable[[Any, Any, float, BaseException | None], None]
"""``observer(inputs, outputs_or_None, latency_s, error_or_None)``; must be quick and never raise."""


class _Generation:
    """One engine plus the count of calls currently inside it."""

    __slots__ = ("cond", "engine", "inflight", "info", "manifest", "retired")

    def __init__(self, engine: Any, manifest: Manifest | None, info: dict[str, str] | None) -> None:
        self.engine = engine
        self.manifest = manifest
        self.info = info
        self.inflight = 0
        self.cond = threading.Condition(threading.Lock())
        self.retired = False

    def enter(self) -> None:
        with self.cond:
            self.inflight += 1

    def leave(self) -> None:
        with self.cond:
            self.inflight -= 1
            if self.retired:
                self.cond.notify_all()

    def retire_and_close(self, timeout_s: float) -> None:
        """Wait for the in-flight calls that can still finish, then close the engine.

        Calls already stuck past their deadline are not waited for: they may run for minutes
        (a model that hangs), and closing leaves a running call to finish on its own.
        """
        report = getattr(self.engine, "stuck_calls", None)
        stuck = report().count if report is not None else 0
        with self.cond:
            self.retired = True
            self.cond.wait_for(lambda: self.inflight <= stuck, timeout=timeout_s)
        self.engine.close()


def _model_info(engine: Any, manifest: Manifest | None, path: Path, name: str | None) -> dict[str, str]:
    sha = str(getattr(engine, "sha256", "") or "")
    if manifest is not None:
        return {"name": manifest.name, "version": manifest.version, "sha256": sha or manifest.model.sha256}
    stem = path.stem if path.suffix == ".tflite" else path.name
    return {"name": name or stem, "version": "0", "sha256": sha}


class ModelHost:
    """Serve inferences from the active engine; swap engines without failing a request.

    Thread-safe: any number of threads may call :meth:`infer` while one thread (the OTA worker)
    calls :meth:`activate` / :meth:`revert` / :meth:`release_previous`. A replaced engine is closed
    when its last in-flight call returns, or after ``drain_timeout_s`` if a call hangs in the
    runtime (so a stuck call cannot pin an old model in memory forever).
    """

    def __init__(self, profile: Profile | str, cache: Any = None, threads: int | None = None,
                 drain_timeout_s: float = 30.0, *, evidence_file: Path | None = None,
                 evidence_source: str = "default", **engine_kwargs: Any) -> None:
        """``engine_kwargs`` go to every Engine built (e.g. ``autotune=False``, ``instances=2``).

        ``evidence_file``: where the cache's evidence is kept across restarts (None: not kept);
        ``evidence_source``: the camera it was gathered on (a file for another is ignored).
        """
        self.profile = profile
        self._evidence_file = Path(evidence_file) if evidence_file is not None else None
        self._evidence_source = evidence_source
        self._evidence_saved_at = time.monotonic()
        self._evidence_lock = threading.Lock()  # one writer at a time (telemetry tick, swap, close)
        self._engine_kwargs = engine_kwargs
        self._cache = cache
        self._threads = threads
        self._drain_timeout_s = drain_timeout_s
        self._current: _Generation | None = None
        self._previous: _Generation | None = None
        self._observer: Observer | None = None
        self._swap_lock = threading.Lock()  # serializes activate/revert/release/close, never taken by infer
        self._closed = False
        self._swaps = 0

    def set_cache(self, cache: Any) -> None:
        """Cache setting for engines built from now on; the caller re-activates to apply it now.

        A model whose manifest says ``cache_allowed: false`` never gets a cache, whatever this says.
        """
        self._cache = cache

    # -- building -----------------------------------------------------------------------------
    def _build(self, model_path: Path, manifest: Manifest | None, name: str | None = None) -> _Generation:
        from agent.engine import Engine  # lazy: importing agent.host stays cheap

        # A slot's model file carries no manifest: hand the slot's to the engine, which applies
        # its task, input_range and cache_allowed to the cache.
        try:
            engine = Engine(str(model_path), profile=self.profile, threads=self._threads, cache=self._cache,
                            manifest=manifest, **self._engine_kwargs)
        except ModelError:
            raise
        except Exception as exc:  # the runtime's own exceptions: translate at the boundary
            raise ModelError(f"{model_path}: cannot load model: {exc}") from exc
        if manifest is None:
            manifest = getattr(engine, "manifest", None)
        self._load_evidence(engine)
        return _Generation(engine, manifest, _model_info(engine, manifest, Path(model_path), name))

    # -- evidence across restarts --------------------------------------------------------------
    def _load_evidence(self, engine: Any) -> None:
        """Start ``engine``'s cache from the evidence file if it is for this model and camera; never raises."""
        path = self._evidence_file
        if path is None or not hasattr(engine, "import_cache_evidence") or not path.is_file():
            return
        from agent.cache import EVIDENCE_MAX_BYTES, EvidenceError, EvidenceMismatch

        try:
            with path.open("rb") as fh:
                raw = fh.read(EVIDENCE_MAX_BYTES + 1)
            carried = engine.import_cache_evidence(raw, self._evidence_source)
        except EvidenceMismatch as exc:  # a model update or another camera: starting cold is the point
            log.info("cache evidence %s not used, the cache starts cold: %s", path, exc)
            return
        except (OSError, EvidenceError) as exc:
            log.warning("cache evidence %s ignored, the cache starts cold: %s", path, exc)
            return
        if carried:
            log.info("cache evidence %s: %d verdicts carried over for model %s on %r", path, carried,
                     str(getattr(engine, "sha256", ""))[:12], self._evidence_source)

    def save_evidence(self, force: bool = True) -> bool:
        """Write the active engine's cache evidence to ``evidence_file`` (atomic); whether it was written.

        ``force=False`` (the telemetry tick) writes at most every :data:`EVIDENCE_SAVE_S`. Nothing is
        written without a file, a cache, or a verdict of the engine's own. Never raises: a full
        disk costs the next start its warm-up, not a request.
        """
        path = self._evidence_file
        gen = self._current
        if path is None or gen is None or not hasattr(gen.engine, "export_cache_evidence"):
            return False
        with self._evidence_lock:
            if not force and time.monotonic() - self._evidence_saved_at < EVIDENCE_SAVE_S:
                return False
            from agent.cache import EVIDENCE_MAX_BYTES

            try:
                raw = gen.engine.export_cache_evidence(self._evidence_source)
                if raw is None or len(raw) > EVIDENCE_MAX_BYTES:
                    return False
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, raw, mode=0o600)
            except Exception as exc:  # noqa: BLE001 (evidence is an optimisation: never fail serving for it)
                log.warning("cache evidence not saved to %s: %s", path, exc)
                return False
            self._evidence_saved_at = time.monotonic()
            return True

    def activate(self, model_path: Path | str, manifest: Manifest | None = None, *,
                 keep_previous: bool = False, name: str | None = None) -> dict[str, str]:
        """Load ``model_path`` fully, then make it the active model.

        ``name`` labels a bare model that has no manifest (version "0"); default: the file's stem.
        With ``keep_previous`` the engine it replaces stays loaded for :meth:`infer_previous` and
        :meth:`revert` until :meth:`release_previous`; otherwise it is closed once drained.
        Returns the new model's info.

        Raises:
            ModelError: the new model cannot be loaded; the current model keeps serving.
        """
        if self._closed:
            raise RuntimeError("ModelHost is closed")
        self.save_evidence()  # a rebuild of the same model (new cache settings) carries on from it
        new = self._build(Path(model_path), manifest, name)  # outside the swap lock: slow, and may fail
        with self._swap_lock:
            if self._closed:
                new.engine.close()
                raise RuntimeError("ModelHost closed during activate")
            old, stale = self._current, self._previous
            self._current = new  # the swap: one reference assignment
            self._swaps += 1
            if keep_previous:
                self._previous = old
                old = None
            else:
                self._previous = None
        for gen in (stale, old):
            if gen is not None:
                gen.retire_and_close(self._drain_timeout_s)
        assert new.info is not None
        return dict(new.info)

    def revert(self) -> dict[str, str]:
        """Swap back to the engine kept by ``activate(..., keep_previous=True)`` and close the new one.

        Raises:
            RuntimeError: there is no previous engine kept.
        """
        with self._swap_lock:
            prev, cur = self._previous, self._current
            if prev is None:
                raise RuntimeError("no previous model kept to revert to")
            self._current, self._previous = prev, None
            self._swaps += 1
        if cur is not None:
            cur.retire_and_close(self._drain_timeout_s)
        assert prev.info is not None
        return dict(prev.info)

    def release_previous(self) -> None:
        """Close the kept previous engine (after a commit)."""
        with self._swap_lock:
            prev, self._previous = self._previous, None
        if prev is not None:
            prev.retire_and_close(self._drain_timeout_s)

    # -- serving ------------------------------------------------------------------------------
    def infer(self, x: Any) -> Any:
        """Run one inference on the active model (see :meth:`agent.engine.Engine.infer`).

        Raises:
            ModelError: no model is active.
            InputError / ModelError: from the engine.
        """
        gen = self._enter_current()
        try:
            obs = self._observer
            if obs is None:
                return gen.engine.infer(x)
            t0 = time.perf_counter()
            try:
                out = gen.engine.infer(x)
            except BaseException as exc:
                obs(x, None, time.perf_counter() - t0, exc)
                raise
            obs(x, out, time.perf_counter() - t0, None)
            return out
        finally:
            gen.leave()

    def _enter_current(self) -> _Generation:
        # Count ourselves in, then re-check the generation is still current: if a swap slipped in
        # between, back out and use the new one. This is what makes the drain in activate exact.
        while True:
            gen = self._current
            if gen is None:
                raise ModelError("no model is active yet")
            gen.enter()
            if gen is self._current or gen is self._previous:
                return gen
            gen.leave()

    def infer_previous(self, x: Any) -> Any | None:
        """Run ``x`` on the kept previous engine (probation shadow); None if none is kept."""
        gen = self._previous
        if gen is None:
            return None
        gen.enter()
        try:
            if gen is not self._previous:
                return None
            return gen.engine.infer(x)
        finally:
            gen.leave()

    def set_observer(self, observer: Observer | None) -> None:
        """Call ``observer`` after every inference (None removes it)."""
        self._observer = observer

    # -- inspection ---------------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest | None:
        gen = self._current
        return gen.manifest if gen else None

    @property
    def model_info(self) -> dict[str, str] | None:
        gen = self._current
        return dict(gen.info) if gen and gen.info else None

    @property
    def previous_info(self) -> dict[str, str] | None:
        gen = self._previous
        return dict(gen.info) if gen and gen.info else None

    @property
    def engine(self) -> Any | None:
        """The active engine (for input/output details); do not close it."""
        gen = self._current
        return gen.engine if gen else None

    def stats(self) -> dict[str, Any]:
        gen = self._current
        out: dict[str, Any] = {"model": self.model_info, "swaps": self._swaps,
                               "previous_kept": self._previous is not None}
        if gen is not None:
            try:
                out["engine"] = gen.engine.stats()
            except Exception as exc:  # noqa: BLE001 (stats must never break a telemetry tick)
                out["engine"] = {"error": str(exc)}
        return out

    def close(self) -> None:
        """Close every engine after in-flight calls drain; further calls fail with ModelError."""
        self.save_evidence()
        with self._swap_lock:
            if self._closed:
                return
            self._closed = True
            gens = [self._previous, self._current]
            self._current = self._previous = None
        for gen in gens:
            if gen is not None:
                gen.retire_and_close(self._drain_timeout_s)

    def __enter__(self) -> ModelHost:  # noqa: PYI034 (py310: no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
