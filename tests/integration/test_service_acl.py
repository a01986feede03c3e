"""The example ACL (docs/mosquitto/acl) keeps each device inside its own topics."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.testing.broker import MosquittoBroker
from edgefleet.testing.waiting import wait_for
from edgefleet.topics import device_cmd_topic, device_topic, state_topic, telemetry_topic
from tests.integration.service_support import (
    REPO,
    AgentProcess,
    Observer,
    agent_config,
    broker_files_access,
    command,
)

PASSWORDS = {"fleet": "fleet-secret", "pi-a": "a-secret", "pi-b": "b-secret"}


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("acl-broker")
    pwfile = work / "passwd"
    pwfile.touch()
    for user, password in PASSWORDS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, password], check=True,
                       capture_output=True)
    extra = broker_files_access() + (f"allow_anonymous false\npassword_file {pwfile}\nacl_file {REPO / 'docs/mosquitto/acl'}\n"
             "max_packet_size 4194560\n")
    with MosquittoBroker(work, extra_config=extra) as broker:
        yield broker


def test_wrong_password_is_refused(acl_broker) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.username_pw_set("pi-a", "wrong")
    codes = []
    client.on_connect = lambda c, u, f, rc, p: codes.append(rc)
    client.connect("127.0.0.1", acl_broker.port)
    client.loop_start()
    wait_for(lambda: codes, 5, what="CONNACK")
    client.loop_stop()
    assert codes[0].is_failure


def test_a_device_cannot_read_or_write_another_devices_topics(acl_broker, tmp_path: Path) -> None:
    (tmp_path / "pi-a.pass").write_text(PASSWORDS["pi-a"] + "\n")
    cfg = agent_config(tmp_path, acl_broker.url, device_id="pi-a", telemetry={"interval_s": 0.2},
                       broker={"username": "pi-a", "password_file": str(tmp_path / "pi-a.pass")})
    fleet = Observer(acl_broker.port, username="fleet", password=PASSWORDS["fleet"])
    spy = Observer(acl_broker.port, topic=device_topic("pi-a", "#"), username="pi-b", password=PASSWORDS["pi-b"])
    agent = AgentProcess(tmp_path, cfg).start()
    try:
        # The agent authenticates with its password file and works normally.
        wait_for(lambda: len(fleet.on("pi-a/telemetry")) >= 3, 20, what="pi-a telemetry at the fleet")
        assert fleet.on("pi-a/state")[-1]["online"] is True
        ok = command("status")
        fleet.publish(device_cmd_topic("pi-a", "status"), ok)
        wait_for(lambda: [b for b in fleet.on("pi-a/cmd/status/response") if b["id"] == ok["id"]], 5,
                 what="pi-a answers the fleet")
        # pi-b forges pi-a's state, telemetry and a command to pi-a, and writes its own telemetry.
        forged = command("status")
        spy.publish(state_topic("pi-a"), {"online": False, "forged": True})
        spy.publish(telemetry_topic("pi-a"), {"seq": 0, "forged": True})
        spy.publish(device_cmd_topic("pi-a", "status"), forged)
        spy.publish(telemetry_topic("pi-b"), {"seq": 1, "own": True})
        wait_for(lambda: fleet.on("pi-b/telemetry"), 5, what="pi-b's own telemetry")  # the ACL lets that through
        time.sleep(1.0)
        assert not [b for b in fleet.on("pi-a/state") + fleet.on("pi-a/telemetry") if b.get("forged")]
        assert not [b for b in fleet.on("pi-a/cmd/status/response") if b["id"] == forged["id"]]
        # ... and read nothing of pi-a's, while the fleet received plenty meanwhile.
        assert spy.raw() == []
        assert len(fleet.on("pi-a/telemetry")) >= 5
    finally:
        agent.stop_quietly()
        spy.close()
        fleet.close()

