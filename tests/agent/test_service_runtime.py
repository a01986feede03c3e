"""The agent service on whichever runtime this venv has (also run under tflite-runtime + numpy 1.x)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from agent.config import parse_config
from agent.service import AgentService
from edgefleet.testing.artifacts import build_artifact
from edgefleet.testing.waiting import wait_for
from edgefleet.topics import telemetry_topic
from tests.support.models import OTA_MODELS

pytestmark = pytest.mark.runtime


def test_service_serves_http_and_publishes_telemetry_on_this_runtime(broker, tmp_path: Path) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    art = build_artifact(OTA_MODELS / "clf_a.tflite", tmp_path / "art", version="1")
    cfg = parse_config({
        "device_id": "pi-rt", "profile": "x86-dev", "state_dir": str(tmp_path / "state"), "model": str(art.dir),
        "broker": {"url": broker.url, "keepalive_s": 2}, "http": {"listen": "127.0.0.1:0"},
        "telemetry": {"interval_s": 0.2}, "cache": {"enabled": False}})
    seen: list[dict] = []
    sub = paho.Client(CallbackAPIVersion.VERSION2)
    sub.on_message = lambda c, u, m: seen.append(json.loads(m.payload))
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe(telemetry_topic("pi-rt"), qos=1)
    sub.loop_start()
    svc = AgentService(cfg)
    svc.start()
    try:
        assert svc.http is not None
        x = np.zeros((2, *svc.host.engine.input_details[0].shape[1:]), np.float32)
        req = urllib.request.Request(f"http://127.0.0.1:{svc.http.port}/v1/models/clf:predict",
                                     data=json.dumps({"instances": x.tolist()}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            predictions = json.loads(resp.read())["predictions"]
        np.testing.assert_allclose(predictions, svc.host.engine.infer(x), atol=1e-6)
        wait_for(lambda: any(t["inferences"] >= 2 for t in seen), 10, what="telemetry counting the batch")
    finally:
        svc.stop()
        sub.loop_stop()
        sub.disconnect()
