"""The fleet tool's small parts: broker URLs, the Range-capable artifact server, the registry, the table."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from edgefleet.errors import ConfigError
from edgefleet.mqtt import Message, parse_broker_url
from fleet.artifacts import ArtifactServer, parse_range
from fleet.registry import Registry, select_devices
from fleet.watch import render


def test_broker_urls_parse_and_never_show_the_password():
    u = parse_broker_url("mqtts://ops:s3cret@broker.example.com")
    assert (u.host, u.port, u.tls, u.username, u.password) == ("broker.example.com", 8883, True, "ops", "s3cret")
    assert "s3cret" not in u.display() and u.display() == "mqtts://ops@broker.example.com:8883"
    assert parse_broker_url("mqtt://10.0.0.2").port == 1883
    for bad in ("http://x", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(ConfigError):
            parse_broker_url(bad)


@pytest.mark.parametrize("header,expected", [
    (None, None), ("bytes=0-9", (0, 9)), ("bytes=90-", (90, 99)), ("bytes=-10", (90, 99)),
    ("bytes=95-500", (95, 99)), ("bytes=100-", "416"), ("bytes=5-2", "416"), ("bytes=0-1,5-6", None),
    ("items=0-1", None)])
def test_range_headers_follow_rfc_7233(header, expected):
    assert parse_range(header, 100) == expected


def test_artifact_server_serves_ranges_and_nothing_else(tmp_path):
    data = bytes(range(256)) * 40
    (tmp_path / "model.tflite").write_bytes(data)
    (tmp_path / "secret.key").write_bytes(b"no")
    with ArtifactServer("127.0.0.1:0") as srv:
        url = srv.add("/abc/model.tflite", tmp_path / "model.tflite")
        with urllib.request.urlopen(url) as resp:
            assert resp.status == 200 and resp.read() == data and resp.headers["Accept-Ranges"] == "bytes"
        req = urllib.request.Request(url, headers={"Range": "bytes=1000-"})
        with urllib.request.urlopen(req) as resp:
            assert resp.status == 206 and resp.read() == data[1000:]
            assert resp.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(url, headers={"Range": f"bytes={len(data)}-"}))
        assert err.value.code == 416
        for path in ("/secret.key", "/abc/../secret.key", "/", "/abc/"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(srv.base_url + path)
            assert err.value.code == 404


def _state(device_id: str, **fields) -> Message:
    body = {"online": True, "device_id": device_id, "group": "g", "profile": "rpi4",
            "model": {"name": "m", "version": "1", "sha256": "a" * 64}, "ts": 1.0, **fields}
    return Message(f"edgefleet/v1/devices/{device_id}/state", json.dumps(body).encode(), True)


def test_registry_tracks_state_telemetry_and_removal():
    reg = Registry()
    reg.ingest(_state("a"))
    reg.ingest(_state("b", online=False, group="h", signed_updates=True))
    reg.ingest(Message("edgefleet/v1/devices/a/telemetry", json.dumps(
        {"ts": 5.0, "throughput": 3.0, "latency_ms": {"p95": 2.0}}).encode(), False))
    reg.ingest(Message("edgefleet/v1/devices/c/telemetry", b'{"ts": 1}', False))  # no state: not listed
    reg.ingest(Message("edgefleet/v1/devices/a/state", b"not json", True))
    assert [d.device_id for d in reg.known()] == ["a", "b"] and reg.ignored == 1
    a, b = reg.known()
    assert a.online and a.telemetry_ts == 5.0 and a.model_version == "1"
    assert not b.online and b.signed_updates is True and b.group == "h"
    reg.ingest(Message("edgefleet/v1/devices/b/state", b"", True))  # retained state cleared
    assert [d.device_id for d in reg.known()] == ["a"]


def test_target_selection_names_what_is_missing():
    reg = Registry()
    for i in range(3):
        reg.ingest(_state(f"d{i}", group="g1" if i < 2 else "g2"))
    assert [d.device_id for d in select_devices(reg, group="g1")] == ["d0", "d1"]
    assert len(select_devices(reg, all_devices=True)) == 3
    with pytest.raises(ConfigError, match="unknown device.*x9"):
        select_devices(reg, ["d0", "x9"])
    with pytest.raises(ConfigError, match="known groups: g1, g2"):
        select_devices(reg, group="nope")
    with pytest.raises(ConfigError, match="no devices"):
        select_devices(Registry(), all_devices=True)


def test_watch_table_shows_rows_and_totals_and_truncates():
    reg = Registry()
    now = time.time()
    for i in range(5):
        reg.ingest(_state(f"d{i}", online=i != 4))
        reg.ingest(Message(f"edgefleet/v1/devices/d{i}/telemetry", json.dumps(
            {"ts": now, "throughput": 10.0, "errors": 1, "latency_ms": {"p95": float(i)},
             "cache": {"hit_rate": 0.5}, "drift": {"tvd": 0.3}}).encode(), False), now=now)
    text = render(reg, now=now, max_rows=3)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["DEVICE", "ON", "GROUP", "MODEL"]
    assert lines[1].split() == ["d0", "yes", "g", "m@1", "10.0", "0.0", "50", "1", "0.30", "0s"]
    assert "... 2 more devices" in text
    assert "fleet: 5 devices, 4 online, 50.0 inferences/s, worst p95 4.0 ms, 5 errors; versions 1: 5" in text


def test_the_canary_is_taken_from_online_devices_first(tmp_path):
    from edgefleet.manifest import load_manifest
    from fleet.rollout import Policy
    from fleet.runner import Artifact, create_deploy
    from fleet.store import Store
    from tests.fleet.conftest import make_artifact

    art_dir = make_artifact(tmp_path / "a", "2")
    manifest, raw, sig = load_manifest(art_dir)
    reg = Registry()
    reg.ingest(_state("a-offline", online=False))
    reg.ingest(_state("b-online"))
    reg.ingest(_state("c-online"))
    store = Store.open(tmp_path / "data")
    rollout, execs = create_deploy(store, Artifact(art_dir, manifest, raw, sig), reg.known(),
                                   Policy(canary=1, wave_base=5), "http://x/model.tflite", None, "mqtt://x")
    assert [(e.device_id, e.wave) for e in execs] == [("b-online", 0), ("c-online", 1), ("a-offline", 1)]
    assert rollout.waves == 2 and all(e.prev_version == "1" for e in execs)


def test_resume_refuses_to_serve_a_model_rebuilt_since_the_rollout_started(tmp_path, capsys):
    from edgefleet.manifest import load_manifest
    from fleet.cli import main
    from fleet.rollout import Policy
    from fleet.runner import Artifact, create_deploy
    from fleet.store import Store
    from tests.fleet.conftest import make_artifact

    art_dir = make_artifact(tmp_path / "a", "2")
    manifest, raw, sig = load_manifest(art_dir)
    reg = Registry()
    reg.ingest(_state("d0"))
    store = Store.open(tmp_path / "data")
    rollout, _ = create_deploy(store, Artifact(art_dir, manifest, raw, sig), reg.known(), Policy(),
                               "http://127.0.0.1:1/x/model.tflite", "127.0.0.1:0", "mqtt://127.0.0.1:1")
    store.close()
    (art_dir / "model.tflite").write_bytes(b"rebuilt")
    code = main(["deploy", "--resume", rollout.id, "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 2 and "changed since the rollout started" in err
