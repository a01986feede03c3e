"""The exporter's index and collector: bounded labels, repeats skipped, stale devices dropped."""

from __future__ import annotations

import json

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from edgefleet.mqtt import Message
from edgefleet.topics import state_topic, telemetry_topic
from fleet.exporter import FleetCollector, FleetIndex

NOW = 1_700_000_000.0


def _state(device: str, online: bool = True, version: str = "1") -> Message:
    return Message(state_topic(device), json.dumps({"online": online, "group": "g", "model": {
        "name": "demo", "version": version, "sha256": "ab" * 32}}).encode(), True)


def _telemetry(device: str, seq: int, inferences: int = 100, errors: int = 2) -> Message:
    return Message(telemetry_topic(device), json.dumps({
        "seq": seq, "throughput": inferences / 10, "inferences": inferences, "errors": errors,
        "latency_ms": {"p50": 4.0, "p95": 30.0, "p99": 200.0}, "cache": {"enabled": True, "hit_rate": 0.25},
        "drift": {"tvd": 0.3}, "temp_c": 61.5}).encode(), False)


def _scrape(index: FleetIndex, rollouts=None) -> dict[str, float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(index, rollouts, clock=lambda: NOW))
    samples = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_telemetry_becomes_per_device_series_with_bounded_labels():
    index = FleetIndex()
    index.ingest(_state("d1"), now=NOW)
    index.ingest(_telemetry("d1", 1), now=NOW)
    index.ingest(_telemetry("d1", 1), now=NOW)  # a QoS 1 repeat: not counted twice
    index.ingest(_telemetry("d1", 2), now=NOW)
    index.prune(NOW)
    got = _scrape(index)
    labels = '{device="d1",group="g",model="demo"}'
    assert got[f"edgefleet_device_inferences_total{labels}"] == 200
    assert got[f"edgefleet_device_errors_total{labels}"] == 4
    assert got[f"edgefleet_device_inference_rate{labels}"] == 10.0
    assert got[f"edgefleet_device_cache_hit_ratio{labels}"] == 0.25
    assert got[f"edgefleet_device_drift_tvd{labels}"] == 0.3
    assert got[f"edgefleet_device_temperature_celsius{labels}"] == 61.5
    assert got[f"edgefleet_device_online{labels}"] == 1
    assert got['edgefleet_device_model_info{device="d1",group="g",model="demo",sha256="' + "ab" * 32
               + '",version="1"}'] == 1
    # 200 inferences: half at 4 ms, 45% at 30 ms, 5% at 200 ms
    bucket = 'edgefleet_device_latency_seconds_bucket{device="d1",group="g",le="%s",model="demo"}'
    assert got[bucket % "0.005"] == 100 and got[bucket % "0.05"] == 190 and got[bucket % "0.25"] == 200
    assert got['edgefleet_device_latency_seconds_count{device="d1",group="g",model="demo"}'] == 200


def test_silent_and_removed_devices_leave_the_metrics():
    index = FleetIndex(stale_s=60)
    index.ingest(_state("old"), now=NOW - 120)
    index.ingest(_state("gone"), now=NOW)
    index.ingest(Message(state_topic("gone"), b"", True), now=NOW)  # retained state cleared
    index.ingest(_state("here", online=False), now=NOW)
    assert index.prune(NOW) == 1 and set(index.devices) == {"here"} and index.dropped == 2
    got = _scrape(index)
    assert got['edgefleet_device_online{device="here",group="g",model="demo"}'] == 0


def test_the_device_index_is_bounded_and_bad_payloads_are_counted():
    index = FleetIndex(max_devices=2)
    for d in ("a", "b", "c"):
        index.ingest(_state(d), now=NOW)
    index.ingest(Message(telemetry_topic("a"), b"{nope", False), now=NOW)
    assert set(index.devices) == {"a", "b"} and index.refused == 1 and index.ignored == 1


def test_rollout_progress_comes_from_the_rollout_source():
    rollouts = [{"rollout_id": "r1", "kind": "deploy", "state": "IN_PROGRESS", "name": "demo", "version": "2",
                 "updated": NOW, "counts": {"SUCCEEDED": 3, "SENT": 1}}]
    got = _scrape(FleetIndex(), lambda: rollouts)
    assert got['edgefleet_rollout_progress_ratio{rollout="r1"}'] == 0.75
    assert got['edgefleet_rollout_devices{rollout="r1",state="SENT"}'] == 1
    assert got['edgefleet_rollout_info{kind="deploy",model="demo",rollout="r1",state="IN_PROGRESS",version="2"}'] == 1

    def broken():
        raise RuntimeError("database away")
    assert _scrape(FleetIndex(), broken)["edgefleet_exporter_state_up"] == 0
