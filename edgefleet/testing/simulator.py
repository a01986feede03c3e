"""A light device simulator that speaks the device side of the MQTT contract, many devices per process.

No model runs here: a simulated device publishes a retained ``state``, optional ``telemetry``,
answers ``update`` / ``rollback`` / ``status`` / ``config`` commands (to the MQTT 5 Response Topic
with Correlation Data, else ``.../cmd/{name}/response``), drops repeated command ids, and walks
the OTA states as ``ota`` events. What an update ends in is configurable per target version:

    commit    queued .. probation, committed (the device now runs the new version)
    reject    queued, downloading, verifying, rejected   (e.g. a bad golden check)
    fail      queued, downloading, failed
    rollback  queued .. probation, rolled_back           (health check failed in probation)
    refuse    the command reply is ok: false
    silent    never answers

All devices share one MQTT connection, so unlike a real agent there is no per-device Last Will:
``stop()`` publishes the offline states itself. Used by the tests, the benchmark and the demo
(``python -m edgefleet.testing.simulator`` or ``edge-fleet simulate``).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import queue
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.errors import ConfigError, EdgefleetError
from edgefleet.messages import decode
from edgefleet.mqtt import Message, MqttClient, parse_broker_url
from edgefleet.topics import (
    ROOT,
    events_topic,
    parse_device_topic,
    response_topic,
    state_topic,
    telemetry_topic,
)

__all__ = ["OUTCOMES", "Simulator", "main", "write_placeholder_artifact"]

OUTCOMES = ("commit", "reject", "fail", "rollback", "refuse", "silent")
_STEPS = {
    "commit": ("queued", "downloading", "verifying", "validating", "installing", "probation", "committed"),
    "reject": ("queued", "downloading", "verifying", "rejected"),
    "fail": ("queued", "downloading", "failed"),
    "rollback": ("queued", "downloading", "verifying", "validating", "installing", "probation", "rolled_back"),
}
_REASONS = {"rejected": "golden outputs differ from the manifest (simulated)",
            "failed": "download failed (simulated)",
            "rolled_back": "probation: NaN outputs (simulated)"}
_MAX_SEEN = 64


@dataclass
class _Device:
    device_id: str
    group: str
    profile: str
    model: dict[str, Any] | None
    previous: list[dict[str, Any]] = field(default_factory=list)
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)  # command id -> reply
    seq: int = 0
    busy: bool = False


class Simulator:
    """``count`` simulated devices named ``{prefix}-{i:05d}`` on one broker connection."""

    def __init__(self, broker: str, count: int = 10, prefix: str = "sim", group: str = "sim",
                 profile: str = "rpi4", model_name: str = "demo", model_version: str | None = "1",
                 outcomes: dict[str, str] | None = None, step_delay: float = 0.02,
                 telemetry_interval: float = 0.0, download: bool = False, signed_updates: bool | None = None,
                 trusted_keys: Sequence[Path] = (), groups: int = 1,
                 outcome_for: Callable[[str, str], str | None] | None = None) -> None:
        self.url = parse_broker_url(broker)
        self.outcomes = {"*": "commit", **(outcomes or {})}
        for value in self.outcomes.values():
            if value not in OUTCOMES:
                raise ConfigError(f"simulator outcome {value!r}: expected one of {', '.join(OUTCOMES)}")
        self.outcome_for = outcome_for  # (device_id, version) -> outcome, or None for the default
        self.step_delay = step_delay
        self.telemetry_interval = telemetry_interval
        self.download = download
        self.signed_updates = signed_updates
        self.trusted: list[Any] = []
        if trusted_keys:
            from edgefleet.signing import load_trusted_keys

            self.trusted = load_trusted_keys(trusted_keys)
        model = None
        if model_version is not None:
            model = {"name": model_name, "version": model_version, "sha256": hashlib.sha256(
                f"{model_name}-{model_version}".encode()).hexdigest()}
        self.devices: dict[str, _Device] = {}
        for i in range(count):
            g = group if groups <= 1 else f"{group}-{i % groups}"
            did = f"{prefix}-{i:05d}"
            self.devices[did] = _Device(did, g, profile, dict(model) if model else None)
        self.commands_received = 0
        self.received: dict[str, list[tuple[str, str]]] = {}  # device -> [(command, id)] in arrival order
        self.downloads = 0
        self._client = MqttClient(self.url, client_id=f"sim-{prefix}-{id(self) & 0xffff:x}",
                                   on_message=self._on_message)
        self._inbox: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_cv = threading.Condition()
        self._counter = itertools.count()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sim-dl") if download else None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Simulator:
        self._client.connect()
        births = [self._publish_state(dev, online=True) for dev in self.devices.values()]
        self._client.flush(births, timeout=max(30.0, len(births) / 200))
        groups = sorted({d.group for d in self.devices.values()})
        self._client.subscribe([f"{ROOT}/devices/+/cmd/+"] + [f"{ROOT}/groups/{g}/cmd/+" for g in groups])
        for target in (self._dispatch_loop, self._timer_loop):
            t = threading.Thread(target=target, daemon=True, name=f"sim-{target.__name__}")
            t.start()
            self._threads.append(t)
        if self.telemetry_interval > 0:
            n = max(1, len(self.devices))
            for i, dev in enumerate(self.devices.values()):
                self._later(self.telemetry_interval * (i / n), lambda d=dev: self._telemetry_tick(d))
        return self

    def stop(self, clear: bool = False) -> None:
        """Publish every device offline (or clear its retained state) and disconnect."""
        self._stop.set()
        self._inbox.put(None)
        with self._timer_cv:
            self._timer_cv.notify_all()
        for t in self._threads:
            t.join(5)
        if self._pool:
            self._pool.shutdown(wait=False, cancel_futures=True)
        infos = []
        for dev in self.devices.values():
            if clear:
                infos.append(self._client.publish(state_topic(dev.device_id), b"", retain=True))
            else:
                infos.append(self._publish_state(dev, online=False))
        try:
            self._client.flush(infos, timeout=30)
        finally:
            self._client.close()

    def __enter__(self) -> Simulator:  # noqa: PYI034 (py3.10: no typing.Self)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(clear=True)

    # -- queries for tests -------------------------------------------------------------------
    def version_of(self, device_id: str) -> str | None:
        with self._lock:
            model = self.devices[device_id].model
            return model["version"] if model else None

    def versions(self) -> dict[str, str | None]:
        return {d: self.version_of(d) for d in self.devices}

    # -- plumbing ----------------------------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        self._inbox.put(msg)

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._timer_cv:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._counter), fn))
            self._timer_cv.notify()

    def _timer_loop(self) -> None:
        while not self._stop.is_set():
            with self._timer_cv:
                while not self._stop.is_set() and (not self._timers or self._timers[0][0] > time.monotonic()):
                    wait = self._timers[0][0] - time.monotonic() if self._timers else 1.0
                    self._timer_cv.wait(max(0.0, min(wait, 1.0)))
                if self._stop.is_set():
                    return
                _, _, fn = heapq.heappop(self._timers)
            fn()

    def _dispatch_loop(self) -> None:
        while True:
            msg = self._inbox.get()
            if msg is None or self._stop.is_set():
                return
            try:
                self._handle(msg)
            except (ValueError, KeyError, TypeError, EdgefleetError):
                continue  # a malformed command: a real device would log and ignore it

    def _publish_state(self, dev: _Device, online: bool) -> Any:
        payload: dict[str, Any] = {"online": online, "device_id": dev.device_id, "group": dev.group,
                                   "profile": dev.profile, "agent_version": "sim-0.1", "model": dev.model,
                                   "accelerator": "cpu", "boot": 0, "ts": time.time()}
        if self.signed_updates is not None:
            payload["signed_updates"] = self.signed_updates
        return self._client.publish(state_topic(dev.device_id), payload, retain=True)

    def _event(self, dev: _Device, **fields: Any) -> None:
        with self._lock:
            dev.seq += 1
            seq = dev.seq
        self._client.publish(events_topic(dev.device_id), {"seq": seq, "ts": time.time(), "event": "ota", **fields})

    def _telemetry_tick(self, dev: _Device) -> None:
        with self._lock:
            dev.seq += 1
            seq = dev.seq
        n = 100 + (seq % 7)
        self._client.publish(telemetry_topic(dev.device_id), {
            "seq": seq, "ts": time.time(), "window_s": self.telemetry_interval, "inferences": n,
            "throughput": n / self.telemetry_interval, "latency_ms": {"p50": 4.0, "p95": 6.5, "p99": 9.0},
            "cache": {"enabled": True, "hit_rate": 0.25, "exact_hits": n // 4, "near_hits": 0,
                      "misses": n - n // 4}, "errors": 0, "cpu_percent": 20.0,
            "rss_mb": 60.0, "temp_c": None, "disk_free_mb": 1000.0, "model": dev.model,
            "drift": {"samples": n, "tvd": 0.01, "confidence_delta": 0.0, "mean_confidence": 0.9}}, qos=0)
        if not self._stop.is_set():
            self._later(self.telemetry_interval, lambda: self._telemetry_tick(dev))

    def _handle(self, msg: Message) -> None:
        parts = msg.topic.split("/")
        name = parts[-1]
        if parts[2] == "groups":
            targets = [d for d in self.devices.values() if d.group == parts[3]]
        else:
            parsed = parse_device_topic(msg.topic)
            dev = self.devices.get(parsed[0]) if parsed else None
            targets = [dev] if dev else []
        if not targets:
            return
        cmd = decode(msg.payload)
        for dev in targets:
            self._command(dev, name, cmd, msg)

    def _reply(self, dev: _Device, name: str, reply: dict[str, Any], msg: Message) -> None:
        topic = msg.response_topic or response_topic(dev.device_id, name)
        self._client.publish(topic, reply, correlation=msg.correlation)

    def _command(self, dev: _Device, name: str, cmd: dict[str, Any], msg: Message) -> None:
        self.commands_received += 1
        cid = str(cmd.get("id", ""))
        self.received.setdefault(dev.device_id, []).append((name, cid))
        with self._lock:
            seen = dev.seen.get(cid)
        if seen is not None:  # a repeated id: answer the same, do nothing again
            if seen:
                self._reply(dev, name, seen, msg)
            return
        outcome = "commit"
        if name == "update":
            version = str((cmd.get("manifest") or {}).get("version"))
            outcome = self.outcomes.get(version, self.outcomes["*"])
            if self.outcome_for is not None:
                outcome = self.outcome_for(dev.device_id, version) or outcome
        if outcome == "silent":
            with self._lock:
                dev.seen[cid] = {}
            return
        reply: dict[str, Any] = {"id": cid, "ok": True, "device_id": dev.device_id, "result": {}}
        if time.time() > float(cmd.get("ts", 0)) + float(cmd.get("ttl_s", 300)):
            reply = {"id": cid, "ok": False, "device_id": dev.device_id, "error": "command expired (ttl_s)"}
        elif outcome == "refuse":
            reply = {"id": cid, "ok": False, "device_id": dev.device_id, "error": "refused (simulated)"}
        elif name == "update":
            reply = self._start_update(dev, cmd, outcome, reply)
        elif name == "rollback":
            reply = self._start_rollback(dev, cmd, reply)
        elif name == "status":
            reply["result"] = {"model": dev.model, "group": dev.group, "profile": dev.profile}
        with self._lock:
            if len(dev.seen) >= _MAX_SEEN:
                dev.seen.pop(next(iter(dev.seen)))
            dev.seen[cid] = reply
        self._reply(dev, name, reply, msg)

    def _start_update(self, dev: _Device, cmd: dict[str, Any], outcome: str, reply: dict[str, Any]) -> dict[str, Any]:
        manifest = cmd.get("manifest")
        if not isinstance(manifest, dict) or "version" not in manifest:
            return {"id": reply["id"], "ok": False, "device_id": dev.device_id, "error": "update without a manifest"}
        if dev.busy:
            return {"id": reply["id"], "ok": False, "device_id": dev.device_id, "error": "another update is running"}
        dev.busy = True
        reply["result"] = {"accepted": True}
        rollout_id = cmd.get("rollout_id")
        version = str(manifest["version"])
        steps = list(_STEPS[outcome])

        def step(i: int) -> None:
            state = steps[i]
            if state == "downloading" and self.download:
                problem = self._download_and_verify(cmd)
                if problem:
                    self._event(dev, rollout_id=rollout_id, version=version, state="downloading")
                    self._finish(dev, rollout_id, version, "rejected", problem)
                    return
            if state in _REASONS:
                self._finish(dev, rollout_id, version, state, _REASONS[state])
                return
            if state == "committed":
                with self._lock:
                    if dev.model:
                        dev.previous.append(dev.model)
                    dev.model = {"name": manifest.get("name"), "version": version,
                                 "sha256": (manifest.get("model") or {}).get("sha256")}
                self._publish_state(dev, online=True)
                self._finish(dev, rollout_id, version, "committed", None)
                return
            self._event(dev, rollout_id=rollout_id, version=version, state=state)
            self._later(self.step_delay, lambda: step(i + 1))

        self._later(0.0, lambda: step(0))
        return reply

    def _finish(self, dev: _Device, rollout_id: Any, version: str, state: str, reason: str | None) -> None:
        fields: dict[str, Any] = {"rollout_id": rollout_id, "version": version, "state": state}
        if reason:
            fields["reason"] = reason
        self._event(dev, **fields)
        dev.busy = False

    def _download_and_verify(self, cmd: dict[str, Any]) -> str | None:
        """Fetch the artifact like a device would; return a rejection reason or None."""
        manifest = cmd["manifest"]
        try:
            if self.trusted:
                from edgefleet.signing import verify_manifest

                verify_manifest(manifest, cmd.get("signature"), self.trusted)
            url = str(cmd.get("artifact_url"))
            with urllib.request.urlopen(url, timeout=10) as resp:
                data = resp.read(64 << 20)
            self.downloads += 1
        except EdgefleetError as exc:
            return f"signature: {exc}"
        except (OSError, ValueError) as exc:
            return f"download failed: {exc}"
        expected = (manifest.get("model") or {}).get("sha256")
        if hashlib.sha256(data).hexdigest() != expected:
            return "sha256 of the downloaded model does not match the manifest"
        return None

    def _start_rollback(self, dev: _Device, cmd: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
        to = cmd.get("to")
        rollout_id = cmd.get("rollout_id")
        with self._lock:
            candidates = [m for m in reversed(dev.previous) if to is None or m.get("version") == to]
        if not candidates:
            return {"id": reply["id"], "ok": False, "device_id": dev.device_id,
                    "error": f"no kept version {to or '(previous)'} to roll back to"}
        target = candidates[0]

        def done() -> None:
            with self._lock:
                if dev.model:
                    dev.previous.append(dev.model)
                dev.previous.remove(target)
                dev.model = target
            self._publish_state(dev, online=True)
            self._event(dev, rollout_id=rollout_id, version=target["version"], state="committed", rollback=True)

        self._event(dev, rollout_id=rollout_id, version=target["version"], state="installing", rollback=True)
        self._later(self.step_delay, done)
        reply["result"] = {"to": target["version"]}
        return reply


def write_placeholder_artifact(directory: Path, version: str, name: str = "demo", deployable: bool = True,
                               payload: bytes | None = None) -> Path:
    """An artifact dir for simulated devices: placeholder model bytes and a valid manifest.

    Simulated devices never run the model; the fleet tool checks the manifest and the file's
    sha256 and serves it exactly as for a real artifact. Real devices need ``edge-convert`` output.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = payload or (b"TFL3" + hashlib.sha256(f"{name}-{version}".encode()).digest() * 64)
    (directory / "model.tflite").write_bytes(model)
    manifest: dict[str, Any] = {
        "schema_version": 1, "name": name, "version": version, "created": "2026-01-01T00:00:00Z",
        "converter_version": "simulator", "profile": "rpi4", "task": "classification",
        "model": {"file": "model.tflite", "sha256": hashlib.sha256(model).hexdigest(), "size": len(model)},
        "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": [1, 3], "dtype": "float32"}],
        "deployable": deployable,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def _parse_outcomes(values: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        version, sep, outcome = v.rpartition("=")
        out[version if sep else "*"] = outcome
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", required=True, help="mqtt://host:port")
    parser.add_argument("--count", type=int, default=10, help="number of simulated devices")
    parser.add_argument("--prefix", default="sim", help="device ids are PREFIX-00000, PREFIX-00001, ...")
    parser.add_argument("--group", default="sim")
    parser.add_argument("--groups", type=int, default=1, help="spread devices over GROUP-0..GROUP-(N-1)")
    parser.add_argument("--profile", default="rpi4")
    parser.add_argument("--model-version", default="1", help="the version every device starts on")
    parser.add_argument("--outcome", action="append", default=[], metavar="[VERSION=]OUTCOME",
                        help=f"how updates end: {', '.join(OUTCOMES)}; VERSION= limits it to one version")
    parser.add_argument("--step-delay", type=float, default=0.05, help="seconds between OTA states")
    parser.add_argument("--telemetry-interval", type=float, default=0.0, help="seconds; 0 = no telemetry")
    parser.add_argument("--download", action="store_true", help="really download and hash the artifact")


def run_from_args(args: argparse.Namespace) -> int:
    sim = Simulator(args.broker, count=args.count, prefix=args.prefix, group=args.group, groups=args.groups,
                    profile=args.profile, model_version=args.model_version,
                    outcomes=_parse_outcomes(args.outcome), step_delay=args.step_delay,
                    telemetry_interval=args.telemetry_interval, download=args.download)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    sim.start()
    print(f"ready: simulating {args.count} devices on {sim.url.display()} (Ctrl-C to stop)", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    sim.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from edgefleet.cli import run_main

    def _main(a: list[str]) -> int:
        parser = argparse.ArgumentParser(prog="python -m edgefleet.testing.simulator", description="simulated devices")
        add_arguments(parser)
        parser.add_argument("--debug", action="store_true")
        return run_from_args(parser.parse_args(a))

    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
