"""``edge-fleet serve``: the rollout controller, a long-running owner of rollouts.

It accepts rollouts over the API (:mod:`fleet.api`), drives each one it holds the lease of with
the same :class:`~fleet.runner.RolloutRunner` the in-process deploy uses (so the planner in
:mod:`fleet.rollout` stays the one place that decides), and exports fleet metrics
(:mod:`fleet.exporter`). Several controllers may share one database:

* every second each controller looks at the running rollouts' leases and adopts one whose lease
  is free, expired (10 s without a write from its driver) or held by a dead process on this host;
* the adopter re-sends only to SENT devices, with the same command ids, over the rollout's own
  persistent MQTT session (``edge-fleet-<rollout id>``), so QoS 1 answers queued while nobody
  drove it arrive, and retained states credit devices that finished meanwhile;
* a driver whose write finds the lease taken stops at once (it can no longer publish either:
  every publish follows a write).

Threads: the MQTT registry/exporter feed, the lease scanner, one driver per rollout (each with
its own database connection and MQTT session), the API's request threads, the metrics render.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgefleet.atomic import atomic_write_bytes
from edgefleet.errors import ArtifactError, ConfigError, EdgefleetError
from edgefleet.manifest import parse_manifest
from edgefleet.messages import ExecState
from edgefleet.mqtt import BrokerAccess, Message, MqttClient, connect
from edgefleet.signing import Ed25519PrivateKey
from fleet import views
from fleet.artifacts import ArtifactServer, hosted_manifest, manifest_url_beside, serve_manifest
from fleet.exporter import FleetIndex, MetricsServer
from fleet.registry import STATE_TOPICS, TELEMETRY_TOPICS, Registry, drain_into, select_devices
from fleet.rollout import Policy, parse_canary
from fleet.runner import Artifact, RolloutRunner, Stopped, check_signing, create_deploy, create_rollback
from fleet.store import LeaseLost, Store, StoreUnavailable, make_owner, open_store

__all__ = ["Controller", "ControllerSettings"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControllerSettings:
    """How one controller runs. Inert: :meth:`Controller.start` opens everything."""

    state: str                      # sqlite:///... or postgresql://...
    broker: str | BrokerAccess      # mqtt://... (several with commas), with its password and TLS files
    token: str                      # the API's bearer token
    listen: str = "127.0.0.1:8470"  # API address
    tls_cert: str | None = None
    tls_key: str | None = None
    serve: str = "0.0.0.0:0"        # artifact server for uploaded models
    advertise: str | None = None    # host name devices use to reach it
    metrics: str | None = "0.0.0.0:9479"  # exporter address; None: no exporter
    metrics_refresh_s: float = 5.0  # metrics render interval, s
    stale_s: float = 600.0          # a device silent this long leaves the metrics, s
    scan_s: float = 1.0             # how often leases are looked at, s
    cache_dir: Path = Path(".")     # where uploaded models are written for the artifact server
    sign_key: Ed25519PrivateKey | None = None  # signs rollback statements (below a device's floor)


class Controller:
    """Start with :meth:`start`, stop with :meth:`close`; :meth:`submit` and friends serve the API."""

    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.controller_id = make_owner("controller")
        self._stop = threading.Event()
        self._driving: set[str] = set()
        self._driving_lock = threading.Lock()
        self._api_lock = threading.Lock()
        self._reg_lock = threading.Lock()
        self.registry = Registry()
        self.index = FleetIndex(stale_s=settings.stale_s)
        self._feed: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closers: list[Any] = []

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Controller:
        """Open the database (schema checked), the broker, the servers; adopt running rollouts.

        Raises:
            StoreUnavailable / SchemaError: the database; TransportError: the broker or a port.
        """
        s = self.settings
        self._store = open_store(s.state, migrate=False if s.state.startswith("postgres") else None)
        self._closers.append(self._store)
        self._metrics_store = open_store(s.state, migrate=False)
        self._closers.append(self._metrics_store)
        self._mqtt = connect(s.broker, on_message=self._feed.put)
        self._closers.append(self._mqtt)
        self._mqtt.subscribe(STATE_TOPICS + TELEMETRY_TOPICS)
        self._settle()
        self.artifacts = ArtifactServer(s.serve, advertise=s.advertise)
        self._closers.append(self.artifacts)
        self.metrics: MetricsServer | None = None
        if s.metrics:
            self.metrics = MetricsServer(s.metrics, self.index, self._rollout_metrics, refresh_s=s.metrics_refresh_s)
            self._closers.append(self.metrics)
        from fleet.api import ApiServer

        self.api = ApiServer(s.listen, self, s.token, s.tls_cert, s.tls_key,
                             on_error=lambda exc: log.error("API handler failed", exc_info=exc))
        self._closers.append(self.api)
        for target in (self._ingest_loop, self._scan_loop):
            t = threading.Thread(target=target, daemon=True, name=f"controller-{target.__name__}")
            t.start()
            self._threads.append(t)
        return self

    def _settle(self) -> None:
        """Read the retained states before answering: targets are resolved against them."""
        buffered = _QueueReader(self._feed)
        drain_into(_RegistryTee(self), buffered, settle_s=0.4, max_s=30.0)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop driving (leases are released for another controller), then close everything."""
        self._stop.set()
        deadline = time.monotonic() + 10
        while self._driving and time.monotonic() < deadline:
            time.sleep(0.05)
        for closer in reversed(self._closers):
            try:
                closer.close()
            except Exception:  # closing is best effort
                log.debug("close failed", exc_info=True)

    def wait(self) -> None:
        self._stop.wait()

    # -- feeds --------------------------------------------------------------------------------
    def ingest(self, msg: Message) -> None:
        with self._reg_lock:
            self.registry.ingest(msg)
        self.index.ingest(msg)

    def _ingest_loop(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._feed.get(timeout=0.5)
            except queue.Empty:
                continue
            self.ingest(msg)

    def _rollout_metrics(self) -> list[dict[str, Any]]:
        return views.listing(self._metrics_store, limit=20)

    # -- adopting and driving -----------------------------------------------------------------
    def _scan_loop(self) -> None:
        store: Store | None = None
        while not self._stop.wait(self.settings.scan_s):
            try:
                if store is None:
                    store = open_store(self.settings.state, migrate=False)
                now = time.time()
                for lease in store.leases():
                    if lease.rollout_id in self._driving:
                        continue
                    if (lease.driver == self.controller_id or lease.free(now)) and \
                            store.acquire(lease.rollout_id, self.controller_id, now=now):
                        log.warning("controller %s adopts rollout %s (was %s)", self.controller_id,
                                    lease.rollout_id, lease.driver)
                        self._start_driver(lease.rollout_id)
            except StoreUnavailable as exc:
                log.warning("lease scan: %s", exc)
        if store is not None:
            store.close()

    def _start_driver(self, rollout_id: str) -> None:
        with self._driving_lock:
            if rollout_id in self._driving or self._stop.is_set():
                return
            self._driving.add(rollout_id)
        threading.Thread(target=self._drive, args=(rollout_id,), daemon=True, name=f"drive-{rollout_id}").start()

    def _drive(self, rollout_id: str) -> None:
        store: Store | None = None
        client: MqttClient | None = None
        try:
            store = open_store(self.settings.state, migrate=False)
            rollout = store.rollout(rollout_id)
            manifest = None
            if rollout.serve == "controller" and rollout.sha256:
                url = self.artifacts.add(f"/{rollout.sha256}/model.tflite", self._model_file(store, rollout.sha256))
                rollout = replace(rollout, artifact_url=url)
                manifest = serve_manifest(self.artifacts, rollout.manifest or {})
            elif rollout.kind == "deploy" and rollout.artifact_url:
                manifest = hosted_manifest(manifest_url_beside(rollout.artifact_url), rollout.manifest or {})
            execs = store.executions(rollout_id)
            client = connect(self.settings.broker, client_id=f"edge-fleet-{rollout_id}", persistent=True)
            runner = RolloutRunner(store, client, rollout, execs, owner=self.controller_id, stop=self._stop,
                                   notice=lambda text: log.warning("%s", text), manifest=manifest,
                                   sign_key=self.settings.sign_key)
            if any(e.state is not ExecState.QUEUED for e in execs):
                client.subscribe(STATE_TOPICS)  # retained states credit devices that finished meanwhile
            final = runner.run()
            log.warning("rollout %s ended %s: %s", final.id, final.state, final.reason)
            client.close(end_session=True)
            client = None
        except Stopped:
            if store is not None:
                _release_quietly(store, rollout_id, self.controller_id)  # the next controller need not wait
        except LeaseLost as exc:
            log.warning("%s: stopped driving", exc)
        except EdgefleetError as exc:
            log.warning("rollout %s: cannot drive it now: %s", rollout_id, exc)
            if store is not None:
                _release_quietly(store, rollout_id, self.controller_id)
        finally:
            if client is not None:
                client.close()
            if store is not None:
                store.close()
            with self._driving_lock:
                self._driving.discard(rollout_id)

    def _model_file(self, store: Store, sha256: str) -> Path:
        """An uploaded model, written once from the database for the artifact server."""
        path = self.settings.cache_dir / sha256 / "model.tflite"
        if not path.is_file():
            data = store.artifact(sha256)
            if data is None:
                raise ArtifactError(f"model {sha256[:12]}... is not in {store.path}: upload it again")
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        return path

    # -- the API's service --------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {"ok": True, "controller": self.controller_id, "driving": sorted(self._driving)}

    def listing(self) -> list[dict[str, Any]]:
        with self._api_lock:
            return views.listing(self._store)

    def summary(self, rollout_id: str) -> dict[str, Any]:
        with self._api_lock:
            return views.summary(self._store, rollout_id)

    def history(self, rollout_id: str, device_id: str) -> list[dict[str, Any]]:
        with self._api_lock:
            return views.device_history(self._store, rollout_id, device_id)

    def devices(self) -> list[dict[str, Any]]:
        with self._reg_lock:
            return [dict(d.to_json(), telemetry=d.telemetry) for d in self.registry.known()]

    def has_artifact(self, sha256: str) -> bool:
        with self._api_lock:
            return self._store.has_artifact(sha256)

    def put_artifact(self, sha256: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ArtifactError(f"upload {sha256[:12]}...: the body's sha256 is {hashlib.sha256(data).hexdigest()[:12]}...")
        with self._api_lock:
            self._store.put_artifact(sha256, data)

    def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Create a deploy or rollback from an API request and start driving it.

        Raises:
            ConfigError (bad request, unknown targets), ArtifactError, SignatureError, RolloutBusy.
        """
        kind = request.get("kind")
        if kind not in ("deploy", "rollback"):
            raise ConfigError(f"request kind {kind!r}: expected 'deploy' or 'rollback'")
        targets = request.get("targets") if isinstance(request.get("targets"), dict) else {}
        with self._reg_lock:
            devices = select_devices(self.registry, targets.get("devices"), targets.get("group"),
                                     bool(targets.get("all")))
        target = (f"group {targets['group']!r}" if targets.get("group") else
                  "all devices" if targets.get("all") else f"{len(devices)} device(s)")
        force = bool(request.get("force"))
        url, raw = request.get("artifact_url"), request.get("manifest")
        if kind == "deploy" and url and isinstance(raw, dict):  # devices fetch it there: refuse now, not per device
            hosted_manifest(manifest_url_beside(str(url)), raw)
        with self._api_lock:
            if kind == "deploy":
                rollout = self._create_deploy(request, devices, target, force)
            else:
                timeout = float(request.get("device_timeout_s") or 120.0)
                if timeout <= 0:
                    raise ConfigError("--device-timeout: expected seconds > 0")
                created, _ = create_rollback(self._store, devices, request.get("to"), str(self.settings.broker), timeout,
                                             owner=self.controller_id, target=target, force=force)
                rollout = created.id
            self._start_driver(rollout)
            return views.summary(self._store, rollout)

    def _create_deploy(self, request: dict[str, Any], devices: list[Any], target: str, force: bool) -> str:
        raw = request.get("manifest")
        if not isinstance(raw, dict):
            raise ConfigError("deploy request: expected a manifest object")
        manifest = parse_manifest(raw, "the request's manifest")
        if not manifest.deployable and not force:
            raise ArtifactError("manifest says deployable: false (the converter's checks failed; pass --force)")
        url = request.get("artifact_url")
        if not url and not self._store.has_artifact(manifest.model.sha256):
            raise ArtifactError(f"model {manifest.model.sha256[:12]}... was not uploaded (PUT /v1/artifacts/SHA256)")
        signature = request.get("signature")
        artifact = Artifact(None, manifest, raw, signature if isinstance(signature, str) else None)
        check_signing(artifact, devices)
        p = request.get("policy") if isinstance(request.get("policy"), dict) else {}
        try:
            policy = Policy(canary=parse_canary(p.get("canary", "1"), len(devices)),
                            wave_base=int(p.get("wave_base", 5)), wave_factor=float(p.get("wave_factor", 2.0)),
                            max_failure_pct=float(p.get("max_failure_pct", 10.0)),
                            min_executed=int(p.get("min_executed", 5)),
                            device_timeout_s=float(p.get("device_timeout_s", 300.0)),
                            rollback_on_abort=bool(p.get("rollback_on_abort", True)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"deploy request policy: {exc}") from exc
        rollout, _ = create_deploy(self._store, artifact, devices, policy, url, None if url else "controller",
                                   str(self.settings.broker), force=force, owner=self.controller_id, target=target)
        return rollout.id


def _release_quietly(store: Store, rollout_id: str, owner: str) -> None:
    try:
        store.release(rollout_id, owner)
    except EdgefleetError:
        pass  # the lease expires by itself


class _QueueReader:
    """The ``messages`` attribute drain_into reads, over the controller's feed queue."""

    def __init__(self, feed: queue.SimpleQueue[Message]) -> None:
        self.messages = feed


class _RegistryTee:
    """drain_into feeds one registry; the controller feeds its registry and the exporter's index."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def ingest(self, msg: Message) -> None:
        self.controller.ingest(msg)
