"""Commands small enough for managed brokers: an update names its manifest by URL, sha256 and size.

The fleet side is the real :class:`~fleet.runner.RolloutRunner` and artifact server; the device side
a real :class:`~agent.ota.OtaManager` (ModelHost, child-process validation, loopback HTTP), fed the
fleet's own command bytes through the agent's :class:`~edgefleet.commands.CommandProcessor`.
"""

from __future__ import annotations

import hashlib
import json
import queue
import struct
from pathlib import Path
from typing import Any

import pytest

from agent.host import ModelHost
from agent.ota import OtaManager
from edgefleet.commands import CommandProcessor
from edgefleet.errors import ConfigError
from edgefleet.manifest import ManifestRef
from edgefleet.messages import MAX_COMMAND_BYTES, encode, make_command
from edgefleet.mqtt import Message
from edgefleet.profiles import load_profile
from edgefleet.signing import Ed25519PrivateKey, canonical_bytes
from edgefleet.testing import http_server
from edgefleet.testing.artifacts import build_artifact
from edgefleet.testing.waiting import wait_for
from edgefleet.topics import events_topic
from fleet.artifacts import ArtifactServer, serve_manifest
from fleet.registry import Device as FleetDevice
from fleet.rollout import Policy
from fleet.runner import Artifact, RolloutRunner, create_deploy
from fleet.store import Store
from tests.support.models import MODELS, OTA_MODELS

KEY = Ed25519PrivateKey.generate()
PROFILE = load_profile("x86-dev")
AWS_IOT_CORE_MAX = 128 * 1024
FINAL = ("committed", "rejected", "failed", "rolled_back")
_EVENT_SINKS: dict[str, Any] = {}  # device id -> where its OTA events go (the loopback fleet connection)


def _model_224x224x3(tmp_path: Path) -> Path:
    """uint8.tflite (conv, mean, dense) with a 224x224x3 input: ops that take any spatial size."""
    data = (MODELS / "uint8.tflite").read_bytes()
    old, new = struct.pack("<5i", 4, 1, 16, 16, 3), struct.pack("<5i", 4, 1, 224, 224, 3)
    assert data.count(old) == 2, "the input and its quantized copy"
    path = tmp_path / "clf224.tflite"
    path.write_bytes(data.replace(old, new))
    return path


class _Loopback:
    """The MQTT connection of a runner whose devices are agents' command processors (and their OTA events)."""

    client_id = "edge-fleet-test"

    def __init__(self, devices: dict[str, CommandProcessor]) -> None:
        self.devices = devices
        self.messages: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.sent: list[bytes] = []
        for did in devices:
            _EVENT_SINKS[did] = lambda e, did=did: self.messages.put(Message(events_topic(did), encode(e)))

    def subscribe(self, topics: Any) -> None:
        pass

    def publish(self, topic: str, payload: dict[str, Any], response_topic: str | None = None,
                correlation: bytes | None = None, **kw: Any) -> None:
        data = encode(payload)
        self.sent.append(data)
        device = topic.split("/")[3]
        reply = self.devices[device].handle(topic.rsplit("/", 1)[1], data)
        self.messages.put(Message(str(response_topic), encode(reply), correlation=correlation))

    def publish_all(self, messages: Any, stall_s: float) -> None:
        for m in messages:
            self.publish(m.topic, m.payload, response_topic=m.response_topic, correlation=m.correlation)


def _runner(tmp_path: Path, art: Any, server: ArtifactServer, devices: dict[str, CommandProcessor],
            manifest: ManifestRef | None = None) -> tuple[RolloutRunner, Store]:
    store = Store.open(tmp_path / "fleet")
    url = server.add(f"/{art.manifest.model.sha256}/model.tflite", art.model_path)
    targets = [FleetDevice(device_id=d, online=True, model={"name": "clf", "version": "1", "sha256": "0" * 64})
               for d in devices]
    rollout, execs = create_deploy(store, Artifact(art.dir, art.manifest, art.raw, art.signature), targets,
                                   Policy(canary=0, device_timeout_s=30), url, "127.0.0.1:0", "mqtt://127.0.0.1:1")
    runner = RolloutRunner(store, _Loopback(devices), rollout, execs, tick_s=0.05,  # type: ignore[arg-type]
                           manifest=manifest or serve_manifest(server, art.raw))
    return runner, store


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    base = tmp_path_factory.mktemp("small-cmd-arts")
    fast = {"inferences": 5, "seconds": 1}
    return {v: build_artifact(OTA_MODELS / m, base / f"v{v}", version=v, key=KEY, golden_samples=2, probation=fast)
            for v, m in (("1", "clf_a.tflite"), ("2", "clf_a2.tflite"))}


@pytest.fixture()
def device(tmp_path, arts):
    events: list[dict[str, Any]] = []

    def emit(event: dict[str, Any]) -> None:
        events.append(event)
        for sink in list(_EVENT_SINKS.values()):
            sink(event)

    _EVENT_SINKS.clear()
    host = ModelHost(PROFILE, autotune=False)
    ota = OtaManager(tmp_path / "dev", PROFILE, [KEY.public_key()], host, emit, reserve_free_mb=0,
                     backoff_s=0.01, download_timeout_s=2.0)
    ota.boot()
    ota.install_initial(arts["1"].dir)
    ota.events = events  # type: ignore[attr-defined]
    yield ota
    ota.close()
    host.close()


def _final(ota: OtaManager, rollout_id: str) -> dict[str, Any]:
    events = ota.events  # type: ignore[attr-defined]
    return wait_for(lambda: next((e for e in events if e.get("rollout_id") == rollout_id and e["state"] in FINAL),
                                 None), 30, what=f"the end of {rollout_id}")


def _by_ref(art: Any, rollout_id: str, manifest_url: str, sha256: str, size: int) -> dict[str, Any]:
    return make_command("update", schema=2, rollout_id=rollout_id, version=art.manifest.version,
                        manifest_url=manifest_url, manifest_sha256=sha256, manifest_size=size,
                        signature=art.signature, artifact_url=art.file_url)


def test_update_command_for_a_224x224x3_model_is_under_8_kb(tmp_path):
    art = build_artifact(_model_224x224x3(tmp_path), tmp_path / "art", version="2", key=KEY, golden_samples=4)
    assert art.manifest.inputs[0].shape == [1, 224, 224, 3] and len(art.manifest.golden.samples) == 4
    inline = encode(make_command("update", **art.update_fields("http://fleet:8080/x/model.tflite")))
    assert len(inline) > AWS_IOT_CORE_MAX, f"the inline form is {len(inline)} bytes: a managed broker refuses it"
    with ArtifactServer("127.0.0.1:0") as server:
        runner, store = _runner(tmp_path, art, server, {"pi-224": CommandProcessor("pi-224", {})})
        command = encode(runner._payload(runner.execs["pi-224"], "update", False))
        store.close()
    assert len(command) <= MAX_COMMAND_BYTES, f"the update command is {len(command)} bytes"
    print(f"\nupdate command for a 224x224x3 model: inline {len(inline)} bytes, by URL {len(command)} bytes")


def test_update_by_manifest_url_commits_on_a_real_agent(tmp_path, arts, device):
    """The fleet's own command, through the agent's command processor: the reply is quick, the fetch is in downloading."""
    agent = CommandProcessor("pi-1", {"update": device.handle_update})
    with ArtifactServer("127.0.0.1:0") as server:
        runner, store = _runner(tmp_path, arts["2"], server, {"pi-1": agent})
        final = runner.run()
        served = server.served
        store.close()
    assert final.state.value == "SUCCEEDED", (final.reason, device.events)  # type: ignore[attr-defined]
    states = [e["state"] for e in device.events if e.get("rollout_id") == final.id]  # type: ignore[attr-defined]
    assert states[:2] == ["queued", "downloading"] and states[-1] == "committed"
    assert device.status()["active"]["version"] == "2"
    assert served == 2, "the manifest and the model, each fetched once"


def test_manifest_fetched_by_url_with_a_wrong_sha256_is_refused_before_parsing(tmp_path, arts, device):
    junk = b"{this is not JSON, and not the manifest"
    with http_server.ArtifactServer() as http:
        url = http.add("/m/manifest.json", junk)
        right = canonical_bytes(arts["2"].raw)
        device.handle_update(_by_ref(arts["2"], "r-sha", url, hashlib.sha256(right).hexdigest(), len(junk)))
        event = _final(device, "r-sha")
    assert event["state"] == "rejected"
    assert "sha256" in event["reason"] and "not parsed" in event["reason"] and "JSON" not in event["reason"]
    assert device.status()["active"]["version"] == "1"
    assert not list((tmp_path / "dev" / "staging").glob("*/*")), "nothing of it is kept"


def test_manifest_served_bigger_than_announced_is_cut_off(arts, device):
    right = canonical_bytes(arts["2"].raw)
    with http_server.ArtifactServer() as http:
        url = http.add("/m/manifest.json", right + b" " * (1 << 20))  # the same JSON, padded by 1 MiB
        device.handle_update(_by_ref(arts["2"], "r-big", url, hashlib.sha256(right).hexdigest(), len(right)))
        event = _final(device, "r-big")
    assert event["state"] == "rejected"
    assert f"more than the {len(right)} bytes announced for the manifest" in event["reason"]
    assert device.status()["active"]["version"] == "1"


def test_newer_command_schema_is_refused_with_a_reason_and_the_fleet_reports_it(tmp_path, arts, device, monkeypatch,
                                                                                capsys):
    import agent.ota.commands
    from fleet.cli import _print_final
    from fleet.views import summary

    with pytest.raises(ConfigError, match=r"command schema 3 is newer than this agent understands \(1-2\): "
                                          "upgrade edge-agent"):
        device.handle_update({**_by_ref(arts["2"], "r-new", "http://x/manifest.json", "0" * 64, 10), "schema": 3})
    # an agent that understands only schema 1, and a fleet that sends schema 2
    monkeypatch.setattr(agent.ota.commands, "COMMAND_SCHEMA", 1)
    old = CommandProcessor("pi-old", {"update": device.handle_update})
    with ArtifactServer("127.0.0.1:0") as server:
        runner, store = _runner(tmp_path, arts["2"], server, {"pi-old": old})
        final = runner.run()
        view = summary(store, final.id)
        store.close()
    (execution,) = view["executions"]
    assert execution["state"] == "REJECTED"
    assert "command schema 2 is newer than this agent understands (1-1): upgrade edge-agent" in execution["reason"]
    capsys.readouterr()
    _print_final(view, as_json=False)
    assert "1 device(s) refused the command as too new for their agent: upgrade edge-agent" in capsys.readouterr().out
    _print_final(view, as_json=True)
    assert json.loads(capsys.readouterr().out)["agent_upgrade_needed"] == 1
    assert device.status()["active"]["version"] == "1" and device.status()["pending"] is None
