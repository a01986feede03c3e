"""docs/protocol.md tells the truth: every JSON Schema there accepts what a real agent sends."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import parse_config
from agent.service import AgentService
from edgefleet.testing.artifacts import build_artifact
from edgefleet.testing.waiting import wait_for
from edgefleet.topics import device_cmd_topic, device_topic
from tests.integration.service_support import REPO, Observer, agent_config, command
from tests.support.models import OTA_MODELS

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def schemas() -> dict[str, dict[str, Any]]:
    text = (REPO / "docs" / "protocol.md").read_text()
    found = re.findall(r"<!-- schema: ([\w-]+) -->\s*```json\n(.*?)```", text, re.DOTALL)
    return {name: json.loads(body) for name, body in found}


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def check(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """The subset of JSON Schema that docs/protocol.md uses; returns the violations."""
    errors = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, k) for k in kinds):
            return [f"{path}: expected {kinds}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < {schema['minimum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: {value} <= {schema['exclusiveMinimum']}")
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1 << 30):
        errors.append(f"{path}: length {len(value)} out of bounds")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors.extend(check(value[key], sub, f"{path}.{key}"))
    return errors


def test_the_checker_can_fail() -> None:
    s = schemas()["reply"]
    assert check({"id": "x", "ok": "yes", "device_id": "d"}, s)
    assert check({"ok": True, "device_id": "d"}, s)
    assert not check({"id": None, "ok": False, "device_id": "d", "error": "e"}, s)


def test_every_documented_schema_parses() -> None:
    assert set(schemas()) == {"state", "telemetry", "event", "ota-event", "command", "update-command",
                              "reply", "result"}


def test_real_agent_payloads_match_the_documented_schemas(broker, tmp_path: Path) -> None:
    art = build_artifact(OTA_MODELS / "clf_a.tflite", tmp_path / "art", version="1",
                         baseline={"class_histogram": [0.1] * 10, "mean_confidence": 0.5})
    cfg = agent_config(tmp_path, broker.url, device_id="pi-doc", model=art.dir, telemetry={"interval_s": 0.2},
                       source={"type": "directory", "path": str(tmp_path / "frames"), "poll_interval_s": 0.05},
                       sinks={"results_topic": True})
    obs = Observer(broker.port, topic=device_topic("pi-doc", "#"))
    svc = AgentService(parse_config(cfg))
    svc.start()
    try:
        s = schemas()
        wait_for(lambda: obs.on("pi-doc/state") and len(obs.on("pi-doc/telemetry")) >= 2, 20, what="birth+telemetry")
        np.save(tmp_path / "frames" / ".f.npy", np.zeros(svc.host.engine.input_details[0].shape[1:], np.float32))
        (tmp_path / "frames" / ".f.npy").rename(tmp_path / "frames" / "f.npy")
        wait_for(lambda: obs.on("pi-doc/results"), 20, what="a result")
        status = command("status")
        obs.publish(device_cmd_topic("pi-doc", "status"), status)
        rollback = command("rollback", rollout_id="doc-rb")  # nothing older is kept: a failed OTA event
        obs.publish(device_cmd_topic("pi-doc", "rollback"), rollback)
        obs.publish(device_cmd_topic("pi-doc", "status"), b"{malformed")
        wait_for(lambda: len(obs.on("cmd/status/response")) >= 2 and obs.on("cmd/rollback/response")
                 and [e for e in obs.on("pi-doc/events") if e["event"] == "ota"], 20, what="replies and events")
        assert not check(command("status"), s["command"])
        assert not check(command("update", **art.update_fields()), s["update-command"])
        for suffix, name in (("pi-doc/state", "state"), ("pi-doc/telemetry", "telemetry"),
                             ("pi-doc/results", "result"), ("cmd/status/response", "reply"),
                             ("cmd/rollback/response", "reply")):
            for body in obs.on(suffix):
                assert not check(body, s[name]), (name, check(body, s[name]), body)
        for body in obs.on("pi-doc/events"):
            name = "ota-event" if body["event"] == "ota" else "event"
            assert not check(body, s[name]), (name, check(body, s[name]), body)
    finally:
        svc.stop()
        obs.close()
    offline = obs.on("pi-doc/state")[-1]
    assert offline["online"] is False and not check(offline, schemas()["state"])


@pytest.mark.parametrize("name", ["state", "telemetry", "reply"])
def test_schemas_reject_an_empty_object(name: str) -> None:
    assert check({}, schemas()[name])
