"""agent.yaml validation: every mistake is one line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config, parse_config
from edgefleet.errors import ConfigError

MINIMAL = """
device_id: pi-0042
group: store-17
profile: rpi4
state_dir: state
broker: {url: "mqtt://127.0.0.1:1883"}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_minimal_config_gets_documented_defaults_and_relative_paths_follow_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + "model: models/first\ntrusted_keys: [keys/fleet.pub]\n"))
    assert cfg.state_dir == tmp_path.resolve() / "state"
    assert cfg.model == tmp_path.resolve() / "models/first"
    assert cfg.trusted_keys == [tmp_path.resolve() / "keys/fleet.pub"]
    assert cfg.http.address == ("127.0.0.1", 8501)
    assert cfg.source.type == "none"
    assert cfg.broker.nodes[0].port == 1883 and not cfg.broker.tls
    assert cfg.outbox.max_rows > 0 and cfg.outbox.max_bytes > 0 and cfg.outbox.drain_per_s > 0
    # Ids are remembered until their command expires: 256 would lock a busy device out within a day.
    assert cfg.commands.remember == 4096
    assert cfg.fleet is None and cfg.inference.deadline_s is None


def test_fleet_name_follows_the_id_rule() -> None:
    base = {"device_id": "pi-1", "profile": "rpi4", "state_dir": "/tmp/x", "broker": {"url": "mqtt://h"}}
    assert parse_config({**base, "fleet": "acme-eu.1"}).fleet == "acme-eu.1"
    with pytest.raises(ConfigError, match="cfg.yaml: fleet: expected 1-64 characters"):
        parse_config({**base, "fleet": "acme/eu"}, "cfg.yaml")


def test_the_issue_example_config_validates(repo_root: Path) -> None:
    cfg = load_config(repo_root / "deploy" / "agent.yaml")
    assert cfg.broker.tls and cfg.broker.nodes[0].port == 8883
    assert cfg.source.type == "directory"


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "telemetry: {interval_s: 5, intervall: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "telemetry.intervall: unknown key" in str(err.value)


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent.yaml: broker: missing required key"):
        load_config(write(tmp_path, "device_id: a\nprofile: rpi4\nstate_dir: s\n"))


@pytest.mark.parametrize("patch, key", [
    ({"device_id": "pi/42"}, "device_id"),
    ({"group": "+"}, "group"),
    ({"broker": {"url": "http://x"}}, "broker.url"),
    ({"broker": {"url": "mqtt://x", "password_file": "p"}}, "broker"),
    ({"broker": {"url": "mqtt://x", "cert_file": "c", "key_file": "k"}}, "broker"),
    ({"telemetry": {"interval_s": 0}}, "telemetry.interval_s"),
    ({"outbox": {"max_rows": 0}}, "outbox.max_rows"),
    ({"http": {"listen": "8501"}}, "http.listen"),
    ({"source": {"type": "directory"}}, "source"),
    ({"commands": {"rate_per_min": -1}}, "commands.rate_per_min"),
    ({"inference": {"deadline_s": 0}}, "inference.deadline_s"),
])
def test_bad_values_are_refused_with_the_key(patch: dict, key: str) -> None:
    data = {"device_id": "pi-1", "profile": "rpi4", "state_dir": "/tmp/x", "broker": {"url": "mqtt://h"}}
    data.update(patch)
    with pytest.raises(ConfigError) as err:
        parse_config(data, "cfg.yaml")
    assert str(err.value).startswith(f"cfg.yaml: {key}")
    assert "\n" not in str(err.value)


def test_not_yaml_and_not_a_mapping_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "device_id: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_mqtts_defaults_to_port_8883_and_http_can_be_disabled() -> None:
    cfg = parse_config({"device_id": "d", "profile": "rpi4", "state_dir": "/s",
                        "broker": {"url": "mqtts://broker.example"}, "http": {"listen": None}})
    assert cfg.broker.nodes[0].port == 8883 and cfg.broker.tls
    assert cfg.http.address is None


def test_broker_urls_name_the_nodes_of_a_cluster(tmp_path: Path) -> None:
    from agent.config import parse_config

    base = {"device_id": "a", "profile": "rpi4", "state_dir": str(tmp_path)}
    cfg = parse_config({**base, "broker": {"urls": ["mqtt://n1:1883", "mqtt://n2:1884"]}})
    assert [(n.host, n.port) for n in cfg.broker.nodes] == [("n1", 1883), ("n2", 1884)]
    for bad, match in (({"urls": ["mqtt://a", "mqtts://b"]}, "all nodes"),
                       ({"url": "mqtt://a", "urls": ["mqtt://b"]}, "either url or urls"),
                       ({"urls": ["mqtt://a", "ftp://b"]}, "broker.urls")):
        with pytest.raises(ConfigError, match=match):
            parse_config({**base, "broker": bad})
