"""``AgentService``: builds the parts, runs their threads, and stops them in order.

The parts' jobs live elsewhere: commands in :mod:`agent.service.handlers`, what the agent
reports in :mod:`agent.service.reporting`, systemd in :mod:`agent.service.systemd`. This module
is the wiring, the inference entry point and the two queues (emit, commands).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, load_config
from agent.engine import call_deadline_s, last_latency_s
from agent.http import InferenceServer, ServingBackend
from agent.mqtt import Forwarder, Incoming, MqttLink
from agent.outbox import Outbox
from agent.service import handlers, reporting
from agent.service.statefiles import bump_boot_counter, read_secret
from agent.service.systemd import serve_until
from agent.sinks import JsonlSink, TopicSink, result_record
from agent.sources import DirectoryWatcher
from agent.telemetry import Metrics, SystemStats, summarize_output
from edgefleet import __version__
from edgefleet.commands import CommandProcessor, reply_topic
from edgefleet.errors import ArtifactError, EdgefleetError
from edgefleet.messages import encode
from edgefleet.profiles import CacheSettings, Profile, load_profile
from edgefleet.signing import load_trusted_keys
from edgefleet.statements import NonceLedger
from edgefleet.topics import (
    device_cmd_topic,
    events_topic,
    group_cmd_topic,
    parse_cmd_topic,
    results_topic,
    state_topic,
    telemetry_topic,
)

__all__ = ["AgentService", "cmd_run"]

log = logging.getLogger(__name__)

EMIT_QUEUE_MAX = 10_000
"""Messages waiting for the outbox writer; beyond it new ones are dropped and counted."""
FLUSH_ON_STOP_S = 3.0
EVIDENCE_FILE = "cache-evidence.json"
"""In state_dir: the active model's cache evidence, for its next start on this camera (docs/cache.md)."""
RESTART_EXIT_CODE = 75
"""Exit status (EX_TEMPFAIL) after a committed model hung and the journal was pointed back at the
previous kept model: the unit's ``Restart=on-failure`` starts the agent again, on that model."""

_Emit = tuple[str, str, dict[str, Any]]
_REPUBLISH_STATE = ("state", "", {})
"""Emit-queue marker: republish the retained state once the events queued before it are stored."""


class AgentService:
    """The running agent. ``start()``, then ``stop()`` (idempotent).

    Raises (from ``start``):
        ConfigError: bad profile, unreadable password/keys, state_dir not writable, port in use.
        ModelError / ArtifactError: the initial model cannot be loaded.
    """

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.profile: Profile = load_profile(cfg.profile)
        self.state_dir = Path(cfg.state_dir)
        self.metrics = Metrics(cfg.telemetry.drift_window)
        self.telemetry_interval_s = cfg.telemetry.interval_s
        self.started_at = time.time()
        self.boot = 0
        self.host: Any = None
        self.ota: Any = None
        self.outbox: Outbox | None = None
        self.forwarder: Forwarder | None = None
        self.link: MqttLink | None = None
        self.http: InferenceServer | None = None
        self.source: DirectoryWatcher | None = None
        self.sinks: list[Any] = []
        self.emit_dropped = 0
        self._emit_q: queue.Queue[_Emit | None] = queue.Queue(EMIT_QUEUE_MAX)
        self._cmd_q: queue.Queue[Incoming | None] = queue.Queue(256)
        self._stop = threading.Event()
        self._telemetry_wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self.approved_cache: CacheSettings = handlers.approved_cache(
            self.profile, cfg.cache.model_dump(exclude_none=True))
        """profile + agent.yaml: what an unsigned config command may only make stricter."""
        self.cache: CacheSettings = self.approved_cache
        """The cache settings in use (the config command changes them; a restart returns to approved)."""
        inference = cfg.inference
        self.deadline_s = inference.deadline_s or call_deadline_s(
            self.profile, inference.deadline_factor, inference.deadline_floor_s)
        self.trusted_keys: list[Any] = []
        self.nonces: NonceLedger | None = None
        self.nonces_error: str | None = "not started"
        self.exit_code = 0
        self._run_stop: threading.Event | None = None

    # -- start-up -----------------------------------------------------------------------------
    def _start_model(self) -> None:
        from agent.host import ModelHost

        source = self.cfg.source
        self.host = ModelHost(self.profile, cache=self.cache, deadline_s=self.deadline_s,
                              evidence_file=self.state_dir / EVIDENCE_FILE if source.cache_evidence else None,
                              evidence_source=source.evidence_source)
        try:
            from agent.ota import OtaManager  # the OTA part; absent in early builds
        except ImportError:
            OtaManager = None
        if OtaManager is not None:
            self.ota = OtaManager(self.state_dir / "ota", self.profile, self.trusted_keys, self.host,
                                  self.emit_event, on_serving_changed=self._serving_changed,
                                  device_id=self.cfg.device_id, group=self.cfg.group, fleet=self.cfg.fleet,
                                  nonces=self.ledger, on_hung=self._restart_after_hang)
            self.ota.boot()
            if self.host.model_info is None and self.cfg.model is not None:
                self.ota.install_initial(self.cfg.model)
            boot_error = getattr(self.ota, "boot_error", None)
            if boot_error and self.host.model_info is None:
                # Keep running without a model: an update command can still repair the device.
                self.emit_event({"event": "model_error", "reason": str(boot_error).splitlines()[0]})
        elif self.cfg.model is not None:
            self._activate_plain(self.cfg.model)

    def _restart_after_hang(self, reason: str) -> None:
        """A committed model hung and the journal now names the previous one: stop, then exit for a restart.

        A call stuck inside the runtime cannot be stopped in this process; a fresh one serves the
        previous kept model with every core and interpreter free (docs/ota.md).
        """
        self.exit_code = RESTART_EXIT_CODE
        if self._run_stop is not None:
            self._run_stop.set()

    def _activate_plain(self, model: Path) -> None:
        manifest = None
        if model.is_dir():
            from edgefleet.manifest import load_manifest

            manifest = load_manifest(model)[0]
        self.host.activate(model, manifest)

    def start(self) -> None:
        cfg = self.cfg
        self.boot = bump_boot_counter(self.state_dir)
        password = read_secret(cfg.broker.password_file, "broker.password_file")
        self.outbox = Outbox(self.state_dir / "outbox.sqlite", cfg.outbox.max_rows, cfg.outbox.max_bytes)
        self.forwarder = Forwarder(self.outbox, max_inflight=cfg.outbox.max_inflight,
                                   drain_per_s=cfg.outbox.drain_per_s, resend_after_s=cfg.outbox.resend_after_s)
        self.commands = CommandProcessor(
            cfg.device_id, {name: functools.partial(fn, self) for name, fn in handlers.HANDLERS.items()},
            memory_path=self.state_dir / "commands.json", remember=cfg.commands.remember,
            rate_per_min=cfg.commands.rate_per_min, max_ttl_s=cfg.commands.max_ttl_s)
        self.trusted_keys = load_trusted_keys(cfg.trusted_keys) if cfg.trusted_keys else []
        self._open_nonces()
        self._start_model()
        self.system = SystemStats(self.state_dir)
        if cfg.sinks.jsonl is not None:
            self.sinks.append(JsonlSink(cfg.sinks.jsonl, cfg.sinks.jsonl_max_bytes))
        self.link = MqttLink(
            cfg.broker, client_id=f"edge-agent-{cfg.device_id}", password=password,
            will_topic=state_topic(cfg.device_id), will_payload=encode(self.state_payload(False)),
            subscriptions=[device_cmd_topic(cfg.device_id, "+"), group_cmd_topic(cfg.group, "+")],
            on_connected=self._on_connected, on_message=self._on_message,
            on_published=self.forwarder.on_published, max_inflight=cfg.outbox.max_inflight)
        self.forwarder.attach(self.link)
        if cfg.sinks.results_topic:
            link = self.link
            self.sinks.append(TopicSink(results_topic(cfg.device_id),
                                        lambda t, p, q, r: link.publish(t, p, qos=q, retain=r)))
        for name, target in (("emit-writer", self._emit_loop), ("telemetry", self._telemetry_loop),
                             ("commands", self._command_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.forwarder.start()
        self.emit_event({"event": "started", "boot": self.boot, "agent_version": __version__,
                         "model": self.model_info()})
        self.link.start()
        self._start_inputs()

    def ledger(self) -> NonceLedger:
        """The ledger of spent statement nonces.

        Raises:
            ArtifactError: it could not be read at start-up: every signed statement is refused.
        """
        if self.nonces is None:
            raise ArtifactError(f"signed statements refused: {self.nonces_error}")
        return self.nonces

    def _open_nonces(self) -> None:
        """The ledger of spent statement nonces; a damaged one refuses statements, never stops serving."""
        try:
            self.nonces, self.nonces_error = NonceLedger(self.state_dir / "statements.json"), None
        except ArtifactError as exc:
            self.nonces, self.nonces_error = None, str(exc)
            log.error("signed statements will be refused: %s", exc)  # also in the status reply

    def _start_inputs(self) -> None:
        cfg = self.cfg
        address = cfg.http.address
        if address is not None:
            self.http = InferenceServer(address, ServingBackend(
                infer=self.infer, model_info=self.model_info, input_names=self._input_names,
                metrics_text=self.metrics_text, health=self.health, tensors=self._tensors,
                input_range=self._input_range, labels=self._labels), cfg.http.max_body_bytes, cfg.http.max_instances,
                cfg.http.max_connections)
            self.http.start()
        if cfg.source.type == "directory":
            assert cfg.source.path is not None
            self.source = DirectoryWatcher(
                cfg.source.path, self._process_file, input_shape=self._input_shape,
                input_range=self._input_range, after=cfg.source.after,
                poll_interval_s=cfg.source.poll_interval_s, max_file_bytes=cfg.source.max_file_bytes,
                settle_s=cfg.source.settle_s)
            self.source.start()

    # -- the inference path -------------------------------------------------------------------
    def infer(self, x: Any, source: str = "api", samples: int = 1) -> Any:
        """Run one inference (or a batch of ``samples``) on the active model and count it.

        The latency recorded is the engine's own measurement of this call (no second clock).

        Raises:
            InputError / ModelError: from the host.
        """
        try:
            out = self.host.infer(x)
        except EdgefleetError:
            self.metrics.record(0.0, None, True, samples)  # an error's latency is not kept
            raise
        self.metrics.record(last_latency_s() or 0.0, out, False, samples)
        return out

    def _process_file(self, path: Path, x: Any) -> None:
        out = self.infer(x, "directory")
        if self.sinks:
            latency_ms = (last_latency_s() or 0.0) * 1000.0
            top1, conf = summarize_output(out)
            record = result_record("directory", path.name, out, latency_ms, self.model_info(), time.time(),
                                   top1, conf)
            for sink in self.sinks:
                sink.write(record)

    def model_info(self) -> dict[str, str] | None:
        return self.host.model_info if self.host is not None else None

    def engine(self) -> Any:
        """The active engine (None before a model is serving); read its details, never close it."""
        return getattr(self.host, "engine", None) if self.host is not None else None

    def health(self) -> dict[str, Any]:
        """The active engine's stuck-call report (``/healthz``, status, telemetry); ok without a model."""
        engine = self.engine()
        return engine.health() if engine is not None else {"ok": True, "stuck_workers": 0}

    def _input_names(self) -> list[str]:
        engine = self.engine()
        return [t.name for t in engine.input_details] if engine is not None else []

    def _input_shape(self) -> tuple[int, ...] | None:
        engine = self.engine()
        if engine is None or not engine.input_details:
            return None
        return tuple(engine.input_details[0].shape)

    def _manifest(self) -> Any:
        return self.host.manifest if self.host is not None else None

    def _input_range(self) -> tuple[float, float] | None:
        manifest = self._manifest()
        return manifest.preprocessing.input_range if manifest is not None else None

    def _tensors(self) -> tuple[Any, Any] | None:
        """The active model's inputs and outputs (REST metadata, value bounds, image sizes)."""
        engine = self.engine()
        return (engine.input_details, engine.output_details) if engine is not None else None

    def _labels(self) -> list[str] | None:
        manifest = self._manifest()
        return manifest.labels if manifest is not None else None

    # -- state, events, telemetry -------------------------------------------------------------
    def state_payload(self, online: bool) -> dict[str, Any]:
        return reporting.state_payload(self, online)

    def telemetry_payload(self) -> dict[str, Any]:
        return reporting.telemetry_payload(self)

    def metrics_text(self) -> str:
        return reporting.metrics_text(self)

    def publish_state(self) -> None:
        """Publish the retained birth again (after a model change) and refresh the Last Will."""
        if self.link is None:
            return
        self.link.set_will(encode(self.state_payload(False)))
        self.link.publish(state_topic(self.cfg.device_id), encode(self.state_payload(True)), qos=1, retain=True)

    def _on_connected(self) -> None:
        assert self.link is not None and self.forwarder is not None
        self.link.publish(state_topic(self.cfg.device_id), encode(self.state_payload(True)), qos=1, retain=True)
        self.forwarder.notify()

    def emit_event(self, event: dict[str, Any]) -> None:
        """Queue a lifecycle or OTA event; ``seq`` and ``ts`` are added here (OTA's callback).

        Never blocks: when the writer is this far behind, the event is dropped and counted.
        """
        self._enqueue(("events", events_topic(self.cfg.device_id), {"ts": round(time.time(), 3), **event}))

    def _serving_changed(self) -> None:
        """OTA committed or rolled back: republish the state after the outcome event (queued first)."""
        self._enqueue(_REPUBLISH_STATE)

    def _enqueue(self, item: _Emit) -> None:
        try:
            self._emit_q.put_nowait(item)
        except queue.Full:
            self.emit_dropped += 1

    def _emit_loop(self) -> None:
        assert self.outbox is not None and self.forwarder is not None
        while True:
            item = self._emit_q.get()
            if item is None:
                return
            if item is _REPUBLISH_STATE:
                self.publish_state()
                continue
            stream, topic, body = item
            try:
                self.outbox.append(topic, body, stream)
            except Exception:  # disk full or similar: keep the agent running, count the loss
                log.exception("outbox append failed")
                self.emit_dropped += 1
                continue
            self.forwarder.notify()

    def _telemetry_loop(self) -> None:
        while not self._stop.is_set():
            self._telemetry_wake.wait(self.telemetry_interval_s)
            self._telemetry_wake.clear()
            if self._stop.is_set():
                return
            try:
                self._enqueue(("telemetry", telemetry_topic(self.cfg.device_id), self.telemetry_payload()))
            except Exception:
                log.exception("telemetry collection failed")
            if self.host is not None:
                self.host.save_evidence(force=False)  # at most every EVIDENCE_SAVE_S; never raises

    def set_telemetry_interval(self, seconds: float) -> None:
        """Change the telemetry period now (the current wait is cut short)."""
        self.telemetry_interval_s = seconds
        self._telemetry_wake.set()

    # -- commands -----------------------------------------------------------------------------
    def _on_message(self, msg: Incoming) -> None:
        try:
            self._cmd_q.put_nowait(msg)
        except queue.Full:
            log.warning("command queue full; dropping a message on %s", msg.topic)

    def _command_loop(self) -> None:
        while True:
            msg = self._cmd_q.get()
            if msg is None:
                return
            name = parse_cmd_topic(msg.topic, self.cfg.device_id, self.cfg.group)
            if name is None:
                continue
            reply = self.commands.handle(name, msg.payload)
            topic = reply_topic(msg.payload, msg.response_topic, self.cfg.device_id, name)
            if self.link is not None:
                try:
                    self.link.reply(topic, encode(reply), msg.correlation_data)
                except ValueError as exc:
                    log.warning("cannot send the reply to %s: %s", topic, exc)

    # -- shutdown -----------------------------------------------------------------------------
    def run_forever(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, feeding the systemd watchdog while inference makes progress."""
        self._run_stop = stop
        if self.exit_code:  # a hung model was given up during start-up
            stop.set()
        serve_until(stop, self.engine)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.source is not None:
            self.source.stop()
        if self.http is not None:
            self.http.stop()
        self._stop.set()
        self._telemetry_wake.set()
        if self.ota is not None:
            try:
                self.ota.close()
            except Exception:
                log.exception("OTA manager close failed")
        self.emit_event({"event": "stopping", "boot": self.boot})
        self._emit_q.put(None)
        self._cmd_q.put(None)
        for thread in self._threads:
            thread.join(5)
        if self.forwarder is not None:
            self.forwarder.flush(FLUSH_ON_STOP_S if self.link is not None and self.link.connected else 0.0)
            self.forwarder.stop()
        if self.link is not None:
            self.link.stop(final=(state_topic(self.cfg.device_id), encode(self.state_payload(False))))
        for sink in self.sinks:
            sink.close()
        if self.host is not None:
            self.host.close()
        if self.outbox is not None:
            self.outbox.close()


def cmd_run(args: argparse.Namespace) -> int:
    """``edge-agent run --config agent.yaml``: serve until SIGTERM/SIGINT, then stop cleanly."""
    cfg = load_config(args.config)
    service = AgentService(cfg)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service.start()
        service.run_forever(stop)
    finally:
        service.stop()
    if service.exit_code:
        logging.shutdown()
        os._exit(service.exit_code)  # a thread stuck inside the runtime can be neither joined nor finalized
    return 0
