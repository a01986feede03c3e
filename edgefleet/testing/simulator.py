"""A light device simulator that speaks the device side of the MQTT contract, many devices per process.

No model runs here: a simulated device publishes a retained ``state``, optional ``telemetry``,
answers ``update`` / ``rollback`` / ``status`` / ``config`` commands (to the MQTT 5 Response Topic
with Correlation Data, else ``.../cmd/{name}/response``) and walks the OTA states as ``ota``
events. An update that names its manifest by URL (command schema 2) has it fetched and checked
at ``downloading`` as an agent does (announced size, sha256 before parsing, strict JSON, the
signature with ``trusted_keys``), once per manifest for the whole process, so a benchmark of
thousands of devices costs one fetch. Each device decides about a command with the agent's own
:class:`~edgefleet.commands.CommandProcessor` (parse, TTL, dedup by id, one reply per request), so
simulated and real devices cannot drift apart there; only the rate limit is generous, because one
process plays thousands of devices. What an update ends in is configurable per target version:

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
import functools
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

from edgefleet.commands import CommandProcessor, CommandRejected, Handler, reply_topic
from edgefleet.errors import ConfigError, EdgefleetError
from edgefleet.messages import MAX_COMMAND_TTL_S, OtaState, decode, parse_json
from edgefleet.mqtt import Message, MqttClient, parse_broker_url
from edgefleet.topics import (
    all_devices,
    events_topic,
    group_cmd_topic,
    parse_cmd_topic,
    parse_device_topic,
    state_topic,
    telemetry_topic,
)

__all__ = ["OTA_STEPS", "OUTCOMES", "Simulator", "main", "write_placeholder_artifact"]

OUTCOMES = ("commit", "reject", "fail", "rollback", "refuse", "silent")
_O = OtaState
OTA_STEPS = {
    "commit": (_O.QUEUED, _O.DOWNLOADING, _O.VERIFYING, _O.VALIDATING, _O.INSTALLING, _O.PROBATION, _O.COMMITTED),
    "reject": (_O.QUEUED, _O.DOWNLOADING, _O.VERIFYING, _O.REJECTED),
    "fail": (_O.QUEUED, _O.DOWNLOADING, _O.FAILED),
    "rollback": (_O.QUEUED, _O.DOWNLOADING, _O.VERIFYING, _O.VALIDATING, _O.INSTALLING, _O.PROBATION,
                 _O.ROLLED_BACK),
}
_REASONS = {_O.REJECTED: "golden outputs differ from the manifest (simulated)",
            _O.FAILED: "download failed (simulated)",
            _O.ROLLED_BACK: "probation: NaN outputs (simulated)"}
_REMEMBER = 64  # command ids each device remembers
_FETCH_RETRY_S = 60.0       # how long a manifest fetch that cannot connect is retried, s
_FETCH_RETRY_EVERY_S = 0.5  # between those attempts, s
# One process plays thousands of devices, each of which sees a handful of commands per rollout:
# the agent's limit (60/min, burst 10) would only make benchmarks measure the limiter.
_RATE_PER_MIN = 60_000.0
_BURST = 1_000


@dataclass
class _Device:
    device_id: str
    group: str
    profile: str
    model: dict[str, Any] | None
    previous: list[dict[str, Any]] = field(default_factory=list)
    commands: CommandProcessor = field(init=False, repr=False)
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
        self._groups: dict[str, list[_Device]] = {}
        for i in range(count):
            g = group if groups <= 1 else f"{group}-{i % groups}"
            did = f"{prefix}-{i:05d}"
            dev = self.devices[did] = _Device(did, g, profile, dict(model) if model else None)
            dev.commands = CommandProcessor(did, self._handlers(dev), remember=_REMEMBER, rate_per_min=_RATE_PER_MIN,
                                            burst=_BURST, max_ttl_s=MAX_COMMAND_TTL_S)
            self._groups.setdefault(g, []).append(dev)
        self.commands_received = 0
        self.received: dict[str, list[tuple[str, str]]] = {}  # device -> [(command, id)] in arrival order
        self.downloads = 0
        self.manifest_fetches = 0
        self._manifests: dict[tuple[str, str], dict[str, Any]] = {}  # (url, sha256) -> verified manifest
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
        self._client.flush(births, stall_s=30.0)
        self._client.subscribe([all_devices("cmd/+")] + [group_cmd_topic(g, "+") for g in sorted(self._groups)])
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
            self._client.flush(infos, stall_s=30.0)
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
            self._handle(msg)

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

    def _targets(self, topic: str) -> tuple[str | None, list[_Device]]:
        """The command name and the devices a command topic addresses (one device or a group)."""
        parsed = parse_device_topic(topic)
        if parsed is not None:
            dev = self.devices.get(parsed[0])
            return (parse_cmd_topic(topic, dev.device_id, dev.group), [dev]) if dev else (None, [])
        for members in self._groups.values():
            name = parse_cmd_topic(topic, members[0].device_id, members[0].group)
            if name is not None:
                return name, members
        return None, []

    def _handle(self, msg: Message) -> None:
        name, targets = self._targets(msg.topic)
        if name is None:
            return
        for dev in targets:
            reply = self.handle_command(dev.device_id, name, msg.payload)
            if reply is not None:
                topic = reply_topic(msg.payload, msg.response_topic, dev.device_id, name)
                self._client.publish(topic, reply, correlation=msg.correlation)

    def handle_command(self, device_id: str, name: str, payload: bytes) -> dict[str, Any] | None:
        """The reply one device sends to a command, or None when it is ``silent`` about it."""
        dev = self.devices[device_id]
        self.commands_received += 1
        try:
            cmd: dict[str, Any] = decode(payload)
        except (ValueError, UnicodeDecodeError):
            cmd = {}  # the processor answers it as malformed
        self.received.setdefault(device_id, []).append((name, str(cmd.get("id", ""))))
        if name == "update" and self._outcome(dev, cmd) == "silent":
            return None
        return dev.commands.handle(name, payload)

    def _handlers(self, dev: _Device) -> dict[str, Handler]:
        return {"status": functools.partial(self._cmd_status, dev), "update": functools.partial(self._cmd_update, dev),
                "rollback": functools.partial(self._cmd_rollback, dev), "config": lambda cmd: {}}

    def _outcome(self, dev: _Device, cmd: dict[str, Any]) -> str:
        version = str(_claimed_version(cmd))
        outcome = self.outcomes.get(version, self.outcomes["*"])
        if self.outcome_for is not None:
            outcome = self.outcome_for(dev.device_id, version) or outcome
        return outcome

    def _cmd_status(self, dev: _Device, cmd: dict[str, Any]) -> dict[str, Any]:
        return {"model": dev.model, "group": dev.group, "profile": dev.profile}

    def _cmd_update(self, dev: _Device, cmd: dict[str, Any]) -> dict[str, Any]:
        outcome = self._outcome(dev, cmd)
        if outcome == "refuse":
            raise CommandRejected("refused (simulated)")
        return self._start_update(dev, cmd, outcome)

    def _start_update(self, dev: _Device, cmd: dict[str, Any], outcome: str) -> dict[str, Any]:
        inline = cmd.get("manifest")
        claimed = _claimed_version(cmd)
        if claimed is None:
            raise CommandRejected("update without a manifest or a version")
        if dev.busy:
            raise CommandRejected("another update is running")
        dev.busy = True
        rollout_id = cmd.get("rollout_id")
        version = str(claimed)
        steps = list(OTA_STEPS[outcome])
        manifest: dict[str, Any] = inline if isinstance(inline, dict) else {}

        give_up = time.monotonic() + _FETCH_RETRY_S

        def step(i: int) -> None:
            state = steps[i]
            if state is _O.DOWNLOADING:
                try:
                    problem = self._verified(cmd, manifest)
                except OSError as exc:  # the fleet's server may be restarting: retried, as an agent does
                    if time.monotonic() < give_up:
                        self._later(_FETCH_RETRY_EVERY_S, lambda: step(i))
                        return
                    problem = f"manifest download failed: {exc}"
                if problem is None and self.download:
                    problem = self._download_and_verify(cmd, manifest)
                if problem:
                    self._event(dev, rollout_id=rollout_id, version=version, state=state)
                    self._finish(dev, rollout_id, version, _O.REJECTED, problem)
                    return
            if state in _REASONS:
                self._finish(dev, rollout_id, version, state, _REASONS[state])
                return
            if state is _O.COMMITTED:
                with self._lock:
                    if dev.model:
                        dev.previous.append(dev.model)
                    dev.model = {"name": manifest.get("name"), "version": version,
                                 "sha256": (manifest.get("model") or {}).get("sha256")}
                self._publish_state(dev, online=True)
                self._finish(dev, rollout_id, version, state, None)
                return
            self._event(dev, rollout_id=rollout_id, version=version, state=state)
            self._later(self.step_delay, lambda: step(i + 1))

        self._later(0.0, lambda: step(0))
        return {"accepted": True}

    def _finish(self, dev: _Device, rollout_id: Any, version: str, state: OtaState, reason: str | None) -> None:
        fields: dict[str, Any] = {"rollout_id": rollout_id, "version": version, "state": state}
        if reason:
            fields["reason"] = reason
        self._event(dev, **fields)
        dev.busy = False

    def _verified(self, cmd: dict[str, Any], manifest: dict[str, Any]) -> str | None:
        """Check (and for schema 2 first fetch, into ``manifest``) the update's manifest; a rejection reason or None.

        Raises:
            OSError: the fetch failed (the caller retries it for a while).
        """
        from edgefleet.signing import verify_manifest

        try:
            if not manifest:
                manifest.update(self._fetched_manifest(cmd))
            elif self.trusted:
                verify_manifest(manifest, cmd.get("signature"), self.trusted)
        except EdgefleetError as exc:
            return f"manifest: {exc}"
        except ValueError as exc:
            return f"manifest download failed: {exc}"
        return None

    def _fetched_manifest(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """A schema-2 manifest, checked in the agent's order with the contract's checks (cached per manifest).

        Raises:
            ArtifactError / SignatureError: not the announced bytes, not strict JSON, not signed, not schema v1.
            OSError / ValueError: the fetch failed.
        """
        from edgefleet.errors import ArtifactError
        from edgefleet.manifest import MAX_MANIFEST_BYTES, parse_manifest
        from edgefleet.signing import verify_manifest

        url, sha, size = str(cmd.get("manifest_url")), str(cmd.get("manifest_sha256")), cmd.get("manifest_size")
        with self._lock:
            cached = self._manifests.get((url, sha))
        if cached is not None:
            return cached
        if not isinstance(size, int) or not 0 < size <= MAX_MANIFEST_BYTES:
            raise ArtifactError(f"manifest_size {size!r}: expected 1..{MAX_MANIFEST_BYTES} bytes")
        with urllib.request.urlopen(url, timeout=10) as resp:
            data = resp.read(size + 1)
        self.manifest_fetches += 1
        if len(data) != size:
            raise ArtifactError(f"fetched manifest: {len(data)}{'+' if len(data) > size else ''} bytes, "
                                f"the command says {size}")
        if hashlib.sha256(data).hexdigest() != sha:
            raise ArtifactError("fetched manifest: sha256 differs from the command's (not parsed)")
        try:
            raw = parse_json(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"fetched manifest: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise ArtifactError("fetched manifest: expected a JSON object")
        if self.trusted:
            verify_manifest(raw, cmd.get("signature"), self.trusted)  # before any field is used
        if parse_manifest(raw).version != _claimed_version(cmd):
            raise ArtifactError(f"fetched manifest is not version {_claimed_version(cmd)}")
        with self._lock:
            self._manifests[(url, sha)] = raw
        return raw

    def _download_and_verify(self, cmd: dict[str, Any], manifest: dict[str, Any]) -> str | None:
        """Fetch the model like a device would; return a rejection reason or None."""
        try:
            url = str(cmd.get("artifact_url"))
            with urllib.request.urlopen(url, timeout=10) as resp:
                data = resp.read(64 << 20)
            self.downloads += 1
        except (OSError, ValueError) as exc:
            return f"download failed: {exc}"
        expected = (manifest.get("model") or {}).get("sha256")
        if hashlib.sha256(data).hexdigest() != expected:
            return "sha256 of the downloaded model does not match the manifest"
        return None

    def _cmd_rollback(self, dev: _Device, cmd: dict[str, Any]) -> dict[str, Any]:
        to = cmd.get("to")
        rollout_id = cmd.get("rollout_id")
        with self._lock:
            candidates = [m for m in reversed(dev.previous) if to is None or m.get("version") == to]
        if not candidates:
            raise CommandRejected(f"no kept version {to or '(previous)'} to roll back to")
        target = candidates[0]

        def done() -> None:
            with self._lock:
                if dev.model:
                    dev.previous.append(dev.model)
                dev.previous.remove(target)
                dev.model = target
            self._publish_state(dev, online=True)
            self._event(dev, rollout_id=rollout_id, version=target["version"], state=_O.COMMITTED, rollback=True)

        self._event(dev, rollout_id=rollout_id, version=target["version"], state=_O.INSTALLING, rollback=True)
        self._later(self.step_delay, done)
        return {"to": target["version"]}


def _claimed_version(cmd: dict[str, Any]) -> str | None:
    """The version an update names: its inline manifest's, or (schema 2) the command's own claim."""
    inline = cmd.get("manifest")
    version = inline.get("version") if isinstance(inline, dict) else cmd.get("version")
    return None if version is None else str(version)


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
    if getattr(args, "json", False):
        print(json.dumps({"ready": True, "devices": args.count, "broker": sim.url.display()}), flush=True)
    else:
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
