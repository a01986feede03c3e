"""``edge-agent run``: wires the model host, OTA, MQTT, outbox, telemetry, HTTP and sources.

Threads (none of them ever blocks an inference)::

    inference callers (HTTP handlers, directory source)  -> host.infer + Metrics.record (append only)
    telemetry        every interval: window stats + system stats -> emit queue
    emit-writer      emit queue -> outbox (SQLite, fsync)          -> wakes the forwarder
    outbox-forwarder outbox -> paho (QoS 1), deletes on PUBACK, rate limited
    paho loop        network I/O, birth on connect, commands -> command queue
    commands         CommandProcessor (dedup, TTL, rate) -> handlers -> reply
    OTA worker       (agent.ota) reports through emit_event

Shutdown (SIGTERM/SIGINT): stop inputs, take a last telemetry window, flush the outbox for a
few seconds, publish the retained offline state, disconnect, close the model and the database.
systemd: READY=1 once serving, WATCHDOG=1 from the main loop (``sd_notify`` over the
``NOTIFY_SOCKET`` datagram socket, no dependency).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, load_config
from agent.http import InferenceServer, ServingBackend, prometheus_lines
from agent.mqtt import Forwarder, Incoming, MqttLink
from agent.outbox import Outbox
from agent.sinks import JsonlSink, TopicSink, result_record
from agent.sources import DirectoryWatcher
from agent.telemetry import Metrics, SystemStats, summarize_output
from edgefleet import __version__
from edgefleet.atomic import atomic_write_json
from edgefleet.commands import CommandProcessor, CommandRejected
from edgefleet.errors import ConfigError, EdgefleetError
from edgefleet.messages import encode
from edgefleet.profiles import Profile, load_profile
from edgefleet.topics import (
    device_cmd_topic,
    events_topic,
    group_cmd_topic,
    parse_cmd_topic,
    response_topic,
    results_topic,
    state_topic,
    telemetry_topic,
)

__all__ = ["AgentService", "cmd_run", "sd_notify"]

log = logging.getLogger(__name__)

EMIT_QUEUE_MAX = 10_000
"""Messages waiting for the outbox writer; beyond it new ones are dropped and counted."""
FLUSH_ON_STOP_S = 3.0


def sd_notify(message: str) -> bool:
    """Tell systemd ``message`` (READY=1, WATCHDOG=1, STOPPING=1); False outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)
        return False


def _read_secret(path: Path | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        if path.stat().st_mode & 0o077:
            log.warning("%s %s is readable by other users; chmod 0600 it", what, path)
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror or exc}") from exc


_CACHE_KEYS = ("enabled", "hit_rate", "exact_hits", "near_hits", "misses", "disagreement_rate", "threshold",
               "reason")


def _cache_summary(stats: dict[str, Any] | None) -> dict[str, Any]:
    """The cache figures telemetry carries (the engine's full stats are in the status command)."""
    if not stats:
        return {"enabled": False}
    return {k: stats[k] for k in _CACHE_KEYS if k in stats}


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
        self._emit_q: queue.Queue[tuple[str, str, dict[str, Any]] | None] = queue.Queue(EMIT_QUEUE_MAX)
        self._cmd_q: queue.Queue[Incoming | None] = queue.Queue(256)
        self._stop = threading.Event()
        self._telemetry_wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._state_changed = False  # set by an OTA commit/rollback: republish the retained state
        self._cache_setting: bool | dict[str, Any] = self._initial_cache()

    # -- start-up -----------------------------------------------------------------------------
    def _initial_cache(self) -> bool | dict[str, Any]:
        c = self.cfg.cache
        enabled = self.profile.cache.enabled if c.enabled is None else c.enabled
        if not enabled:
            return False
        overrides = {k: v for k, v in (("near_threshold", c.near_threshold), ("max_age_s", c.max_age_s))
                     if v is not None}
        return overrides or True

    def _prepare_state_dir(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            boot_file = self.state_dir / "boot.json"
            previous = 0
            if boot_file.is_file():
                import json

                try:
                    previous = int(json.loads(boot_file.read_text()).get("boot", 0))
                except (ValueError, AttributeError, TypeError):
                    log.warning("%s unreadable; boot counter restarts", boot_file)
            self.boot = previous + 1
            atomic_write_json(boot_file, {"boot": self.boot})
        except OSError as exc:
            raise ConfigError(f"state_dir {self.state_dir}: {exc.strerror or exc}") from exc

    def _start_model(self) -> None:
        from agent.host import ModelHost

        self.host = ModelHost(self.profile, cache=self._cache_setting)
        try:
            from agent.ota import OtaManager  # the OTA part; absent in early builds
        except ImportError:
            OtaManager = None
        if OtaManager is not None:
            from edgefleet.signing import load_trusted_keys

            keys = load_trusted_keys(self.cfg.trusted_keys) if self.cfg.trusted_keys else []
            self.ota = OtaManager(self.state_dir / "ota", self.profile, keys, self.host, self.emit_event)
            self.ota.boot()
            if self.host.model_info is None and self.cfg.model is not None:
                self.ota.install_initial(self.cfg.model)
            boot_error = getattr(self.ota, "boot_error", None)
            if boot_error and self.host.model_info is None:
                # Keep running without a model: an update command can still repair the device.
                self.emit_event({"event": "model_error", "reason": str(boot_error).splitlines()[0]})
        elif self.cfg.model is not None:
            self._activate_plain(self.cfg.model)

    def _activate_plain(self, model: Path) -> None:
        manifest = None
        if model.is_dir():
            from edgefleet.manifest import load_manifest

            manifest = load_manifest(model)[0]
        self.host.activate(model, manifest)

    def start(self) -> None:
        cfg = self.cfg
        self._prepare_state_dir()
        password = _read_secret(cfg.broker.password_file, "broker.password_file")
        self.outbox = Outbox(self.state_dir / "outbox.sqlite", cfg.outbox.max_rows, cfg.outbox.max_bytes)
        self.forwarder = Forwarder(self.outbox, max_inflight=cfg.outbox.max_inflight,
                                   drain_per_s=cfg.outbox.drain_per_s, resend_after_s=cfg.outbox.resend_after_s)
        self.commands = CommandProcessor(
            cfg.device_id, {"status": self._cmd_status, "update": self._cmd_update,
                            "rollback": self._cmd_rollback, "config": self._cmd_config},
            memory_path=self.state_dir / "commands.json", remember=cfg.commands.remember,
            rate_per_min=cfg.commands.rate_per_min, max_ttl_s=cfg.commands.max_ttl_s)
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
        address = cfg.http.address
        if address is not None:
            self.http = InferenceServer(address, ServingBackend(
                infer=self.infer, model_info=self.model_info, input_names=self._input_names,
                metrics_text=self.metrics_text), cfg.http.max_body_bytes, cfg.http.max_instances,
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

        Raises:
            InputError / ModelError: from the host.
        """
        t0 = time.perf_counter()
        try:
            out = self.host.infer(x)
        except EdgefleetError:
            self.metrics.record(time.perf_counter() - t0, None, True, samples)
            raise
        self.metrics.record(time.perf_counter() - t0, out, False, samples)
        return out

    def _process_file(self, path: Path, x: Any) -> None:
        t0 = time.perf_counter()
        out = self.infer(x, "directory")
        latency_ms = (time.perf_counter() - t0) * 1000.0
        if self.sinks:
            top1, conf = summarize_output(out)
            record = result_record("directory", path.name, out, latency_ms, self.model_info(), time.time(),
                                   top1, conf)
            for sink in self.sinks:
                sink.write(record)

    def model_info(self) -> dict[str, str] | None:
        return self.host.model_info if self.host is not None else None

    def _engine(self) -> Any:
        return getattr(self.host, "engine", None) if self.host is not None else None

    def _input_names(self) -> list[str]:
        engine = self._engine()
        return [t.name for t in engine.input_details] if engine is not None else []

    def _input_shape(self) -> tuple[int, ...] | None:
        engine = self._engine()
        if engine is None or not engine.input_details:
            return None
        return tuple(engine.input_details[0].shape)

    def _input_range(self) -> tuple[float, float] | None:
        manifest = self.host.manifest if self.host is not None else None
        return manifest.preprocessing.input_range if manifest is not None else None

    # -- state, events, telemetry -------------------------------------------------------------
    def state_payload(self, online: bool) -> dict[str, Any]:
        engine = self._engine()
        accelerator = getattr(engine, "accelerator", None) or self.profile.runtime.accelerator
        return {"online": online, "device_id": self.cfg.device_id, "group": self.cfg.group,
                "profile": self.profile.name, "agent_version": __version__, "model": self.model_info(),
                "accelerator": accelerator, "boot": self.boot, "ts": round(time.time(), 3),
                "signed_updates": bool(self.cfg.trusted_keys)}

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
        body = {"ts": round(time.time(), 3), **event}
        if body.get("event") == "ota" and body.get("state") in ("committed", "rolled_back"):
            self._state_changed = True
        self._enqueue("events", events_topic(self.cfg.device_id), body)

    def _enqueue(self, stream: str, topic: str, body: dict[str, Any]) -> None:
        try:
            self._emit_q.put_nowait((stream, topic, body))
        except queue.Full:
            self.emit_dropped += 1

    def _emit_loop(self) -> None:
        assert self.outbox is not None and self.forwarder is not None
        while True:
            item = self._emit_q.get()
            if item is None:
                return
            stream, topic, body = item
            try:
                self.outbox.append(topic, body, stream)
            except Exception:  # disk full or similar: keep the agent running, count the loss
                log.exception("outbox append failed")
                self.emit_dropped += 1
                continue
            self.forwarder.notify()
            if self._state_changed:
                self._state_changed = False
                self.publish_state()

    def telemetry_payload(self) -> dict[str, Any]:
        window = self.metrics.take_window()
        stats: dict[str, Any] = self.host.stats() if self.host is not None else {}
        engine_stats = stats.get("engine") or {}
        manifest = self.host.manifest if self.host is not None else None
        assert self.outbox is not None
        return {
            "ts": round(time.time(), 3), **window.to_json(),
            "cache": _cache_summary(engine_stats.get("cache")),
            **self.system.sample(),
            "model": self.model_info(),
            "drift": self.metrics.drift(manifest.baseline if manifest is not None else None),
            "outbox": {"pending": self.outbox.pending(), "dropped": self.outbox.dropped() + self.emit_dropped},
        }

    def _telemetry_loop(self) -> None:
        while not self._stop.is_set():
            self._telemetry_wake.wait(self.telemetry_interval_s)
            self._telemetry_wake.clear()
            if self._stop.is_set():
                return
            try:
                self._enqueue("telemetry", telemetry_topic(self.cfg.device_id), self.telemetry_payload())
            except Exception:
                log.exception("telemetry collection failed")

    def set_telemetry_interval(self, seconds: float) -> None:
        """Change the telemetry period now (the current wait is cut short)."""
        self.telemetry_interval_s = seconds
        self._telemetry_wake.set()

    def metrics_text(self) -> str:
        m = self.metrics
        info = self.model_info() or {}
        labels = f'{{device_id="{self.cfg.device_id}",model="{info.get("name", "")}",' \
                 f'version="{info.get("version", "")}"}}'
        engine_stats = (self.host.stats().get("engine") or {}) if self.host is not None else {}
        lat = engine_stats.get("latency_ms") or {}
        cache = engine_stats.get("cache") or {}
        return prometheus_lines({
            "edgefleet_inferences_total": ("counter", "Inferences served (closed telemetry windows)",
                                           engine_stats.get("inferences", m.total_inferences)),
            "edgefleet_inference_errors_total": ("counter", "Failed inferences", m.total_errors),
            "edgefleet_latency_p50_ms": ("gauge", "Median latency of recent inferences, ms", lat.get("p50")),
            "edgefleet_latency_p95_ms": ("gauge", "95th percentile latency, ms", lat.get("p95")),
            "edgefleet_latency_p99_ms": ("gauge", "99th percentile latency, ms", lat.get("p99")),
            "edgefleet_cache_hit_rate": ("gauge", "Cache hit rate, 0..1", cache.get("hit_rate")),
            "edgefleet_outbox_pending": ("gauge", "Messages waiting for the broker",
                                         self.outbox.pending() if self.outbox else None),
            "edgefleet_outbox_dropped_total": ("counter", "Messages dropped because the outbox was full",
                                               self.outbox.dropped() if self.outbox else None),
            "edgefleet_mqtt_connected": ("gauge", "1 when connected to the broker",
                                         1 if self.link is not None and self.link.connected else 0),
            "edgefleet_boot": ("gauge", "Boot counter", self.boot),
        }, labels)

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
            topic = msg.response_topic or response_topic(self.cfg.device_id, name)
            if self.link is not None:
                try:
                    self.link.reply(topic, encode(reply), msg.correlation_data)
                except ValueError as exc:
                    log.warning("cannot send the reply to %s: %s", topic, exc)

    def _cmd_status(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.outbox is not None
        return {"state": self.state_payload(True), "uptime_s": round(time.time() - self.started_at, 1),
                "host": self.host.stats() if self.host is not None else None,
                "ota": self.ota.status() if self.ota is not None else None,
                "outbox": {"pending": self.outbox.pending(), "dropped": self.outbox.dropped()},
                "telemetry": {"interval_s": self.telemetry_interval_s},
                "cache": self._cache_setting,
                "mqtt": {"protocol": self.link.protocol if self.link else None}}

    def _cmd_update(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.ota is None:
            raise CommandRejected("update not available: this agent has no OTA manager")
        return dict(self.ota.handle_update(cmd) or {})

    def _cmd_rollback(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.ota is None:
            raise CommandRejected("rollback not available: this agent has no OTA manager")
        return dict(self.ota.handle_rollback(cmd) or {})

    def _cmd_config(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Change the telemetry interval and the cache at run time (not persisted: agent.yaml wins)."""
        extra = sorted(set(cmd) - {"id", "ts", "ttl_s", "telemetry", "cache"})
        if extra:
            raise CommandRejected(f"config: unknown keys {extra}; expected 'telemetry' and/or 'cache'")
        applied: dict[str, Any] = {}
        telemetry = cmd.get("telemetry")
        cache = cmd.get("cache")
        interval = None
        if telemetry is not None:
            if not isinstance(telemetry, dict) or set(telemetry) - {"interval_s"}:
                raise CommandRejected("config.telemetry: expected {\"interval_s\": seconds}")
            interval = telemetry.get("interval_s")
            if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0.1 <= interval <= 86_400:
                raise CommandRejected(f"config.telemetry.interval_s: expected 0.1..86400 seconds, got {interval!r}")
        new_cache: bool | dict[str, Any] | None = None
        if cache is not None:
            new_cache = self._parse_cache(cache)
        if interval is not None:
            self.set_telemetry_interval(float(interval))
            applied["telemetry"] = {"interval_s": float(interval)}
        if new_cache is not None:
            self._apply_cache(new_cache)
            applied["cache"] = new_cache
        return {"applied": applied}

    def _parse_cache(self, cache: Any) -> bool | dict[str, Any]:
        if not isinstance(cache, dict):
            raise CommandRejected("config.cache: expected an object such as {\"enabled\": false}")
        allowed = {"enabled", "near_threshold", "max_age_s", "max_consecutive", "verify_fraction",
                   "target_disagreement"}
        extra = sorted(set(cache) - allowed)
        if extra:
            raise CommandRejected(f"config.cache: unknown keys {extra}; expected some of {sorted(allowed)}")
        enabled = cache.get("enabled", self._cache_setting is not False)
        if not isinstance(enabled, bool):
            raise CommandRejected("config.cache.enabled: expected true or false")
        if not enabled:
            return False
        overrides = dict(self._cache_setting) if isinstance(self._cache_setting, dict) else {}
        overrides.update({k: v for k, v in cache.items() if k != "enabled"})
        from agent.cache import CacheConfig

        try:
            CacheConfig.from_profile(self.profile, **overrides)
        except (ConfigError, TypeError) as exc:
            raise CommandRejected(f"config.cache: {exc}") from exc
        return overrides or True

    def _apply_cache(self, setting: bool | dict[str, Any]) -> None:
        """Rebuild the active engine with the new cache setting (a hot swap: no request fails).

        Refused while an update or rollback is in flight: probation keeps the previous engine
        loaded, and a reload now would drop it.
        """
        if self.ota is not None and self.ota.status().get("pending") is not None:
            raise CommandRejected("config.cache: busy: an update or rollback is in flight, retry when it is done")
        host = self.host
        host.set_cache(setting)
        self._cache_setting = setting
        engine = self._engine()
        if engine is not None and getattr(engine, "source", None) and Path(engine.source).exists():
            try:
                host.activate(engine.source, host.manifest)
            except EdgefleetError as exc:
                raise CommandRejected(f"config.cache: cannot reload the model: {exc}") from exc

    # -- shutdown -----------------------------------------------------------------------------
    def run_forever(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, feeding the systemd watchdog meanwhile."""
        sd_notify("READY=1")
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        tick = min(1.0, watchdog_usec / 2e6) if watchdog_usec else 1.0
        while not stop.wait(tick):
            if watchdog_usec:
                sd_notify("WATCHDOG=1")
        sd_notify("STOPPING=1")

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
    return 0

